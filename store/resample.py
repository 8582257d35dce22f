"""Shrinking pixels with torch's antialiased uint8 kernels, on the thread that decoded them.

Outside the model, resampling was the biggest cost of indexing a photo: Pillow took 6.4 ms to
shrink a 1024x768 picture to the 768-px stored copy and 3.7 ms to make the model's 224-px crop
from that copy, on one core. Torch's vectorised uint8 kernels do the same in 1.9 ms and 0.9 ms,
and their bicubic filter matches Pillow's to within 2 levels out of 255 (the model's input is
still what open_clip's own transform would make, up to that rounding).

These functions run on the decoding threads, not on the embedder's torch thread, so they must
never start an OpenMP team: a second team beside the model's on a small machine makes every
forward pass wait on sleeping threads (see `store.embedder`). `one_openmp_thread` keeps the
calling thread's OpenMP limit at 1 while they run; the limit is per thread, so the model's
team is untouched.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

log = logging.getLogger(__name__)

Filter = Literal["bilinear", "bicubic"]


@lru_cache(maxsize=1)
def _openmp() -> ctypes.CDLL | None:
    """The OpenMP runtime torch itself loaded (the one whose per-thread limit torch obeys).

    faiss-cpu ships a second libgomp with separate settings, so the symbol must come from the
    copy inside torch's own library folder, not from whatever the process resolves first.
    """
    folder = Path(torch.__file__).parent / "lib"
    for pattern in ("libgomp*.so*", "libiomp*.so*", "libomp*.so*", "libomp*.dylib"):
        for candidate in sorted(folder.glob(pattern)):
            try:
                library = ctypes.CDLL(str(candidate))
                library.omp_set_num_threads.argtypes = [ctypes.c_int]
                library.omp_get_max_threads.restype = ctypes.c_int
                return library
            except (OSError, AttributeError):
                continue
    log.debug("torch's OpenMP runtime not found in %s; resizing may use several threads", folder)
    return None


@contextlib.contextmanager
def openmp_threads(count: int) -> Iterator[None]:
    """Run torch work on the calling thread with at most `count` OpenMP threads.

    Torch reads the thread's OpenMP limit lazily the first time a thread does parallel work, and
    would then overwrite a limit set before; asking for the thread count first makes it settle.
    The limit is the calling thread's own, so other threads' teams are untouched; nested uses
    restore each other's limits in turn.
    """
    library = _openmp()
    if library is None:
        yield
        return
    torch.get_num_threads()
    before = library.omp_get_max_threads()
    library.omp_set_num_threads(max(1, count))
    try:
        yield
    finally:
        library.omp_set_num_threads(before)


def one_openmp_thread() -> "contextlib.AbstractContextManager[None]":
    """Run torch work on the calling thread without forking an OpenMP team."""
    return openmp_threads(1)


def as_tensor(image: Image.Image) -> torch.Tensor:
    """An RGB picture as (1, 4, H, W) uint8 pixels, channels-last: red, green, blue and padding.

    Pillow keeps an RGB pixel in four bytes, and torch's uint8 resize kernels work on four
    channels inside either way, so the padding costs nothing until it is dropped (by `to_image`
    and `resize_and_center_crop`). Where Pillow can lend its own memory (`_lent_pixels`) the
    tensor is a view of it, so nothing is copied; otherwise the rows are copied out with the
    padding, which is a plain copy where packing them into three bytes takes twice as long.
    Copying cost 0.3 ms for a 1024x768 photo on a quiet core (two fresh 3 MB buffers) and
    lending 0.02 ms; while indexing, lending was the faster in 9 of 11 alternating rounds.

    Callers only read the pixels: every resize makes new memory. A view must not be written to.
    """
    if image.mode != "RGB":
        raise ValueError(f"expected an RGB image, got mode {image.mode}")
    lent = _lent_pixels(image)
    if lent is not None:
        pixels = torch.from_numpy(lent)
    else:
        pixels = torch.frombuffer(bytearray(image.tobytes("raw", "RGBX")), dtype=torch.uint8)
    return pixels.view(1, image.height, image.width, 4).permute(0, 3, 1, 2)


class _ArrowSchema(ctypes.Structure):
    """`struct ArrowSchema` of the Arrow C data interface (a stable, documented ABI)."""


_ArrowSchema._fields_ = [
    ("format", ctypes.c_char_p),
    ("name", ctypes.c_char_p),
    ("metadata", ctypes.c_char_p),
    ("flags", ctypes.c_int64),
    ("n_children", ctypes.c_int64),
    ("children", ctypes.POINTER(ctypes.POINTER(_ArrowSchema))),
    ("dictionary", ctypes.c_void_p),
    ("release", ctypes.c_void_p),
    ("private_data", ctypes.c_void_p),
]


class _ArrowArray(ctypes.Structure):
    """`struct ArrowArray` of the Arrow C data interface."""


_ArrowArray._fields_ = [
    ("length", ctypes.c_int64),
    ("null_count", ctypes.c_int64),
    ("offset", ctypes.c_int64),
    ("n_buffers", ctypes.c_int64),
    ("n_children", ctypes.c_int64),
    ("buffers", ctypes.POINTER(ctypes.c_void_p)),
    ("children", ctypes.POINTER(ctypes.POINTER(_ArrowArray))),
    ("dictionary", ctypes.c_void_p),
    ("release", ctypes.c_void_p),
    ("private_data", ctypes.c_void_p),
]

_capsule_pointer = ctypes.pythonapi.PyCapsule_GetPointer
_capsule_pointer.restype = ctypes.c_void_p
_capsule_pointer.argtypes = [ctypes.py_object, ctypes.c_char_p]


class _LentMemory:
    """Pillow's pixel memory as numpy sees it, holding the export that lent it.

    The export's capsule keeps the memory alive (Pillow counts it as a reference) until the
    capsule goes, which is when the last array or tensor made from this object goes.
    """

    def __init__(self, lent: object, address: int, size: int) -> None:
        self._lent = lent
        self.__array_interface__ = {"version": 3, "shape": (size,), "typestr": "|u1", "data": (address, False)}


def _lent_pixels(image: Image.Image) -> np.ndarray | None:
    """The picture's own RGB memory as a flat uint8 array, without a copy, or None where Pillow
    cannot lend it: before Pillow 11.2 (no Arrow export), or for a picture whose rows do not lie
    in one block (over Pillow's 16 MB block size), or in a layout other than the one read here
    (a fixed-size list of four uint8 per pixel, starting at offset 0)."""
    export = getattr(image, "__arrow_c_array__", None)
    if export is None:
        return None
    try:
        schema_capsule, array_capsule = export()
    except ValueError:
        return None
    schema = ctypes.cast(_capsule_pointer(schema_capsule, b"arrow_schema"), ctypes.POINTER(_ArrowSchema)).contents
    array = ctypes.cast(_capsule_pointer(array_capsule, b"arrow_array"), ctypes.POINTER(_ArrowArray)).contents
    pixels = image.width * image.height
    if schema.format != b"+w:4" or schema.n_children != 1 or schema.children[0].contents.format != b"C":
        return None
    if array.length != pixels or array.offset != 0 or array.null_count != 0 or array.n_children != 1:
        return None
    values = array.children[0].contents
    if values.length != 4 * pixels or values.offset != 0 or values.n_buffers != 2 or not values.buffers[1]:
        return None
    return np.asarray(_LentMemory(array_capsule, values.buffers[1], 4 * pixels))


def to_image(pixels: torch.Tensor) -> Image.Image:
    """(1, 4, H, W) padded pixels (see `as_tensor`) or (1, 3, H, W) back to an RGB picture,
    whichever way they are laid out in memory."""
    _, channels, height, width = pixels.shape
    if channels not in (3, 4) or pixels.dtype != torch.uint8:
        raise ValueError(f"expected (1, 3 or 4, H, W) uint8 pixels, got {tuple(pixels.shape)} {pixels.dtype}")
    interleaved = np.ascontiguousarray(pixels[0].permute(1, 2, 0).numpy())
    return Image.frombytes("RGB", (width, height), interleaved, "raw", "RGBX" if channels == 4 else "RGB")


def fit_within(width: int, height: int, max_side: int) -> tuple[int, int]:
    """The size with the longest side at `max_side` and the same shape (never enlarged)."""
    longest = max(width, height)
    if longest <= max_side:
        return width, height
    scale = max_side / longest
    return max(1, round(width * scale)), max(1, round(height * scale))


def shrink_to_fit(pixels: torch.Tensor, max_side: int, mode: Filter = "bilinear") -> torch.Tensor:
    """Shrink so the longest side is at most `max_side`; a picture that fits is returned as is.

    Bilinear with antialiasing averages over every source pixel (a triangle filter as wide as
    the scale), which is what a downscale by less than 2x after the JPEG draft needs.
    """
    height, width = pixels.shape[-2:]
    size = fit_within(width, height, max_side)
    if size == (width, height):
        return pixels
    with one_openmp_thread():
        return F.interpolate(pixels, size=(size[1], size[0]), mode=mode, antialias=True)


def shortest_side_size(width: int, height: int, side: int) -> tuple[int, int]:
    """torchvision's `Resize(side)`: the short side becomes `side`, the long one is truncated."""
    if width <= height:
        return side, int(side * height / width)
    return int(side * width / height), side


# How far torch's antialiased filters reach from an output pixel's centre, in source pixels, at
# 1x; shrinking by a factor widens the reach by that factor.
_FILTER_REACH: dict[str, float] = {"bilinear": 1.0, "bicubic": 2.0}

# An axis whose whole resized length is at most this is resized whole, as torchvision does: the
# crop would save little of it (4 MB of pixels at the most, at 224), and cutting columns out of a
# picture copies them, which costs a photo more time than resizing them.
_WINDOW_ABOVE = 4096

# Resized pixels that a crop's window may begin before the crop, so that the window can begin
# where the whole resize has a pixel edge on a source pixel edge (see `_aligned_begin`). At 224,
# a window is then under 2,000 x 224 pixels (1.7 MB), however long the picture.
_ALIGNMENT_SLACK = 1024

_RESIZE_OPS = {
    "bilinear": torch.ops.aten._upsample_bilinear2d_aa,
    "bicubic": torch.ops.aten._upsample_bicubic2d_aa,
}


@dataclass(frozen=True)
class _Window:
    """The part of one axis that a centre crop draws from.

    Source pixels `start:stop` are resized to `size` pixels on the grid of the whole resized
    axis (`scale` resized pixels per source pixel; None: the whole axis, whose scale the resize
    works out itself), and the crop begins `skip` pixels into them.
    """

    start: int
    stop: int
    size: int
    skip: int
    scale: float | None


def _aligned_begin(source_per_resized: float, latest: int) -> int:
    """Where a window should begin on the resized axis: at most `latest`, at most
    `_ALIGNMENT_SLACK` before it, and where a resized pixel's edge lies on a source pixel's edge
    (or as near as these allow), so that the window samples where the whole resize samples.

    0 always qualifies, and most sizes have closer ones: a window that can reach back to one
    gives exactly the whole resize's pixels; otherwise the sampling moves by a tiny fraction of a
    pixel (see `resize_and_center_crop`).
    """
    candidates = np.arange(max(0, latest - _ALIGNMENT_SLACK), latest + 1)
    positions = candidates * source_per_resized
    error = np.abs(positions - np.round(positions))
    return int(candidates[error <= error.min() + 1e-9].max())


def _window(source: int, resized: int, first: int, count: int, mode: Filter) -> _Window:
    """The source pixels that resized pixels `first:first + count` are made from: the filter's
    reach on either side of them, plus a pixel for the kernels' rounding of it."""
    source_per_resized = source / resized
    reach = _FILTER_REACH[mode] * max(source_per_resized, 1.0) + 1
    low = (first + 0.5) * source_per_resized - reach
    high = (first + count - 0.5) * source_per_resized + reach
    if resized <= _WINDOW_ABOVE or (low <= 0 and high >= source):
        return _Window(start=0, stop=source, size=resized, skip=first, scale=None)
    begin = _aligned_begin(source_per_resized, math.floor(low / source_per_resized)) if low > 0 else 0
    return _Window(
        start=round(begin * source_per_resized),
        stop=min(source, math.ceil(high)),
        size=first + count - begin,
        skip=first - begin,
        scale=resized / source,
    )


def resize_and_center_crop(pixels: torch.Tensor, side: int, crop: tuple[int, int], mode: Filter) -> torch.Tensor:
    """torchvision's `Resize(side)` then `CenterCrop(crop)`, as (3, crop_h, crop_w) uint8 RGB.

    Sizes and crop offsets are rounded the way torchvision rounds them, and torch's antialiased
    filter is the one Pillow uses, so this is open_clip's transform up to a level of rounding.

    An axis that would be resized past `_WINDOW_ABOVE` pixels is resized only where the crop
    draws from it: a picture 1 pixel wide and 10,000 tall would otherwise become 224 x 2,240,000
    (2 GB) on its way to a 224 x 224 crop, and one 200,000 tall would not fit in memory. The
    window is resized on the whole axis's grid (the same scale, and the same sample positions
    where it begins on a whole source pixel), so the crop is the whole resize's: exactly, for
    every size tried up to 4.5 times longer than wide even with both axes windowed, and within
    3 levels (0.4 on average) for noisy pictures 19 to 10,000 times longer than wide, where the
    window may begin a small fraction of a source pixel off the grid.
    """
    height, width = pixels.shape[-2:]
    new_width, new_height = shortest_side_size(width, height, side)
    crop_height, crop_width = crop
    if crop_height > new_height or crop_width > new_width:
        raise ValueError(f"crop {crop} is larger than the resized picture {new_height}x{new_width}")
    top = int(round((new_height - crop_height) / 2.0))
    left = int(round((new_width - crop_width) / 2.0))
    if (new_height, new_width) == (height, width):
        return pixels[0, :3, top : top + crop_height, left : left + crop_width]
    rows = _window(height, new_height, top, crop_height, mode)
    columns = _window(width, new_width, left, crop_width, mode)
    source = pixels[:, :, rows.start : rows.stop, columns.start : columns.stop]
    with one_openmp_thread():
        resized = _RESIZE_OPS[mode](source, [rows.size, columns.size], False, rows.scale, columns.scale)
    return resized[0, :3, rows.skip : rows.skip + crop_height, columns.skip : columns.skip + crop_width]


__all__ = [
    "as_tensor",
    "fit_within",
    "one_openmp_thread",
    "openmp_threads",
    "resize_and_center_crop",
    "shortest_side_size",
    "shrink_to_fit",
    "to_image",
]
