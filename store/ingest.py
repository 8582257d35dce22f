"""Turn untrusted bytes into a clean RGB picture, or into a reason a person can read.

Everything that reaches the index passes through here first, and everything here assumes the
bytes are hostile: the file name and extension are ignored, the format is decided by magic bytes,
the declared pixel count is checked before a single pixel is decoded, so is a layout that would
keep a parser busy for seconds (a JPEG of thousands of passes or segments, a PNG, GIF or TIFF
of a hundred thousand chunks, blocks or strips), and every failure inside Pillow becomes a
`RejectedImage` with one short sentence instead of a traceback.

What the rest of Shoebox gets back is always the same shape: an RGB image, fully loaded and
detached from the input, rotated the way the camera meant it (EXIF orientation), with
transparency composited onto white and high-bit-depth data scaled into 8 bits.
"""

from __future__ import annotations

import codecs
import io
import logging
import math
import os
import re
import stat
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageFile, ImageOps

from store.settings import IngestSettings

log = logging.getLogger(__name__)

_MB = 1024 * 1024
_KB = 1024

CORRUPT_REASON = "image data is truncated or corrupt"
METADATA_TOO_LARGE_REASON = "image carries too much embedded metadata"
THUMBNAIL_QUALITY = 85
THUMBNAIL_EXTENSION = "jpg"
_WHITE = (255, 255, 255, 255)

# Modes whose transparency lives in an alpha band; they are composited onto white.
_ALPHA_MODES = frozenset({"LA", "La", "PA", "RGBA", "RGBa"})
# Modes Pillow clips instead of scaling when converting to 8 bits, so they are scaled here.
_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N"})
_WIDE_MODES = _SIXTEEN_BIT_MODES | {"I", "F"}


class RejectedImage(Exception):
    """Why a file was not indexed, in words a person understands (str(e) is the reason).

    The store shows `reason` to whoever posted the file, so it is one short sentence with no
    Python or Pillow jargon; the underlying exception, if any, is chained for the logs.
    """

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class DecodedImage:
    """A decoded picture ready for embedding and thumbnailing.

    `image` may be smaller than `width` x `height` when a JPEG was decoded at reduced scale
    (`min_side`); `width` and `height` always describe the picture as the user sees it, so they
    are what the index should store.
    """

    image: Image.Image
    width: int
    height: int
    format: str


# --------------------------------------------------------------------------------------------
# Sniffing: decide what the bytes are from the bytes alone.
# --------------------------------------------------------------------------------------------

_BMP_HEADER_SIZES = frozenset({12, 16, 40, 52, 56, 64, 108, 124})
_AVIF_BRANDS = frozenset({b"avif", b"avis"})
_HEIF_BRANDS = frozenset({b"heic", b"heix", b"hevc", b"hevx", b"heim", b"heis", b"mif1", b"msf1"})


def _ftyp_brands(data: bytes) -> set[bytes]:
    """The major and compatible brands of an ISO base media file ('ftyp' box), or an empty set.

    AVIF, HEIC, MP4 and MOV all share this container, and only the brands tell them apart.
    """
    if len(data) < 16 or data[4:8] != b"ftyp":
        return set()
    box_size = int.from_bytes(data[0:4], "big")
    end = min(max(box_size, 16), len(data), 256)
    brands = {data[8:12]}
    brands.update(data[i : i + 4] for i in range(16, end - 3, 4))
    return brands


def _pillow_can_open(format_name: str) -> bool:
    """Whether a Pillow plugin for `format_name` is registered (HEIF needs an extra plugin)."""
    Image.init()
    return format_name in Image.OPEN


def _is_bmp(data: bytes) -> bool:
    """A BMP signature is only two letters, so the DIB header size is checked as well.

    Without this, any text file that happens to start with "BM" would be handed to the BMP
    decoder and be reported as a corrupt picture rather than as text.
    """
    if len(data) < 18 or data[:2] != b"BM":
        return False
    return int.from_bytes(data[14:18], "little") in _BMP_HEADER_SIZES


def _sniff_iso_media(data: bytes) -> str | None:
    """AVIF or HEIF when the brands say so and Pillow has a decoder for it."""
    brands = _ftyp_brands(data)
    if brands & _AVIF_BRANDS:
        return "AVIF" if _pillow_can_open("AVIF") else None
    if brands & _HEIF_BRANDS:
        return "HEIF" if _pillow_can_open("HEIF") else None
    return None


