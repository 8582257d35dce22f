"""Held-out retrieval figures for shoebox-tiny (or any embedder) on generated scenes.

These numbers are what "the tiny model understands its world" means, so the tests assert on them
and training prints them. They are measured on scenes drawn from a seed that training never uses,
with the fixed phrasings users would type ("a red circle", "a red circle and a blue star").

Figures:
- text->image on single-object scenes: does "a {colour} {shape}" retrieve a picture of exactly
  that (R@1, R@5);
- text->image on two-object scenes: does "a {c1} {s1} and a {c2} {s2}" retrieve a picture with
  exactly those two objects, in either order (R@1, R@5);
- image->image on single-object scenes: the fraction of each picture's five nearest neighbours
  that show the same colour and shape (what "find similar photos" relies on).

A retrieved picture counts as a hit when it shows the same set of (colour, shape) pairs as the
query's scene: several scenes can share a caption, and any of them is a right answer.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image

from store.tinyclip.scenes import SceneSpec, random_spec, render_scene, short_caption

# Training draws its scenes from `default_rng([train_seed, index])`; evaluation draws from
# `default_rng([EVAL_SEED, n_objects, index])`, a different seed sequence, so no held-out
# picture is ever a training picture.
EVAL_SEED = 90_210
EVAL_SIZE = 160


@functools.lru_cache(maxsize=4)
def held_out_scenes(
    n_objects: int, n: int, seed: int = EVAL_SEED, size: int = EVAL_SIZE
) -> tuple[tuple[SceneSpec, ...], tuple[Image.Image, ...]]:
    """The `n` held-out scenes with `n_objects` objects, rendered once per process (cached,
    because tests evaluate several embedders on the very same pictures)."""
    specs: list[SceneSpec] = []
    images: list[Image.Image] = []
    for i in range(n):
        rng = np.random.default_rng([seed, n_objects, i])
        spec = random_spec(rng, n_objects)
        specs.append(spec)
        images.append(render_scene(spec, rng, size=size))
    return tuple(specs), tuple(images)


def _text_to_image(
    embedder: Any, specs: Sequence[SceneSpec], images: Sequence[Image.Image]
) -> tuple[float, float, np.ndarray]:
    """R@1 and R@5 of each scene's short caption against all the pictures; also returns the
    picture vectors so callers can reuse them."""
    image_vectors = embedder.embed_images(list(images))
    captions = [short_caption(s) for s in specs]
    unique = sorted(set(captions))
    text_vectors = embedder.embed_texts(unique)
    lookup = {c: text_vectors[i] for i, c in enumerate(unique)}
    queries = np.stack([lookup[c] for c in captions])
    ranking = np.argsort(-(queries @ image_vectors.T), axis=1, kind="stable")[:, :5]
    keys = [s.key() for s in specs]
    hits = np.array([[keys[j] == keys[i] for j in row] for i, row in enumerate(ranking)])
    return float(hits[:, 0].mean()), float(hits.any(axis=1).mean()), image_vectors


def _attribute_hits(specs: Sequence[SceneSpec], image_vectors: np.ndarray, embedder: Any) -> dict[str, float]:
    """For single-object queries: how often the top picture has at least the right colour, or
    the right shape. Diagnostic only: it tells which half of the task a weak model is missing."""
    captions = [short_caption(s) for s in specs]
    ranking = np.argmax(embedder.embed_texts(captions) @ image_vectors.T, axis=1)
    objects = [s.objects[0] for s in specs]
    return {
        "single_r1_colour": float(np.mean([objects[j].colour == objects[i].colour for i, j in enumerate(ranking)])),
        "single_r1_shape": float(np.mean([objects[j].shape == objects[i].shape for i, j in enumerate(ranking)])),
    }


def _image_to_image(specs: Sequence[SceneSpec], image_vectors: np.ndarray) -> float:
    """Mean fraction of the five nearest other pictures that share colour and shape."""
    sims = image_vectors @ image_vectors.T
    np.fill_diagonal(sims, -np.inf)
    neighbours = np.argsort(-sims, axis=1, kind="stable")[:, :5]
    keys = [s.key() for s in specs]
    same = np.array([[keys[j] == keys[i] for j in row] for i, row in enumerate(neighbours)])
    return float(same.mean())


def evaluate(
    embedder: Any, n: int = 500, seed: int = EVAL_SEED, size: int = EVAL_SIZE
) -> dict[str, float]:
    """Retrieval figures of `embedder` (anything with `embed_images`/`embed_texts` returning
    L2-normalised rows) on `n` held-out single-object and `n` two-object scenes."""
    single_specs, single_images = held_out_scenes(1, n, seed, size)
    pair_specs, pair_images = held_out_scenes(2, n, seed, size)
    single_r1, single_r5, single_vectors = _text_to_image(embedder, single_specs, single_images)
    pair_r1, pair_r5, _ = _text_to_image(embedder, pair_specs, pair_images)
    return {
        "single_r1": single_r1,
        "single_r5": single_r5,
        "pair_r1": pair_r1,
        "pair_r5": pair_r5,
        "image_top5_same": _image_to_image(single_specs, single_vectors),
        **_attribute_hits(single_specs, single_vectors, embedder),
    }


class TorchEmbedder:
    """An in-memory open_clip model behind the embedder interface, so training can report the
    held-out figures on the model it just trained, before any file is written."""

    def __init__(self, model: Any, preprocess: Any, tokenizer: Any, model_id: str) -> None:
        import torch

        self._torch = torch
        self._model = model.eval()
        self._preprocess = preprocess
        self._tokenizer = tokenizer
        self.model_id = model_id
        self.dim = int(self.embed_texts(["a photo"]).shape[1])

    @staticmethod
    def _normalise(features: np.ndarray) -> np.ndarray:
        norms = np.linalg.norm(features, axis=1, keepdims=True)
        return (features / np.maximum(norms, 1e-12)).astype(np.float32)

    def embed_images(self, images: Sequence[Image.Image]) -> np.ndarray:
        torch = self._torch
        chunks = []
        for start in range(0, len(images), 256):
            batch = torch.stack([self._preprocess(im) for im in images[start : start + 256]])
            with torch.inference_mode():
                chunks.append(self._model.encode_image(batch).float().numpy())
        return self._normalise(np.concatenate(chunks))

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        torch = self._torch
        with torch.inference_mode():
            features = self._model.encode_text(self._tokenizer(list(texts))).float().numpy()
        return self._normalise(features)


def format_figures(figures: dict[str, float]) -> str:
    """One readable line of the figures, in the order they are discussed."""
    return (
        f"single-object text->image R@1 {figures['single_r1']:.3f} R@5 {figures['single_r5']:.3f} | "
        f"two-object R@1 {figures['pair_r1']:.3f} R@5 {figures['pair_r5']:.3f} | "
        f"image->image top-5 same colour+shape {figures['image_top5_same']:.3f} "
        f"(single top-1 right colour {figures['single_r1_colour']:.3f}, "
        f"right shape {figures['single_r1_shape']:.3f})"
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Print the held-out figures of the shipped weights, loaded exactly as the product loads
    them (or of another checkpoint of the same architecture with --weights)."""
    from store.embedder import load_embedder
    from store.settings import TINY_MODEL, ClipSettings

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", type=Path, default=None, help="checkpoint (default: shipped)")
    parser.add_argument("--n", type=int, default=500)
    parser.add_argument("--seed", type=int, default=EVAL_SEED)
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args(argv)
    settings = ClipSettings(model=TINY_MODEL, pretrained=None, checkpoint=args.weights)
    figures = evaluate(load_embedder(settings), n=args.n, seed=args.seed)
    print(json.dumps(figures, indent=2) if args.json else format_figures(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
