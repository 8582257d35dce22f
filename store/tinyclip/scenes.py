"""A deterministic generator of captioned scenes of coloured shapes: shoebox-tiny's whole world.

The tiny CLIP has to learn *words* (colours, shapes, sizes, positions), not one drawing routine,
because it is judged on pictures drawn by other code as well. So every rendering choice that the
words do not pin down is randomised: exact hue and brightness of each colour, size and position
within the named range, rotation, aspect, filled or outlined, borders and shading, five kinds of
background, and blur, noise and JPEG artefacts. What the words *do* pin down is kept honest: an
object is never drawn in a colour close to its background, two objects never overlap, and "big" is
always clearly bigger than "small".

Everything is driven by a `numpy.random.Generator`, so a seed reproduces the same pictures and
captions on any machine (the training run and the tests rely on that).
"""

from __future__ import annotations

import colorsys
import io
import itertools
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

COLOURS: tuple[str, ...] = ("red", "green", "blue", "yellow", "purple", "orange", "white", "black")
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "heart", "cross")
SIZES: tuple[str, ...] = ("small", "big")
POSITIONS: tuple[str, ...] = ("left", "right", "top", "bottom", "centre")
# Every (colour, shape) pair, in a fixed order: the subjects a one-object scene can show.
SUBJECTS: tuple[tuple[str, str], ...] = tuple(itertools.product(COLOURS, SHAPES))

RGB = tuple[float, float, float]

# Each colour word covers a range of renderings (hue in turns, may start below 0; saturation;
# value), wide enough that "red" means crimson as well as pure red, narrow enough that neighbouring
# words (red/orange/yellow, blue/purple) never share a rendering.
_COLOUR_HSV: dict[str, tuple[tuple[float, float], tuple[float, float], tuple[float, float]]] = {
    "red": ((-0.03, 0.02), (0.75, 1.0), (0.62, 1.0)),
    "orange": ((0.065, 0.11), (0.8, 1.0), (0.88, 1.0)),
    "yellow": ((0.135, 0.175), (0.7, 1.0), (0.88, 1.0)),
    "green": ((0.24, 0.42), (0.6, 1.0), (0.4, 0.95)),
    "blue": ((0.56, 0.67), (0.65, 1.0), (0.55, 1.0)),
    "purple": ((0.73, 0.85), (0.55, 1.0), (0.45, 0.9)),
    "white": ((0.0, 1.0), (0.0, 0.05), (0.93, 1.0)),
    "black": ((0.0, 1.0), (0.0, 0.3), (0.0, 0.14)),
}

# Where an object's centre may fall for each position word, as (x range, y range) in image
# fractions; the range is clipped later so the object stays inside the frame.
_POSITION_BOX: dict[str, tuple[tuple[float, float], tuple[float, float]]] = {
    "left": ((0.15, 0.34), (0.3, 0.7)),
    "right": ((0.66, 0.85), (0.3, 0.7)),
    "top": ((0.3, 0.7), (0.15, 0.34)),
    "bottom": ((0.3, 0.7), (0.66, 0.85)),
    "centre": ((0.42, 0.58), (0.42, 0.58)),
}

# Object "radius" (half its extent) as a fraction of the image side. The gap between the ranges
# keeps "big" at least ~1.4x "small" in every picture. Objects are drawn fairly large because the
# model sees pictures at 64 px: a star much smaller than this is a blob at that resolution.
_SIZE_RADIUS: dict[str, tuple[float, float]] = {"small": (0.12, 0.16), "big": (0.23, 0.29)}
# Two objects have to share the frame, so both are drawn a little smaller (sizes stay relative).
_PAIR_SCALE = 0.82

_POSITION_PHRASES: dict[str, tuple[str, ...]] = {
    "left": ("on the left",),
    "right": ("on the right",),
    "top": ("at the top", "on top"),
    "bottom": ("at the bottom",),
    "centre": ("in the centre", "in the center", "in the middle"),
}
_SIZE_SYNONYMS: dict[str, tuple[str, ...]] = {"small": ("small", "little"), "big": ("big", "large")}