def sniff_format(data: bytes) -> str | None:
    """The image format named by the magic bytes, as Pillow spells it, or None.

    Only formats that a photo-sharing chat realistically carries are accepted: narrowing the list
    keeps Pillow's many exotic (and less hardened) plugins away from untrusted input.
    """
    if data[:3] == b"\xff\xd8\xff":
        return "JPEG"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "PNG"
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return "GIF"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    if data[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
        return "TIFF"
    if _is_bmp(data):
        return "BMP"
    return _sniff_iso_media(data)


# Signatures of things people post that are not pictures Shoebox can read, for the reason text.
_BINARY_SIGNATURES: tuple[tuple[int, bytes, str], ...] = (
    (0, b"%PDF-", "not an image (looks like a PDF document)"),
    (0, b"PK\x03\x04", "not an image (looks like a ZIP archive)"),
    (0, b"PK\x05\x06", "not an image (looks like an empty ZIP archive)"),
    (0, b"\x1f\x8b", "not an image (looks like a gzip archive)"),
    (0, b"Rar!\x1a\x07", "not an image (looks like a RAR archive)"),
    (0, b"7z\xbc\xaf\x27\x1c", "not an image (looks like a 7-Zip archive)"),
    (257, b"ustar", "not an image (looks like a tar archive)"),
    (0, b"\x7fELF", "not an image (looks like a program)"),
    (0, b"MZ", "not an image (looks like a Windows program)"),
    (0, b"\x1aE\xdf\xa3", "not an image (looks like a video)"),
    (0, b"OggS", "not an image (looks like audio or video)"),
    (0, b"ID3", "not an image (looks like audio)"),
    (0, b"fLaC", "not an image (looks like audio)"),
    (0, b"8BPS", "unsupported image format (Photoshop document)"),
    (0, b"\x00\x00\x01\x00", "unsupported image format (icon file)"),
    (0, b"\xff\x4f\xff\x51", "unsupported image format (JPEG 2000)"),
    (0, b"\x00\x00\x00\x0cjP  \r\n\x87\n", "unsupported image format (JPEG 2000)"),
    (0, b"\xff\x0a", "unsupported image format (JPEG XL)"),
    (0, b"\x00\x00\x00\x0cJXL \r\n\x87\n", "unsupported image format (JPEG XL)"),
)

_RIFF_KINDS = {
    b"AVI ": "not an image (looks like a video)",
    b"WAVE": "not an image (looks like audio)",
}


def _text_prefix(data: bytes) -> str | None:
    """The start of the data as text if it reads as mostly printable UTF-8, else None.

    Undecodable bytes count against it; a character cut in half at the 4 KB boundary does not.
    """
    head = data[:4096]
    if head.startswith(b"\xef\xbb\xbf"):
        head = head[3:]
    text = codecs.getincrementaldecoder("utf-8")(errors="replace").decode(head, final=False)
    if not text:
        return None
    printable = sum((ch.isprintable() and ch != "\ufffd") or ch in "\r\n\t\f" for ch in text)
    if "\x00" in text or printable / len(text) < 0.95:
        return None
    return text


def _describe_text(text: str) -> str:
    """Name the kind of text, so "looks like HTML" tells the user they saved a web page."""
    lowered = text.lstrip().lower()
    head = lowered[:2048]
    if lowered.startswith("<!doctype html") or any(
        tag in head for tag in ("<html", "<head", "<body", "<script", "<meta", "<div")
    ):
        return "not an image (looks like HTML)"
    if "<svg" in head:
        return "unsupported image format (SVG drawing)"
    if lowered.startswith("<?xml") or lowered.startswith("<"):
        return "not an image (looks like XML)"
    if lowered.startswith(("{", "[")):
        return "not an image (looks like JSON)"
    if lowered.startswith("#!"):
        return "not an image (looks like a script)"
    return "not an image (looks like text)"


_IMAGE_MAGIC = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"GIF87a", b"GIF89a", b"RIFF", b"II*\x00", b"MM\x00*")


def describe_non_image(data: bytes) -> str:
    """A one-sentence reason for bytes that `sniff_format` did not recognise."""
    if any(magic.startswith(data) for magic in _IMAGE_MAGIC):
        return CORRUPT_REASON  # only the first bytes of an image signature: cut short
    for offset, signature, reason in _BINARY_SIGNATURES:
        if data[offset : offset + len(signature)] == signature:
            return reason
    if data[:4] == b"RIFF" and data[8:12] in _RIFF_KINDS:
        return _RIFF_KINDS[data[8:12]]
    brands = _ftyp_brands(data)
    if brands & (_AVIF_BRANDS | _HEIF_BRANDS):
        return "unsupported image format (HEIC/AVIF photo this server cannot decode)"
    if brands:
        return "not an image (looks like a video)"
    if b"%PDF-" in data[:1024]:
        return "not an image (looks like a PDF document)"
    text = _text_prefix(data)
    if text is not None:
        return _describe_text(text)
    return "not an image (unrecognised binary data)"


