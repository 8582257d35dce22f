"""The embedder: unit vectors, the exact text shortcut, bf16, and a clear error without weights."""

from __future__ import annotations

import threading
from dataclasses import replace

import numpy as np
import pytest
import torch
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


def test_split_preprocessing_gives_open_clips_input(embedder: ClipEmbedder) -> None:
    """Resize and crop on the caller's thread with torch's uint8 kernels, normalisation on the
    torch thread: the model sees open_clip's own transform up to a level of rounding."""
    rng = np.random.default_rng(3)
    images = [
        Image.fromarray(rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8))
        for h, w in ((50, 80), (300, 200), (64, 64), (211, 937))
    ]
    inputs = [embedder.preprocess(im) for im in images]
    ours = embedder.batch_tensor(inputs).numpy()
    theirs = np.stack([embedder._preprocess(im).numpy() for im in images])
    assert ours.shape == theirs.shape
    level = 1 / 255 / 0.26  # one level of 255, after Normalize's smallest std
    assert np.max(np.abs(ours - theirs)) <= 2.01 * level
    assert np.mean(np.abs(ours - theirs)) < 0.05 * level
    vectors = embedder.embed_preprocessed(inputs)
    reference = embedder.embed_tensors(torch.stack([embedder._preprocess(im) for im in images]))
    assert np.min(np.sum(vectors * reference, axis=1)) > 0.9999
    np.testing.assert_allclose(vectors, embedder.embed_images(images), atol=1e-6)


def test_preprocessing_of_other_transforms_runs_open_clips_own(embedder: ClipEmbedder) -> None:
    """A transform that is not resize + centre crop is run as open_clip wrote it."""
    from torchvision import transforms

    image = Image.new("RGB", (90, 40), "orange")
    steps = embedder._crop
    embedder._crop = None
    try:
        expected = embedder._preprocess(image)
        assert np.array_equal(embedder.preprocess(image).numpy(), expected.numpy())
        vector = embedder.embed_preprocessed([embedder.preprocess(image)])
    finally:
        embedder._crop = steps
    assert np.sum(vector * embedder.embed_images([image])) > 0.9999
    from store.embedder import _crop_steps

    squash = transforms.Compose([transforms.Resize((64, 64)), *embedder._preprocess.transforms[2:]])
    assert _crop_steps(squash) is None
    again = _crop_steps(embedder._preprocess)
    assert again is not None and steps is not None
    assert (again.side, again.crop, again.mode) == (steps.side, steps.crop, steps.mode) == (64, (64, 64), "bicubic")


def test_all_torch_work_runs_on_the_embedders_own_thread(
    embedder: ClipEmbedder, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Whichever thread asks, the model runs on one thread (two OpenMP teams on a small machine
    make every forward pass wait on sleeping threads)."""
    from concurrent.futures import ThreadPoolExecutor

    seen: set[str] = set()
    encode_text, encode_image = embedder._model.encode_text, embedder._model.encode_image

    def spy(fn):  # type: ignore[no-untyped-def]
        def wrapper(*args, **kwargs):  # type: ignore[no-untyped-def]
            seen.add(threading.current_thread().name)
            return fn(*args, **kwargs)

        return wrapper

    monkeypatch.setattr(embedder._model, "encode_text", spy(encode_text))
    monkeypatch.setattr(embedder._model, "encode_image", spy(encode_image))
    embedder._trim_ok = False  # make text queries go through encode_text
    try:
        with ThreadPoolExecutor(3) as pool:
            list(pool.map(lambda i: embedder.embed_texts([f"query {i}"]), range(6)))
            list(pool.map(lambda i: embedder.embed_images([Image.new("RGB", (40, 40), "red")]), range(6)))
        embedder.embed_texts(["from the main thread"])
    finally:
        embedder._trim_ok = True
    assert len(seen) == 1 and next(iter(seen)).startswith("shoebox-torch"), seen


def test_lane_passes_run_on_the_callers_thread_with_their_share_of_threads(
    embedder: ClipEmbedder, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The indexer's side-by-side passes run where they are called, each with the model's
    threads divided among the lanes (so two lanes on two cores never fork a team), give the
    same vectors as a pass on the torch thread, and leave the caller's limit as it was."""
    from concurrent.futures import ThreadPoolExecutor

    here = threading.local()
    encode_image = embedder._model.encode_image

    def spy(*args, **kwargs):  # type: ignore[no-untyped-def]
        here.seen.append((threading.current_thread().name, torch.get_num_threads()))
        return encode_image(*args, **kwargs)

    rng = np.random.default_rng(5)
    images = [Image.fromarray(rng.integers(0, 256, size=(70, 90, 3), dtype=np.uint8)) for _ in range(3)]
    inputs = [embedder.preprocess(im) for im in images]
    reference = embedder.embed_preprocessed(inputs)
    monkeypatch.setattr(embedder._model, "encode_image", spy)
    monkeypatch.setattr(embedder, "_threads", 4)  # as if on four cores, whatever this machine has

    def lane(lanes: int) -> tuple[np.ndarray, list[tuple[str, int]], int, int]:
        here.seen = []
        before = torch.get_num_threads()
        vectors = embedder.embed_preprocessed_in_lane(inputs, lanes)
        return vectors, here.seen, before, torch.get_num_threads()

    with ThreadPoolExecutor(2, thread_name_prefix="lane-like") as pool:
        results = list(pool.map(lane, [2, 2, 4, 8]))
    assert [[threads for _, threads in seen] for _, seen, _, _ in results] == [[2], [2], [1], [1]]
    for vectors, seen, before, after in results:
        assert seen[0][0].startswith("lane-like"), seen
        np.testing.assert_allclose(vectors, reference, atol=1e-5)
        assert before == after


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