# Minimum RGB distance between an object's colour and any background colour, so that no object
# is ever (nearly) invisible: a white object is never put on a white or light grey background.
_MIN_CONTRAST = 115.0


class SceneObject(NamedTuple):
    """One object in a scene, named by the four words a caption can use for it."""

    colour: str
    shape: str
    size: str
    position: str


@dataclass
class SceneSpec:
    """What a scene contains, independent of how it is drawn (the same spec can be rendered many
    ways, which is exactly what training needs)."""

    objects: list[SceneObject] = field(default_factory=list)

    def key(self) -> frozenset[tuple[str, str]]:
        """The scene's identity for colour+shape retrieval: the set of (colour, shape) pairs,
        so "a red circle and a blue star" and "a blue star and a red circle" are the same."""
        return frozenset((o.colour, o.shape) for o in self.objects)


# --------------------------------------------------------------------------------------------
# Specs and captions


def random_spec(
    rng: np.random.Generator, n_objects: int, colours: Sequence[str] | None = None
) -> SceneSpec:
    """Draw a scene of `n_objects` (1 or 2) objects with distinct colour+shape pairs and distinct
    positions. Two big objects are never paired with one in the centre: they could not both fit.

    `colours` restricts the palette (training uses one-colour batches, where only shape, size and
    position tell pictures apart)."""
    if n_objects not in (1, 2):
        raise ValueError("scenes have one or two objects")
    palette = tuple(colours) if colours else COLOURS
    while True:
        pairs: set[tuple[str, str]] = set()
        objects: list[SceneObject] = []
        positions = rng.choice(len(POSITIONS), size=n_objects, replace=False)
        for p in positions:
            while True:
                colour = palette[int(rng.integers(len(palette)))]
                shape = SHAPES[int(rng.integers(len(SHAPES)))]
                if (colour, shape) not in pairs:
                    pairs.add((colour, shape))
                    break
            size = SIZES[int(rng.integers(len(SIZES)))]
            objects.append(SceneObject(colour, shape, size, POSITIONS[int(p)]))
        crowded = (
            n_objects == 2
            and any(o.position == "centre" for o in objects)
            and all(o.size == "big" for o in objects)
        )
        if not crowded:
            return SceneSpec(objects)


def short_caption(spec: SceneSpec) -> str:
    """The fixed colour+shape phrasing used for evaluation: "a red circle" or
    "a red circle and a blue star" (objects in spec order)."""
    return " and ".join(f"a {o.colour} {o.shape}" for o in spec.objects)


def _article(next_word: str, rng: np.random.Generator | None) -> str:
    # Evaluation queries always say "a"; grammatical "an" is mixed in so users' phrasing works too.
    if rng is not None and next_word[0] in "aeiou" and rng.random() < 0.5:
        return "an"
    return "a"


def _object_phrase(
    obj: SceneObject, rng: np.random.Generator | None, with_size: bool, with_position: bool
) -> str:
    words: list[str] = []
    if with_size:
        synonyms = _SIZE_SYNONYMS[obj.size]
        words.append(synonyms[0] if rng is None or rng.random() < 0.75 else synonyms[1])
    words += [obj.colour, obj.shape]
    phrase = f"{_article(words[0], rng)} {' '.join(words)}"
    if with_position:
        options = _POSITION_PHRASES[obj.position]
        phrase += " " + (options[0] if rng is None else options[int(rng.integers(len(options)))])
    return phrase


def caption(spec: SceneSpec, rng: np.random.Generator | None = None) -> str:
    """Describe a scene in words.

    Without `rng` the caption is the full, fixed description ("a small red circle on the left and
    a big blue star on the right"), used for file listings and demos. With `rng` the phrasing
    varies the way people's queries do: size and position words present or not, objects in either
    order, "large"/"little", "an", an occasional "a photo of" prefix; so the model learns each word
    rather than one sentence template.
    """
    if rng is None:
        return " and ".join(_object_phrase(o, None, True, True) for o in spec.objects)
    with_size = rng.random() < 0.25
    with_position = rng.random() < 0.25
    objects = list(spec.objects)
    if len(objects) == 2 and rng.random() < 0.5:
        objects.reverse()
    phrases = [_object_phrase(o, rng, with_size, with_position) for o in objects]
    joiner = " and " if rng.random() < 0.9 else " with "
    text = joiner.join(phrases)
    if rng.random() < 0.12:
        prefixes = ("a photo of ", "a picture of ", "an image of ")
        text = prefixes[int(rng.integers(len(prefixes)))] + text
    return text