# --------------------------------------------------------------------------------------------
# Reading files with a hard size cap.
# --------------------------------------------------------------------------------------------


def _trim_number(value: float) -> str:
    """`50.0` -> "50", `64.5` -> "64.5": limits read better without a trailing ".0"."""
    text = f"{value:.1f}"
    return text[:-2] if text.endswith(".0") else text


def _size_in_words(size: int, max_bytes: int, unit: int, unit_name: str) -> str:
    """A file size to one decimal, rounded up only when rounding would make it look like the limit."""
    shown = round(size / unit, 1)
    if shown <= max_bytes / unit:
        shown = math.ceil(size * 10 / unit) / 10
    return f"{shown:.1f} {unit_name}"


def too_large_reason(size: int, max_bytes: int) -> str:
    """e.g. "file is 80.2 MB, over the 50 MB limit" (KB or bytes for tiny test limits)."""
    if max_bytes >= _MB:
        unit, name = _MB, "MB"
    elif max_bytes >= _KB:
        unit, name = _KB, "KB"
    else:
        return f"file is {size} bytes, over the {max_bytes}-byte limit"
    shown = _size_in_words(size, max_bytes, unit, name)
    return f"file is {shown}, over the {_trim_number(max_bytes / unit)} {name} limit"


def _check_file_size(size: int, max_bytes: int) -> None:
    if size == 0:
        raise RejectedImage("file is empty")
    if size > max_bytes:
        raise RejectedImage(too_large_reason(size, max_bytes))


def _open_flags() -> int:
    """Read-only, and non-blocking so that a FIFO planted in a photo folder cannot hang us."""
    return os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0)


def _os_error_reason(error: OSError) -> str:
    if isinstance(error, FileNotFoundError):
        return "file does not exist"
    if isinstance(error, PermissionError):
        return "file cannot be read (permission denied)"
    if isinstance(error, IsADirectoryError):
        return "not a regular file (it is a folder)"
    return f"file cannot be read ({error.strerror or type(error).__name__})"


def _read_at_most(fd: int, limit: int) -> bytes:
    """Read until EOF or `limit` bytes, whichever comes first."""
    chunks: list[bytes] = []
    remaining = limit
    while remaining > 0:
        chunk = os.read(fd, min(remaining, _MB))
        if not chunk:
            break
        chunks.append(chunk)
        remaining -= len(chunk)
    return b"".join(chunks)


def read_limited(path: Path, max_bytes: int) -> bytes:
    """The whole file, or RejectedImage if it is missing, special, empty or over `max_bytes`.

    The size is checked on the open descriptor before reading (so the check and the read see the
    same file), and at most `max_bytes + 1` bytes are ever read, so a file that grows while we
    read it, or a device that claims size 0, still cannot make us allocate more than the limit.
    """
    try:
        fd = os.open(path, _open_flags())
    except OSError as error:
        raise RejectedImage(_os_error_reason(error)) from error
    try:
        info = os.fstat(fd)
        if stat.S_ISDIR(info.st_mode):
            raise RejectedImage("not a regular file (it is a folder)")
        if not stat.S_ISREG(info.st_mode):
            raise RejectedImage("not a regular file")
        _check_file_size(info.st_size, max_bytes)
        data = _read_at_most(fd, max_bytes + 1)
    except OSError as error:
        raise RejectedImage(_os_error_reason(error)) from error
    finally:
        os.close(fd)
    _check_file_size(len(data), max_bytes)
    return data


# --------------------------------------------------------------------------------------------
# Decoding.
# --------------------------------------------------------------------------------------------


def _pixel_limit_words(max_pixels: int) -> str:
    """Words for a pixel limit: "64-megapixel limit", or "5000-pixel limit" for tiny limits."""
    if max_pixels >= 1_000_000:
        return f"{_trim_number(max_pixels / 1_000_000)}-megapixel limit"
    return f"{max_pixels}-pixel limit"


def _pixel_limit_reason(width: int, height: int, max_pixels: int) -> str:
    return f"image is {width}x{height} pixels, over the {_pixel_limit_words(max_pixels)}"


def _effective_pixel_limit(max_pixels: int) -> int:
    """Pillow refuses anything above twice its own MAX_IMAGE_PIXELS whatever we configure."""
    pillow_max = Image.MAX_IMAGE_PIXELS
    return max_pixels if pillow_max is None else min(max_pixels, 2 * pillow_max)


