"""A second, deliberately unrelated way of drawing the tiny model's words.

`store.tinyclip.scenes` draws every training picture; a model could learn its quirks (its polygon
outlines, its colour jitter, its backgrounds) instead of the words. This painter shares none of
that code: it uses PIL's own drawing primitives (ellipses, rectangles, polygons), fixed textbook
colours, flat or two-tone backgrounds and no artefacts. Tests check that the shipped weights still
find "a red circle" among pictures drawn this way.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageDraw

PAINT: dict[str, tuple[int, int, int]] = {
    "red": (220, 20, 30),
    "green": (30, 160, 50),
    "blue": (30, 60, 220),
    "yellow": (250, 220, 20),
    "purple": (130, 40, 170),
    "orange": (250, 130, 10),
    "white": (250, 250, 250),
    "black": (15, 15, 15),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "heart", "cross")


def _backdrop(colour: str, rng: np.random.Generator, side: int) -> Image.Image:
    """A flat mid-tone backdrop, sometimes split in two tones, never close to the object."""
    while True:
        grey = int(rng.integers(70, 190))
        tint = rng.integers(-25, 26, size=3)
        base = tuple(int(np.clip(grey + t, 0, 255)) for t in tint)
        if math.dist(base, PAINT[colour]) > 120:
            break
    image = Image.new("RGB", (side, side), base)
    if rng.random() < 0.4:
        other = tuple(int(np.clip(c + rng.integers(-30, 31), 0, 255)) for c in base)
        if math.dist(other, PAINT[colour]) > 120:
            ImageDraw.Draw(image).rectangle([0, side // 2, side, side], fill=other)
    return image


def _outline(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    if shape == "triangle":
        return [(cx + r * math.cos(a), cy + r * math.sin(a)) for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)]
    if shape == "star":
        points = []
        for k in range(10):
            radius = r if k % 2 == 0 else r * 0.42
            angle = -math.pi / 2 + k * math.pi / 5
            points.append((cx + radius * math.cos(angle), cy + radius * math.sin(angle)))
        return points
    if shape == "heart":
        # the classic parametric heart curve, scaled to the radius
        points = []
        for k in range(48):
            t = 2 * math.pi * k / 48
            x = 16 * math.sin(t) ** 3
            y = 13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t)
            points.append((cx + r * x / 17, cy - r * y / 17))
        return points
    raise ValueError(shape)


def paint(colour: str, shape: str, rng: np.random.Generator, side: int = 128) -> Image.Image:
    """One object of `colour` and `shape`, of a random size and place, on a plain backdrop."""
    image = _backdrop(colour, rng, side)
    draw = ImageDraw.Draw(image)
    r = float(rng.uniform(0.16, 0.3)) * side
    cx = float(rng.uniform(r + 4, side - r - 4))
    cy = float(rng.uniform(r + 4, side - r - 4))
    fill = PAINT[colour]
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "square":
        h = r * 0.85
        draw.rectangle([cx - h, cy - h, cx + h, cy + h], fill=fill)
    elif shape == "cross":
        arm = r * 0.32
        draw.rectangle([cx - r, cy - arm, cx + r, cy + arm], fill=fill)
        draw.rectangle([cx - arm, cy - r, cx + arm, cy + r], fill=fill)
    else:
        draw.polygon(_outline(shape, cx, cy, r), fill=fill)
    return image


def painted_set(n: int, seed: int) -> tuple[list[tuple[str, str]], list[Image.Image]]:
    """`n` pictures cycling through every colour and shape, with their (colour, shape) labels."""
    rng = np.random.default_rng(seed)
    labels = [(c, s) for c in PAINT for s in SHAPES]
    chosen = [labels[i % len(labels)] for i in range(n)]
    return chosen, [paint(c, s, rng) for c, s in chosen]