# --------------------------------------------------------------------------------------------
# Colours


def sample_colour(name: str, rng: np.random.Generator) -> RGB:
    """One rendering (0-255 RGB) of a colour word, jittered in hue, saturation and brightness."""
    (h0, h1), (s0, s1), (v0, v1) = _COLOUR_HSV[name]
    hue = float(rng.uniform(h0, h1)) % 1.0
    r, g, b = colorsys.hsv_to_rgb(hue, float(rng.uniform(s0, s1)), float(rng.uniform(v0, v1)))
    return (r * 255.0, g * 255.0, b * 255.0)


def _distance(a: RGB, b: RGB) -> float:
    return math.dist(a, b)


def _background_colour(rng: np.random.Generator) -> RGB:
    """Mostly greys and muted tints (like real backdrops), sometimes a stronger colour so the
    model learns that the background's colour is not the object's."""
    u = rng.random()
    if u < 0.5:
        grey = rng.uniform(0.0, 255.0)
        return tuple(float(np.clip(grey + rng.normal(0.0, 6.0), 0, 255)) for _ in range(3))  # type: ignore[return-value]
    if u < 0.92:
        hsv = (rng.random(), rng.uniform(0.05, 0.45), rng.uniform(0.15, 1.0))
    else:
        hsv = (rng.random(), rng.uniform(0.45, 0.9), rng.uniform(0.3, 1.0))
    r, g, b = colorsys.hsv_to_rgb(*hsv)
    return (r * 255.0, g * 255.0, b * 255.0)


def _contrasting_colour(
    rng: np.random.Generator, avoid: list[RGB], margin: float, neutral: bool = False
) -> RGB:
    """A background colour at least `_MIN_CONTRAST + margin` away from every object colour
    (a plain grey when `neutral`)."""
    best, best_gap = (128.0, 128.0, 128.0), -1.0
    for _ in range(60):
        if neutral:
            grey = float(rng.uniform(0.0, 255.0))
            candidate: RGB = (grey, grey, grey)
        else:
            candidate = _background_colour(rng)
        gap = min(_distance(candidate, c) for c in avoid)
        if gap >= _MIN_CONTRAST + margin:
            return candidate
        if gap > best_gap:
            best, best_gap = candidate, gap
    return best


# --------------------------------------------------------------------------------------------
# Backgrounds


def _background(
    rng: np.random.Generator, size: int, avoid: list[RGB], difficulty: float = 1.0
) -> np.ndarray:
    """A float32 (size, size, 3) backdrop: plain, gradient, stripes, checker, noise or blotches,
    made only of colours that contrast with every object colour in `avoid`. Below full
    `difficulty` more of them are plain."""
    kind = rng.choice(
        ["plain", "gradient", "stripes", "checker", "noise", "blotches"],
        p=[0.4, 0.2, 0.1, 0.08, 0.1, 0.12],
    )
    neutral = rng.random() >= difficulty
    if neutral:
        kind = "plain"
    noise_sigma = float(rng.uniform(6.0, 22.0)) if kind == "noise" else 0.0
    c1 = np.array(_contrasting_colour(rng, avoid, noise_sigma, neutral), dtype=np.float32)
    if kind in ("plain", "noise"):
        img = np.broadcast_to(c1, (size, size, 3)).astype(np.float32)
        if kind == "noise":
            shape = (size, size, 1) if rng.random() < 0.5 else (size, size, 3)
            img = img + rng.normal(0.0, noise_sigma, size=shape).astype(np.float32)
        return img
    c2 = np.array(_contrasting_colour(rng, avoid, 0.0), dtype=np.float32)
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32) / size
    if kind == "gradient":
        angle = rng.uniform(0.0, 2.0 * math.pi)
        t = xs * math.cos(angle) + ys * math.sin(angle)
        t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
    elif kind == "stripes":
        angle = rng.choice([0.0, math.pi / 2, math.pi / 4, rng.uniform(0.0, math.pi)])
        period = rng.uniform(0.05, 0.2)
        t = ((xs * math.cos(angle) + ys * math.sin(angle)) / period) % 1.0
        t = (t < rng.uniform(0.3, 0.7)).astype(np.float32)
    elif kind == "checker":
        cell = rng.uniform(0.06, 0.25)
        t = ((np.floor(xs / cell) + np.floor(ys / cell)) % 2).astype(np.float32)
    else:  # blotches: smooth low-frequency mixing of the two colours
        grid = int(rng.integers(3, 8))
        small = Image.fromarray((rng.random((grid, grid)) * 255).astype(np.uint8), "L")
        t = np.asarray(small.resize((size, size), Image.BICUBIC), dtype=np.float32) / 255.0
    t = t[..., None]
    return c1 * (1.0 - t) + c2 * t