def _check_dimensions(width: int, height: int, max_pixels: int) -> None:
    if width <= 0 or height <= 0:
        raise RejectedImage(f"image has no pixels ({width}x{height})")
    if width * height > max_pixels:
        raise RejectedImage(_pixel_limit_reason(width, height, max_pixels))


def _webp_declared_size(data: bytes) -> tuple[int, int] | None:
    """Canvas size from the first chunk of a WebP (extended, lossless or lossy layout).

    libwebp allocates the whole canvas when its decoder is created, which Pillow does while
    *opening* the file, so this size has to be checked before Pillow sees the bytes.
    """
    chunk = data[12:16]
    if chunk == b"VP8X" and len(data) >= 30:
        return int.from_bytes(data[24:27], "little") + 1, int.from_bytes(data[27:30], "little") + 1
    if chunk == b"VP8L" and len(data) >= 25 and data[20] == 0x2F:
        bits = int.from_bytes(data[21:25], "little")
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    if chunk == b"VP8 " and len(data) >= 30 and data[23:26] == b"\x9d\x01\x2a":
        return (
            int.from_bytes(data[26:28], "little") & 0x3FFF,
            int.from_bytes(data[28:30], "little") & 0x3FFF,
        )
    return None


def declared_size(data: bytes, format_name: str) -> tuple[int, int] | None:
    """The width and height a PNG, GIF or WebP header claims, read without Pillow.

    These three keep their size at a fixed offset, so a bomb is refused (with its size in the
    reason) before any decoder state exists. Other formats are checked right after opening.
    """
    if format_name == "PNG" and len(data) >= 24 and data[12:16] == b"IHDR":
        return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    if format_name == "GIF" and len(data) >= 10:
        return int.from_bytes(data[6:8], "little"), int.from_bytes(data[8:10], "little")
    if format_name == "WEBP":
        return _webp_declared_size(data)
    return None


def _precheck_declared_size(data: bytes, format_name: str, max_pixels: int) -> None:
    """Refuse oversized (and, for PNG and WebP, empty) declared sizes before opening.

    A GIF's logical screen may legally be 0x0 (its frames then define the size), so only its
    upper bound is checked here.
    """
    size = declared_size(data, format_name)
    if size is None:
        return
    width, height = size
    if format_name == "GIF":
        if width * height > max_pixels:
            raise RejectedImage(_pixel_limit_reason(width, height, max_pixels))
        return
    _check_dimensions(width, height, max_pixels)


# --------------------------------------------------------------------------------------------
# Structure: files whose layout, not their pixels, would keep a decoder busy for seconds.
# --------------------------------------------------------------------------------------------

# Outside compressed data, a JPEG marker is 0xFF and a code; more 0xFF bytes before it are fill,
# and 0x00 after it is not a code (stuffing).
_JPEG_MARKER = re.compile(rb"\xff[^\x00\xff]")
# Inside a scan's compressed data, 0xFF is only ever followed by 0x00 (stuffing) or a restart
# code (0xD0-0xD7), so the first 0xFF followed by anything else is the marker that ends the scan.
_JPEG_SCAN_END = re.compile(rb"\xff[^\x00\xd0-\xd7\xff]")
# Markers without a length field: TEM, restart codes and start of image.
_JPEG_STANDALONE = frozenset({0x01, *range(0xD0, 0xD9)})
_JPEG_END, _JPEG_SCAN = 0xD9, 0xDA

# Progressive passes (scans) a JPEG may have. Encoders write about 10 (libjpeg's default script
# has 10 for colour, 6 for grey; optimised scripts a few more), but libjpeg decodes every pass
# over the whole picture, about 3 ms each for a 49-megapixel photo, and a file can repeat a
# small pass thousands of times: 10,000 passes in 0.9 MB took 30 s. 500 is what libjpeg-turbo
# itself sets when it fuzzes its decoder; the passes of an embedded EXIF thumbnail are not
# counted, since the walk skips over the metadata that holds it.
MAX_JPEG_SCANS = 500
# Marker segments (metadata, tables, scan headers) a JPEG may have. A camera writes a few dozen;
# an ICC profile may take up to 255 and extended XMP some hundreds (50 MB of it is 800). Pillow
# reads those before the first scan one by one in Python and keeps every APPn: 10 million empty
# ones (40 MB) took 11 s and 1.4 GB.
MAX_JPEG_SECTIONS = 10_000
# Bytes before the first scan that belong to no segment (padding, stray 0xFF): Pillow steps over
# them one at a time, 0.3 s per MB. Real files have at most a few KB.
MAX_JPEG_STRAY_BYTES = 1024 * 1024

