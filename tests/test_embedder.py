"""The embedder: unit vectors, the exact text shortcut, bf16, and a clear error without weights."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from PIL import Image

from store.embedder import ClipEmbedder, ModelUnavailable, load_embedder
from store.settings import ClipSettings
from tests.conftest import tiny_clip_settings


def test_vectors_are_unit_float32_rows(embedder: ClipEmbedder) -> None:
    images = [Image.new("RGB", (80, 50), c) for c in ("red", "blue", "white")]
    vectors = embedder.embed_images(images)
    texts = embedder.embed_texts(["a red circle", "a blue star"])
    for array, rows in ((vectors, 3), (texts, 2)):
        assert array.dtype == np.float32 and array.shape == (rows, embedder.dim)
        np.testing.assert_allclose(np.linalg.norm(array, axis=1), 1.0, rtol=1e-5)
    assert embedder.model_id.startswith("shoebox-tiny/")
    assert embedder.embed_texts([]).shape == (0, embedder.dim)


def test_text_shortcut_matches_the_full_pass(embedder: ClipEmbedder) -> None:
    assert embedder._trim_ok, "the shipped model has a causal text tower; the shortcut should apply"
    texts = ["a small red circle on the left and a big blue star", "white", "a purple heart"]
    fast = embedder.embed_texts(texts)
    embedder._trim_ok = False
    try:
        full = embedder.embed_texts(texts)
    finally:
        embedder._trim_ok = True
    assert np.min(np.sum(fast * full, axis=1)) > 0.99999


def test_bf16_agrees_with_fp32() -> None:
    fp32 = ClipEmbedder(tiny_clip_settings())
    bf16 = ClipEmbedder(replace(tiny_clip_settings(), precision="bf16"))
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)) for _ in range(6)]
    cosine = np.sum(fp32.embed_images(images) * bf16.embed_images(images), axis=1)
    assert np.min(cosine) > 0.99


def test_auto_precision_takes_bf16_only_where_it_is_native_and_faithful(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from store import embedder as embedder_module

    auto = replace(tiny_clip_settings(), precision="auto")
    monkeypatch.setattr(embedder_module, "cpu_has_native_bf16", lambda: False)
    assert ClipEmbedder(auto).precision == "fp32"

    monkeypatch.setattr(embedder_module, "cpu_has_native_bf16", lambda: True)
    fast = ClipEmbedder(auto)
    assert fast.precision == "bf16"
    exact = ClipEmbedder(tiny_clip_settings())
    texts = ["a red circle", "a blue star and a green heart"]
    assert np.min(np.sum(fast.embed_texts(texts) * exact.embed_texts(texts), axis=1)) > 0.995

    monkeypatch.setattr(embedder_module, "BF16_MIN_COSINE", 1.01)  # no bf16 can agree this well
    careful = ClipEmbedder(auto)
    assert careful.precision == "fp32"
    assert np.allclose(careful.embed_texts(texts), exact.embed_texts(texts), atol=1e-6)


def test_unreachable_pretrained_weights_raise_advice(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelUnavailable) as error:
        load_embedder(ClipSettings(model="ViT-B-32", pretrained="laion2b_s34b_b79k"))
    message = str(error.value)
    assert "SHOEBOX_CLIP_CHECKPOINT" in message and "shoebox-tiny" in message
    with pytest.raises(ModelUnavailable, match="Unknown CLIP model"):
        load_embedder(ClipSettings(model="no-such-model", pretrained=None))