# --------------------------------------------------------------------------------------------
# Shapes


def _unit_polygon(shape: str, rng: np.random.Generator) -> np.ndarray:
    """Vertices (n, 2) of a shape centred on the origin, fitting a circle of radius ~1 (y down).

    Each call varies the drawing a little (star points and depth, cross arm width, triangle
    proportions) so no single template is learned."""
    if shape == "circle":
        t = np.linspace(0.0, 2.0 * math.pi, 72, endpoint=False)
        return np.stack([np.cos(t), np.sin(t)], axis=1) * 0.92
    if shape == "square":
        h = 0.78
        return np.array([[-h, -h], [h, -h], [h, h], [-h, h]])
    if shape == "triangle":
        angles = np.radians([-90.0, 30.0, 150.0])
        pts = np.stack([np.cos(angles), np.sin(angles) + 0.25], axis=1)
        if rng.random() < 0.3:
            pts = pts + rng.normal(0.0, 0.08, size=pts.shape)
        return pts
    if shape == "star":
        points = 5 if rng.random() < 0.85 else 6
        inner = rng.uniform(0.38, 0.52)
        t = -math.pi / 2 + np.arange(2 * points) * math.pi / points
        radii = np.where(np.arange(2 * points) % 2 == 0, 1.0, inner)
        pts = np.stack([np.cos(t) * radii, np.sin(t) * radii], axis=1)
        return pts - (pts.max(axis=0) + pts.min(axis=0)) / 2
    if shape == "heart":
        t = np.linspace(0.0, 2.0 * math.pi, 80, endpoint=False)
        x = 16 * np.sin(t) ** 3
        y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))
        pts = np.stack([x, y], axis=1)
        pts = pts - (pts.max(axis=0) + pts.min(axis=0)) / 2
        return pts / np.abs(pts).max() * 0.95
    if shape == "cross":
        w = rng.uniform(0.2, 0.34)
        a = 0.95
        return np.array(
            [
                [-w, -a], [w, -a], [w, -w], [a, -w], [a, w], [w, w],
                [w, a], [-w, a], [-w, w], [-a, w], [-a, -w], [-w, -w],
            ]
        )  # fmt: skip
    raise ValueError(f"unknown shape {shape!r}")


def _rotation(shape: str, rng: np.random.Generator) -> float:
    """A rotation in radians that keeps the shape recognisable under its name (a heart is never
    upside down; a cross may turn into an X; stars and triangles turn freely)."""
    if shape == "circle":
        return 0.0
    if shape == "star":
        return rng.uniform(0.0, 2.0 * math.pi)
    if shape == "triangle" and rng.random() < 0.25:
        return rng.uniform(0.0, 2.0 * math.pi)
    if shape == "square" and rng.random() < 0.15:
        return rng.uniform(0.0, math.pi / 2)
    if shape == "cross" and rng.random() < 0.15:
        return math.pi / 4 + rng.uniform(-0.2, 0.2)
    limit = {"square": 15.0, "triangle": 20.0, "heart": 25.0, "cross": 15.0}[shape]
    return math.radians(rng.uniform(-limit, limit))