# Chunks a PNG may have up to its end chunk. Pixel data comes in chunks of 8 to 64 KB (a 50 MB
# file: under 7,000) and an animation adds two per frame; Pillow reads every chunk in Python and
# keeps each unknown one: 3 million empty chunks (36 MB) took 5.8 s and 415 MB.
MAX_PNG_CHUNKS = 100_000
_PNG_SIGNATURE_SIZE = 8
# Extension blocks, and the data sub-blocks they are made of, before a GIF's first picture (the
# one decoded). A comment or XMP packet takes one sub-block per 255 bytes or fewer (XMP's own
# trick makes its characters the sub-block lengths: about 80 bytes each), so 100,000 is 8 MB
# of metadata or more; Pillow reads them in Python: 5 million comments took 2.3 s and 0.9 GB.
MAX_GIF_BLOCKS = 100_000
_GIF_EXTENSION = 0x21
# Strips or tiles a TIFF's first picture may be split into. Writers use a strip per row or per
# 8 KB (an 8,000-row photo: 8,000 at most) or tiles of 256 x 256 (64 megapixels: about 1,000);
# Pillow lists every piece in Python: 4 million one-row strips (32 MB) took 16 s and 1.5 GB.
MAX_TIFF_PIECES = 100_000
# Strip and tile offsets and byte counts: each holds one value per piece.
_TIFF_PIECE_TAGS = (273, 279, 324, 325)


@dataclass
class _JpegLayout:
    """What a walk over a JPEG's markers found, up to its end marker or a limit."""

    sections: int = 0
    scans: int = 0
    stray_bytes: int = 0

    def within_limits(self) -> bool:
        return (
            self.sections <= MAX_JPEG_SECTIONS
            and self.scans <= MAX_JPEG_SCANS
            and self.stray_bytes <= MAX_JPEG_STRAY_BYTES
        )


def _jpeg_layout(data: bytes) -> _JpegLayout:
    """Count a JPEG's segments and scans, jumping over segment payloads by their lengths and
    over compressed data with one search, so the walk takes one step per segment and stops as
    soon as a limit is passed. A damaged layout just ends the walk: judging damage is the
    decoder's job."""
    layout = _JpegLayout()
    position = 2
    while layout.within_limits():
        marker = _JPEG_MARKER.search(data, position)
        if marker is None:
            break
        if layout.scans == 0:
            layout.stray_bytes += marker.start() - position
        code = data[marker.start() + 1]
        if code == _JPEG_END:
            break
        layout.sections += 1
        position = marker.end()
        if code in _JPEG_STANDALONE:
            continue
        position += int.from_bytes(data[position : position + 2], "big")
        if code == _JPEG_SCAN:
            layout.scans += 1
            scan_end = _JPEG_SCAN_END.search(data, position)
            if scan_end is None:
                break
            position = scan_end.start()
    return layout


def _too_many_sections(limit: int) -> RejectedImage:
    return RejectedImage(f"image file is split into too many sections (more than {limit})")


def _check_jpeg_layout(data: bytes) -> None:
    layout = _jpeg_layout(data)
    if layout.scans > MAX_JPEG_SCANS:
        raise RejectedImage(f"image is stored in too many progressive passes (more than {MAX_JPEG_SCANS})")
    if layout.sections > MAX_JPEG_SECTIONS:
        raise _too_many_sections(MAX_JPEG_SECTIONS)
    if layout.stray_bytes > MAX_JPEG_STRAY_BYTES:
        raise RejectedImage(CORRUPT_REASON)


def _png_chunk_count(data: bytes) -> int:
    """A PNG's chunks up to its end chunk, each skipped by its length, counting no further than
    one past the limit."""
    count, position = 0, _PNG_SIGNATURE_SIZE
    while position + 8 <= len(data) and count <= MAX_PNG_CHUNKS:
        count += 1
        if data[position + 4 : position + 8] == b"IEND":
            break
        position += 12 + int.from_bytes(data[position : position + 4], "big")
    return count


def _gif_blocks_before_picture(data: bytes) -> int:
    """A GIF's extension blocks and their sub-blocks before its first picture, each skipped by
    its length, counting no further than one past the limit."""
    flags = data[10] if len(data) > 10 else 0
    position = 13 + (3 << ((flags & 7) + 1) if flags & 0x80 else 0)  # header, global colours
    count = 0
    while position + 1 < len(data) and data[position] == _GIF_EXTENSION and count <= MAX_GIF_BLOCKS:
        count += 1
        position += 2  # introducer and label
        while position < len(data) and data[position] and count <= MAX_GIF_BLOCKS:
            count += 1
            position += data[position] + 1
        position += 1  # the empty sub-block that ends the extension
    return count


