"""Helpers shared by the benchmarks: photo-like test images and timing summaries."""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter


def photo_like(rng: np.random.Generator, size: tuple[int, int] = (1024, 768)) -> Image.Image:
    """A smooth, textured image that compresses and decodes like a photo (noise would not)."""
    small = rng.integers(0, 256, size=(12, 16, 3), dtype=np.uint8)
    image = Image.fromarray(small).resize(size, Image.Resampling.BICUBIC)
    grain = rng.normal(0, 6, size=(size[1], size[0], 3))
    pixels = np.clip(np.asarray(image, dtype=np.float32) + grain, 0, 255).astype(np.uint8)
    return Image.fromarray(pixels).filter(ImageFilter.SMOOTH)


def write_photos(folder: Path, count: int, seed: int = 0, size: tuple[int, int] = (1024, 768)) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(count):
        path = folder / f"photo{i:05d}.jpg"
        if not path.exists():
            photo_like(rng, size).save(path, quality=88)
        paths.append(path)
    return paths


def percentiles(samples_ms: list[float]) -> dict[str, float]:
    ordered = sorted(samples_ms)
    pick = lambda q: ordered[min(len(ordered) - 1, int(q * len(ordered)))]  # noqa: E731
    return {
        "p50": round(pick(0.50), 2),
        "p99": round(pick(0.99), 2),
        "mean": round(statistics.fmean(ordered), 2),
        "max": round(ordered[-1], 2),
    }


class Stopwatch:
    def __enter__(self) -> "Stopwatch":
        self.started = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.perf_counter() - self.started