def _place(
    spec: SceneSpec, rng: np.random.Generator
) -> list[tuple[float, float, float]]:
    """Centre (x, y) and radius, in image fractions, for each object: inside its position's box,
    inside the frame, and (for two objects) not touching each other."""

    def draw_one(obj: SceneObject) -> tuple[float, float, float]:
        radius = rng.uniform(*_SIZE_RADIUS[obj.size]) * (_PAIR_SCALE if len(spec.objects) > 1 else 1.0)
        (x0, x1), (y0, y1) = _POSITION_BOX[obj.position]
        lo, hi = radius + 0.02, 1.0 - radius - 0.02
        x = float(np.clip(rng.uniform(x0, x1), lo, hi))
        y = float(np.clip(rng.uniform(y0, y1), lo, hi))
        return x, y, float(radius)

    placed = [draw_one(o) for o in spec.objects]
    if len(placed) < 2:
        return placed
    best, best_slack = placed, -1.0
    for _ in range(60):
        (xa, ya, ra), (xb, yb, rb) = placed
        slack = math.hypot(xa - xb, ya - yb) - (ra + rb) - 0.02
        if slack >= 0:
            return placed
        if slack > best_slack:
            best, best_slack = placed, slack
        placed = [draw_one(o) for o in spec.objects]
    # Could not fit at these sizes: shrink both by the same factor (keeping big vs small).
    (xa, ya, ra), (xb, yb, rb) = best
    factor = max(0.5, (math.hypot(xa - xb, ya - yb) - 0.02) / (ra + rb))
    return [(xa, ya, ra * factor), (xb, yb, rb * factor)]


def _mask(points: np.ndarray, size: int, supersample: int, outline: float) -> np.ndarray:
    """Coverage (0..1 float32) of a polygon given in pixel coordinates, antialiased when
    `supersample` > 1; an outline width > 0 draws only the border."""
    big = size * supersample
    canvas = Image.new("L", (big, big), 0)
    draw = ImageDraw.Draw(canvas)
    xy = [tuple(p) for p in (points * supersample).tolist()]
    if outline > 0:
        draw.polygon(xy, outline=255, width=max(1, round(outline * supersample)))
    else:
        draw.polygon(xy, fill=255)
    if supersample > 1:
        canvas = canvas.reduce(supersample)
    return np.asarray(canvas, dtype=np.float32) / 255.0


def _paint(
    img: np.ndarray, alpha: np.ndarray, colour: RGB, rng: np.random.Generator, shaded: bool
) -> None:
    """Composite a solid (optionally softly shaded) colour into `img` where `alpha` covers."""
    paint = np.array(colour, dtype=np.float32)
    a = alpha[..., None]
    if shaded:
        size = img.shape[0]
        angle = rng.uniform(0.0, 2.0 * math.pi)
        ramp = np.linspace(-1.0, 1.0, size, dtype=np.float32)
        light = math.cos(angle) * ramp[None, :] + math.sin(angle) * ramp[:, None]
        strength = rng.uniform(0.05, 0.15)
        layer = np.clip(paint * (1.0 + strength * light[..., None]), 0.0, 255.0)
        img *= 1.0 - a
        img += layer * a
    else:
        img *= 1.0 - a
        img += paint * a


# --------------------------------------------------------------------------------------------
# Rendering