def _tiff_directory(data: bytes) -> np.ndarray:
    """The entries of a TIFF's first directory (the first picture's) as tag, type, count and
    value, in classic or BigTIFF layout; empty where they cannot be read."""
    order = "<" if data[:2] == b"II" else ">"
    big = data[2:4] in (b"+\x00", b"\x00+")
    entries_type = np.dtype(order + ("u8" if big else "u2"))
    entry = np.dtype(
        [
            ("tag", order + "u2"),
            ("type", order + "u2"),
            ("count", order + ("u8" if big else "u4")),
            ("value", "V8" if big else "V4"),
        ]
    )
    start = int.from_bytes(data[8:16] if big else data[4:8], "little" if order == "<" else "big")
    if start < 8 or start + entries_type.itemsize > len(data):
        return np.zeros(0, entry)
    declared = int(np.frombuffer(data, entries_type, 1, start)[0])
    first = start + entries_type.itemsize
    return np.frombuffer(data, entry, min(declared, (len(data) - first) // entry.itemsize), first)


def _tiff_pieces(data: bytes) -> int:
    """How many strips or tiles a TIFF's first picture is split into, as its directory says."""
    entries = _tiff_directory(data)
    counts = entries["count"][np.isin(entries["tag"], _TIFF_PIECE_TAGS)]
    return int(counts.max()) if counts.size else 0


def _precheck_structure(data: bytes, format_name: str) -> None:
    """Refuse a file whose layout alone would cost seconds to parse or decode, before opening."""
    if format_name == "JPEG":
        _check_jpeg_layout(data)
    elif format_name == "PNG" and _png_chunk_count(data) > MAX_PNG_CHUNKS:
        raise _too_many_sections(MAX_PNG_CHUNKS)
    elif format_name == "GIF" and _gif_blocks_before_picture(data) > MAX_GIF_BLOCKS:
        raise _too_many_sections(MAX_GIF_BLOCKS)
    elif format_name == "TIFF" and _tiff_pieces(data) > MAX_TIFF_PIECES:
        raise _too_many_sections(MAX_TIFF_PIECES)


# Pillow will not unpack more than 1 MB from one compressed PNG text or colour-profile chunk, nor
# 64 MB from them all (a small zlib bomb would unpack into gigabytes); its ValueError's message is
# the only thing that tells this refusal from damage.
_METADATA_LIMIT_MESSAGES = ("decompressed data too large", "too much memory used in text chunks")


def _pillow_reason(error: Exception) -> str:
    """The reason to give for an error Pillow raised while opening or decoding."""
    message = str(error).lower()
    if isinstance(error, ValueError) and any(hint in message for hint in _METADATA_LIMIT_MESSAGES):
        return METADATA_TOO_LARGE_REASON
    return CORRUPT_REASON


@contextmanager
def _pillow_errors(max_pixels: int) -> Iterator[None]:
    """Turn whatever Pillow raises on hostile input into a RejectedImage with a short reason.

    Pillow signals bad files with a zoo of types (OSError, SyntaxError, ValueError, EOFError,
    struct.error, zlib.error, IndexError...), so everything but MemoryError is translated;
    MemoryError propagates because it says something about the process, not about the file.

    Pillow's own DecompressionBombWarning is silenced here because the declared size is checked
    against `IngestSettings.max_pixels` right after opening, before any pixel is decoded; Pillow's
    UserWarnings about damaged metadata are silenced too, since that damage is either tolerated
    (EXIF) or becomes the rejection. Only "ignore" filters are ever installed, so even if threads
    race on the (process-wide) warning filters, the worst outcome elsewhere is a silenced
    warning, never a new exception.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            # "Corrupt EXIF data" and friends: the damage is handled (or reported) below.
            warnings.filterwarnings("ignore", category=UserWarning, module="PIL")
            yield
    except (RejectedImage, MemoryError):
        raise
    except Image.DecompressionBombError as error:
        limit = _pixel_limit_words(_effective_pixel_limit(max_pixels))
        raise RejectedImage(f"image is over the {limit}") from error
    except Exception as error:
        log.debug("Pillow rejected an image: %r", error)
        raise RejectedImage(_pillow_reason(error)) from error


def _draft_target(width: int, height: int, min_side: int) -> tuple[int, int]:
    """The size to ask a JPEG draft for so the longest side stays at least `min_side`.

    Pillow's draft keeps *both* sides at or above the requested box, so the box has the image's
    aspect ratio, scaled so that its longest side is `min_side`.
    """
    longest = max(width, height)
    return (
        max(1, math.ceil(width * min_side / longest)),
        max(1, math.ceil(height * min_side / longest)),
    )


def _maybe_draft(image: Image.Image, format_name: str, min_side: int) -> None:
    """Let libjpeg decode at 1/2, 1/4 or 1/8 scale when the caller needs far fewer pixels.

    This is where most of the time of a big phone photo goes, and the IDCT scaling is close to
    free in quality at the sizes CLIP and thumbnails need.
    """
    if format_name != "JPEG" or min_side <= 0:
        return
    width, height = image.size
    if max(width, height) >= 2 * min_side:
        image.draft("RGB", _draft_target(width, height, min_side))


def _apply_orientation(image: Image.Image) -> None:
    """Rotate in place as the EXIF orientation says; broken EXIF means "leave it as stored".

    A photo whose metadata is damaged is still a good photo, so EXIF problems never reject it.
    In place, because `exif_transpose` otherwise returns a copy of every photo that needs no
    turning (most of them): 3 MB of pixels copied for nothing at 1024x768.
    """
    try:
        ImageOps.exif_transpose(image, in_place=True)
    except Exception as error:  # noqa: BLE001 - corrupt EXIF must not cost the picture
        log.debug("ignoring unreadable EXIF orientation: %r", error)


def _detached(image: Image.Image) -> Image.Image:
    """A plain `Image` with the picture's pixels, tied to neither the file nor its frames.

    An `ImageFile` keeps the input (and, for animations, the means to seek other frames); the
    rest of Shoebox should hold only pixels. Pillow 11.2+ can hand the same pixel memory to a
    new image through its Arrow export, so nothing is copied; older versions, and pictures
    over Pillow's 16 MB block size (whose rows are not in one piece), get a copy. The shared
    image is read-only to Pillow: anything that would write to it copies first.
    """
    if not isinstance(image, ImageFile.ImageFile):
        return image
    fromarrow = getattr(Image, "fromarrow", None)
    if fromarrow is not None:
        try:
            return fromarrow(image, image.mode, image.size)
        except ValueError:
            pass
    return image.copy()


def _scale_to_uint8(values: np.ndarray, low: float, high: float) -> np.ndarray:
    """Map [low, high] linearly onto [0, 255], rounding, for data wider than 8 bits."""
    if high <= low:
        return np.zeros(values.shape, dtype=np.uint8)
    scaled = (values.astype(np.float32) - np.float32(low)) * np.float32(255.0 / (high - low))
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def _wide_range(mode: str, values: np.ndarray) -> tuple[float, float]:
    """The range that maps to black..white for 16-bit, 32-bit integer and float images.

    16-bit data uses its nominal 0..65535 range, so a dark 16-bit photo stays dark. 32-bit
    integer data (how older Pillow versions open 16-bit PNGs) uses 8- or 16-bit range when the
    values fit it, and float data in 0..1 is treated as normalised; anything else is stretched
    between its own minimum and maximum.
    """
    if mode in _SIXTEEN_BIT_MODES:
        return 0.0, 65535.0
    low, high = float(values.min()), float(values.max())
    if mode == "I" and low >= 0 and high <= 255:
        return 0.0, 255.0
    if mode == "I" and low >= 0 and high <= 65535:
        return 0.0, 65535.0
    if mode == "F" and low >= 0 and high <= 1:
        return 0.0, 1.0
    return low, high


def _wide_to_rgb(image: Image.Image) -> Image.Image:
    """Greyscale deeper than 8 bits to RGB; Pillow's own convert() clips instead of scaling.

    A grey value marked transparent (a 16-bit PNG's colour key) becomes white, as it does in
    8-bit pictures, rather than whatever grey it stands for.
    """
    values = np.asarray(image)
    if values.dtype.kind == "f":
        values = np.nan_to_num(values, nan=0.0, posinf=0.0, neginf=0.0)
    low, high = _wide_range(image.mode, values)
    grey = _scale_to_uint8(values, low, high)
    key = image.info.get("transparency")
    if isinstance(key, int):
        grey[values == key] = 255
    return Image.fromarray(grey).convert("RGB")


def _has_transparency(image: Image.Image) -> bool:
    """Alpha band, a transparent palette entry / colour key, or a palette with alpha."""
    return image.mode in _ALPHA_MODES or image.has_transparency_data


def _onto_white(image: Image.Image) -> Image.Image:
    """Composite over white: transparent logos and stickers are drawn on light backgrounds."""
    if image.mode == "La":
        image = image.convert("LA")
    rgba = image.convert("RGBA")
    background = Image.new("RGBA", rgba.size, _WHITE)
    return Image.alpha_composite(background, rgba).convert("RGB")


def to_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow mode to plain 8-bit RGB, scaling deep data and flattening alpha onto white."""
    if image.mode == "RGB" and "transparency" not in image.info:
        return image
    if image.mode in _WIDE_MODES:
        return _wide_to_rgb(image)
    if _has_transparency(image):
        return _onto_white(image)
    return image.convert("RGB")


def _swapped_axes(before: tuple[int, int], after: tuple[int, int]) -> bool:
    """Whether rotating for EXIF exchanged width and height (a square never 'swaps')."""
    return before != after and before == (after[1], after[0])


def _decode_opened(
    image: Image.Image, format_name: str, limits: IngestSettings, min_side: int
) -> DecodedImage:
    """Steps after Image.open: size check, optional draft, decode, orientation, colour."""
    width, height = image.size
    _check_dimensions(width, height, limits.max_pixels)
    _maybe_draft(image, format_name, min_side)
    image.load()
    loaded_size = image.size
    if loaded_size[0] <= 0 or loaded_size[1] <= 0:
        raise RejectedImage(f"image has no pixels ({loaded_size[0]}x{loaded_size[1]})")
    _apply_orientation(image)
    if _swapped_axes(loaded_size, image.size):
        width, height = height, width
    return DecodedImage(image=_detached(to_rgb(image)), width=width, height=height, format=format_name)


def decode_image(data: bytes, limits: IngestSettings, *, min_side: int = 0) -> DecodedImage:
    """Decode untrusted bytes into an RGB image, or raise RejectedImage saying why not.

    `min_side` is the smallest longest side the caller will use (for example the thumbnail
    size); big JPEGs are then decoded at a reduced scale that still meets it. 0 decodes at full
    size. Animated images give their first frame.
    """
    if min_side < 0:
        raise ValueError(f"min_side must be >= 0, got {min_side}")
    _check_file_size(len(data), limits.max_file_bytes)
    format_name = sniff_format(data)
    if format_name is None:
        raise RejectedImage(describe_non_image(data))
    _precheck_declared_size(data, format_name, limits.max_pixels)
    _precheck_structure(data, format_name)
    with _pillow_errors(limits.max_pixels):
        with Image.open(io.BytesIO(data), formats=[format_name]) as image:
            return _decode_opened(image, format_name, limits, min_side)


def decode_file(path: Path, limits: IngestSettings, *, min_side: int = 0) -> DecodedImage:
    """`read_limited` then `decode_image`: the whole ingest check for a file on disk."""
    return decode_image(read_limited(path, limits.max_file_bytes), limits, min_side=min_side)


# --------------------------------------------------------------------------------------------
# Thumbnails.
# --------------------------------------------------------------------------------------------


def thumbnail_of(image: Image.Image, max_side: int) -> Image.Image:
    """The picture to keep as the stored copy: RGB, no larger than `max_side` on its longest
    side. Images are only ever shrunk; one that already fits is returned as it is (in RGB)."""
    if max_side < 1:
        raise ValueError(f"max_side must be >= 1, got {max_side}")
    thumb = to_rgb(image)
    if max(thumb.size) > max_side:
        thumb = thumb.copy() if thumb is image else thumb
        thumb.thumbnail((max_side, max_side), Image.Resampling.LANCZOS, reducing_gap=3.0)
    return thumb


def save_thumbnail(thumb: Image.Image, target: BinaryIO) -> None:
    """Write a stored copy as JPEG, without any of the source's metadata.

    Thumbnails are served back to chat and must not leak where a photo was taken: EXIF (GPS
    position), ICC and XMP are only written when passed to `save`, and the comment, which
    Pillow would otherwise copy from the source, is set empty. Given a real file, Pillow encodes
    without holding the GIL (1 ms for a 768-px copy that other threads need not wait out).
    """
    thumb.save(target, "JPEG", quality=THUMBNAIL_QUALITY, comment=b"")


__all__ = [
    "CORRUPT_REASON",
    "METADATA_TOO_LARGE_REASON",
    "THUMBNAIL_EXTENSION",
    "DecodedImage",
    "RejectedImage",
    "decode_file",
    "decode_image",
    "declared_size",
    "describe_non_image",
    "read_limited",
    "save_thumbnail",
    "sniff_format",
    "thumbnail_of",
    "to_rgb",
    "too_large_reason",
]
