"""shoebox-tiny: the scene generator is reproducible, and the shipped weights really understand it.

The quality bar is checked on held-out scenes through the product's own loader, and the same bar
is shown to reject an untrained model of the same architecture, so passing it means something.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from store import tinyclip
from store.tinyclip import scenes
from store.tinyclip.evaluate import evaluate
from tests.plain_painter import painted_set

BAR = {
    "single_r1": 0.9,
    "single_r5": 0.97,
    "pair_r1": 0.6,
    "pair_r5": 0.9,
    "image_top5_same": 0.9,
}
# On pictures drawn by `tests/plain_painter.py` (code that shares nothing with the training
# generator): name each picture's colour and shape among all 48 "a {colour} {shape}" captions.
PAINTED_BAR = 0.85


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


# ------------------------------------------------------------------------------------------
# (a) the generator


def test_same_seed_same_scene_caption_and_pixels() -> None:
    first, second = np.random.default_rng(7), np.random.default_rng(7)
    spec_a, spec_b = scenes.random_spec(first, 2), scenes.random_spec(second, 2)
    assert spec_a == spec_b
    image_a = scenes.render_scene(spec_a, first, size=96)
    image_b = scenes.render_scene(spec_b, second, size=96)
    assert image_a.mode == "RGB" and image_a.size == (96, 96)
    assert np.array_equal(np.asarray(image_a), np.asarray(image_b))
    assert scenes.caption(spec_a, first) == scenes.caption(spec_b, second)


def test_different_seeds_give_different_scenes() -> None:
    specs = {
        scenes.short_caption(scenes.random_spec(np.random.default_rng(seed), 2)) for seed in range(20)
    }
    assert len(specs) > 15


def test_gallery_is_reproducible_and_named_after_its_content(tmp_path: Path) -> None:
    first = scenes.generate_gallery(tmp_path / "a", 6, seed=3, size=64)
    second = scenes.generate_gallery(tmp_path / "b", 6, seed=3, size=64)
    other = scenes.generate_gallery(tmp_path / "c", 6, seed=4, size=64)
    assert [p.name for p, _ in first] == [p.name for p, _ in second]
    assert [c for _, c in first] == [c for _, c in second]
    for (a, _), (b, _) in zip(first, second):
        assert a.read_bytes() == b.read_bytes()
    assert [p.name for p, _ in first] != [p.name for p, _ in other]
    for path, text in first:
        assert path.is_file() and path.suffix in {".jpg", ".png"}
        colour, shape = path.stem.split("-")[1:3]
        assert f"{colour} {shape}" in text


def test_every_colour_shape_size_and_position_occurs() -> None:
    rng = np.random.default_rng(11)
    seen = [o for _ in range(400) for o in scenes.random_spec(rng, int(rng.integers(1, 3))).objects]
    assert {o.colour for o in seen} == set(scenes.COLOURS)
    assert {o.shape for o in seen} == set(scenes.SHAPES)
    assert {o.size for o in seen} == set(scenes.SIZES)
    assert {o.position for o in seen} == set(scenes.POSITIONS)
    assert set(scenes.COLOURS) >= {"red", "green", "blue", "yellow", "purple", "orange", "white", "black"}
    assert set(scenes.SHAPES) >= {"circle", "square", "triangle", "star", "heart", "cross"}


def test_two_object_scenes_are_distinct_objects_in_distinct_places() -> None:
    rng = np.random.default_rng(5)
    for _ in range(300):
        a, b = scenes.random_spec(rng, 2).objects
        assert (a.colour, a.shape) != (b.colour, b.shape)
        assert a.position != b.position


def test_captions_name_the_objects_and_fit_the_text_context() -> None:
    import open_clip

    spec = scenes.SceneSpec([scenes.SceneObject("red", "circle", "small", "left")])
    assert scenes.caption(spec) == "a small red circle on the left"
    assert scenes.short_caption(spec) == "a red circle"
    pair = scenes.SceneSpec(
        [
            scenes.SceneObject("blue", "square", "big", "right"),
            scenes.SceneObject("yellow", "star", "small", "top"),
        ]
    )
    assert scenes.short_caption(pair) == "a blue square and a yellow star"

    tinyclip.register()
    tokenizer = open_clip.get_tokenizer(tinyclip.MODEL_NAME)
    rng = np.random.default_rng(2)
    for _ in range(500):
        spec = scenes.random_spec(rng, 2)
        text = scenes.caption(spec, rng)
        for obj in spec.objects:
            assert obj.colour in text and obj.shape in text
        # start and end tokens included: a truncated caption would lose words silently
        assert len(tokenizer.encode(text)) + 2 <= tokenizer.context_length


def test_objects_stand_out_from_their_background() -> None:
    """Every colour is drawn visibly: on a plain backdrop a clear share of the pixels is far from
    the backdrop colour, and textured backdrops are built only from contrasting colours."""
    rng = np.random.default_rng(9)
    for colour in scenes.COLOURS:
        for _ in range(8):
            spec = scenes.SceneSpec([scenes.SceneObject(colour, "square", "big", "centre")])
            image = scenes.render_scene(spec, rng, size=96, degrade=False, difficulty=0.0)
            pixels = np.asarray(image, dtype=float)
            backdrop = pixels[:3, :3].reshape(-1, 3).mean(axis=0)
            far = np.linalg.norm(pixels - backdrop, axis=2) > 100
            assert far.mean() > 0.02, colour
        for _ in range(100):
            painted = scenes.sample_colour(colour, rng)
            backdrop_colour = scenes._contrasting_colour(rng, [painted], 0.0)
            assert np.linalg.norm(np.subtract(painted, backdrop_colour)) >= 100, colour


# ------------------------------------------------------------------------------------------
# (b) the shipped weights, loaded exactly as the product loads them


def painted_accuracy(embedder: object) -> float:
    """Share of painted pictures whose best-matching caption names their colour and shape."""
    labels, images = painted_set(96, seed=1)
    names = list(scenes.SUBJECTS)
    captions = embedder.embed_texts([f"a {c} {s}" for c, s in names])  # type: ignore[attr-defined]
    best = np.argmax(embedder.embed_images(images) @ captions.T, axis=1)  # type: ignore[attr-defined]
    return float(np.mean([names[b] == label for b, label in zip(best, labels)]))


@pytest.fixture(scope="module")
def shipped_embedder() -> object:
    from store.embedder import load_embedder
    from store.settings import ClipSettings

    assert tinyclip.WEIGHTS_PATH.is_file(), "the trained weights must ship with the package"
    embedder = load_embedder(ClipSettings(model="shoebox-tiny", pretrained=None))
    assert embedder.model_id.startswith("shoebox-tiny/")
    return embedder


@pytest.fixture(scope="module")
def shipped_figures(shipped_embedder: object) -> dict[str, float]:
    return evaluate(shipped_embedder, n=500)


def test_shipped_weights_are_small() -> None:
    assert tinyclip.WEIGHTS_PATH.stat().st_size <= 20 * 1024 * 1024


def test_shipped_weights_find_single_objects_by_text(shipped_figures: dict[str, float]) -> None:
    assert shipped_figures["single_r1"] >= BAR["single_r1"], shipped_figures
    assert shipped_figures["single_r5"] >= BAR["single_r5"], shipped_figures


def test_shipped_weights_find_pairs_of_objects_by_text(shipped_figures: dict[str, float]) -> None:
    assert shipped_figures["pair_r1"] >= BAR["pair_r1"], shipped_figures
    assert shipped_figures["pair_r5"] >= BAR["pair_r5"], shipped_figures


def test_shipped_weights_put_like_pictures_together(shipped_figures: dict[str, float]) -> None:
    assert shipped_figures["image_top5_same"] >= BAR["image_top5_same"], shipped_figures


def test_shipped_weights_know_the_words_not_one_drawing_routine(shipped_embedder: object) -> None:
    assert painted_accuracy(shipped_embedder) >= PAINTED_BAR


# ------------------------------------------------------------------------------------------
# (c) the bar means something: an untrained model of the same architecture fails it


def test_random_weights_fall_below_the_bar(tmp_path: Path) -> None:
    import open_clip
    import torch

    from store.embedder import load_embedder
    from store.settings import ClipSettings
    from store.tinyclip.train import save_weights

    tinyclip.register()
    torch.manual_seed(0)
    model, _, _ = open_clip.create_model_and_transforms("shoebox-tiny", pretrained=None)
    checkpoint = tmp_path / "random.safetensors"
    save_weights(model, checkpoint, {"model": "shoebox-tiny", "steps": "0"})
    embedder = load_embedder(
        ClipSettings(model="shoebox-tiny", pretrained=None, checkpoint=checkpoint)
    )
    figures = evaluate(embedder, n=500)
    for name, bar in BAR.items():
        assert figures[name] < bar, (name, figures)
    assert painted_accuracy(embedder) < PAINTED_BAR


def test_training_writes_weights_the_product_can_load(tmp_path: Path) -> None:
    """A two-step run of the real training script: seeded, fp16 on disk, loadable as a checkpoint."""
    from store.embedder import load_embedder
    from store.settings import ClipSettings
    from store.tinyclip.train import train

    out = tmp_path / "tiny.safetensors"
    figures = train(steps=2, batch=8, seed=1, out=out, workers=0, eval_n=10)
    assert set(figures) >= set(BAR)
    assert out.is_file() and out.stat().st_size <= 20 * 1024 * 1024
    embedder = load_embedder(ClipSettings(model="shoebox-tiny", pretrained=None, checkpoint=out))
    vectors = embedder.embed_texts(["a red circle"])
    assert vectors.shape == (1, embedder.dim) and abs(float(np.linalg.norm(vectors)) - 1.0) < 1e-4


def test_same_subject_loss_prefers_one_class_close_together() -> None:
    """The image-to-image term: lower when pictures of one colour+shape coincide than when they
    are spread out, and silent for pictures without a same-class partner in the batch."""
    import torch

    from store.tinyclip.train import NO_LABEL, subject_label, same_subject_loss

    scale = torch.tensor(10.0)
    basis = torch.eye(4)
    labels = torch.tensor([0, 0, 1, 1, NO_LABEL])
    clustered = torch.stack([basis[0], basis[0], basis[1], basis[1], basis[2]])
    spread = torch.stack([basis[0], basis[2], basis[1], basis[3], basis[2]])
    assert float(same_subject_loss(clustered, labels, scale)) < float(same_subject_loss(spread, labels, scale))

    loners = torch.tensor([0, 1, 2, NO_LABEL, NO_LABEL])
    assert float(same_subject_loss(spread, loners, scale)) == 0.0

    one = scenes.SceneSpec([scenes.SceneObject("red", "star", "small", "left")])
    two = scenes.SceneSpec([*one.objects, scenes.SceneObject("blue", "circle", "big", "right")])
    same_class = scenes.SceneSpec([scenes.SceneObject("red", "star", "big", "top")])
    assert subject_label(one) == subject_label(same_class) != NO_LABEL
    assert subject_label(two) == NO_LABEL