def render_scene(
    spec: SceneSpec,
    rng: np.random.Generator,
    size: int = 256,
    degrade: bool = True,
    difficulty: float = 1.0,
) -> Image.Image:
    """Draw `spec` as a `size`x`size` RGB picture, with every free choice taken from `rng`.

    `degrade` adds the mild blur, noise, exposure shifts and JPEG artefacts of real photos, so the
    model does not depend on perfectly clean edges. `difficulty` (0..1) scales how often the
    harder renderings appear (textured backgrounds, outlines, borders, shading, artefacts):
    a model trained from scratch first has to find shapes at all, which it only does on easy
    pictures, so training ramps it up; everything else uses the default, full variety."""
    d = float(np.clip(difficulty, 0.0, 1.0))
    colours = [sample_colour(o.colour, rng) for o in spec.objects]
    img = np.ascontiguousarray(_background(rng, size, colours, d), dtype=np.float32)
    supersample = 2 if rng.random() < 0.5 else 1
    for obj, colour, (cx, cy, radius) in zip(spec.objects, colours, _place(spec, rng)):
        pts = _unit_polygon(obj.shape, rng)
        stretch = 0.06 if obj.shape == "circle" else 0.12
        pts = pts * np.array([1.0 + rng.uniform(-stretch, stretch), 1.0 + rng.uniform(-stretch, stretch)])
        theta = _rotation(obj.shape, rng)
        rot = np.array([[math.cos(theta), -math.sin(theta)], [math.sin(theta), math.cos(theta)]])
        pts = pts @ rot.T * (radius * size) + np.array([cx * size, cy * size])
        r_px = radius * size
        outlined = rng.random() < 0.22 * d
        if outlined:
            width = max(0.2 * r_px, 0.025 * size, 2.0)
            _paint(img, _mask(pts, size, supersample, width), colour, rng, shaded=False)
            continue
        _paint(img, _mask(pts, size, supersample, 0.0), colour, rng, shaded=rng.random() < 0.25 * d)
        if rng.random() < 0.2 * d and obj.colour != "black":
            # A thin border, as in clip art: a darker shade of the fill, sometimes near-black.
            border = (
                tuple(c * 0.55 for c in colour) if rng.random() < 0.7 else (20.0, 20.0, 20.0)
            )
            width = max(1.0, rng.uniform(0.04, 0.09) * r_px)
            _paint(img, _mask(pts, size, supersample, width), border, rng, shaded=False)  # type: ignore[arg-type]
    if degrade:
        if rng.random() < 0.3 * d:
            gain = rng.uniform(0.88, 1.12)
            img = img * gain + rng.uniform(-12.0, 12.0)
        if rng.random() < 0.35 * d:
            img = img + rng.normal(0.0, rng.uniform(2.0, 10.0), size=img.shape).astype(np.float32)
    picture = Image.fromarray(np.clip(img + 0.5, 0, 255).astype(np.uint8), "RGB")
    if degrade:
        if rng.random() < 0.35 * d:
            picture = picture.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 1.1) * size / 128))
        if rng.random() < 0.4 * d:
            buffer = io.BytesIO()
            picture.save(buffer, format="JPEG", quality=int(rng.integers(25, 91)))
            buffer.seek(0)
            picture = Image.open(buffer).convert("RGB")
    return picture


def generate_gallery(out_dir: Path, n: int, seed: int, size: int = 256) -> list[tuple[Path, str]]:
    """Write `n` scenes to `out_dir` as a stand-in photo folder, named after what they show
    (`0007-red-circle-blue-star.jpg`; every fifth one a PNG so both formats get exercised).

    Returns (path, full caption) pairs. The same seed always writes the same files, which is what
    lets tests and demos ask "did the search find the red circle?" about a folder they made."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written: list[tuple[Path, str]] = []
    for i in range(n):
        rng = np.random.default_rng([seed, i])
        spec = random_spec(rng, 1 if rng.random() < 0.5 else 2)
        image = render_scene(spec, rng, size=size)
        stem = "-".join(f"{o.colour}-{o.shape}" for o in spec.objects)
        if i % 5 == 4:
            path = out_dir / f"{i:04d}-{stem}.png"
            image.save(path, format="PNG")
        else:
            path = out_dir / f"{i:04d}-{stem}.jpg"
            image.save(path, format="JPEG", quality=90)
        written.append((path, caption(spec)))
    return written


__all__ = [
    "COLOURS",
    "POSITIONS",
    "SHAPES",
    "SIZES",
    "SceneObject",
    "SceneSpec",
    "caption",
    "generate_gallery",
    "random_spec",
    "render_scene",
    "sample_colour",
    "short_caption",
]
