"""Write a corpus of hostile, broken and awkward image files, each labelled with what should happen.

    python bench/hostile_corpus.py OUT_DIR [--seed S]

Nothing is downloaded: every file is built here from Pillow, numpy, zlib and hand-written
headers, so the corpus is reproducible from the seed alone. Each file is labelled "indexed" (a
valid picture, however odd) or "rejected" (must be refused with a reason, quickly and without a
large allocation), under the limits `CORPUS_MAX_FILE_BYTES` and `CORPUS_MAX_PIXELS`.

Files are grouped in one sub-folder per kind; the file names themselves are part of the test
(path-traversal lookalikes, emoji, right-to-left marks, names at the file-system length limit),
and every file is checked to land inside OUT_DIR.
"""

from __future__ import annotations

import argparse
import gzip
import io
import os
import random
import struct
import sys
import zipfile
import zlib
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, features

# The limits the labels assume. A store configured with other limits will disagree on the
# files built around these numbers (the "size_limit" and "bomb" kinds), and only on those.
CORPUS_MAX_FILE_BYTES = 2 * 1024 * 1024
CORPUS_MAX_PIXELS = 64_000_000

INDEXED = "indexed"
REJECTED = "rejected"


@dataclass(frozen=True)
class CorpusFile:
    """One generated file: where it is, what kind of hostility it is, and the expected outcome."""

    path: Path
    kind: str
    expect: str
    note: str = ""


# --------------------------------------------------------------------------------------------
# Small builders for picture content.
# --------------------------------------------------------------------------------------------


def _encode(image: Image.Image, fmt: str, **params: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **params)
    return buffer.getvalue()


def _photo(width: int, height: int, seed: int) -> Image.Image:
    """A smooth, slightly noisy RGB picture: compresses like a photo, not like flat colour."""
    rng = np.random.default_rng(seed)
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    red = 255 * xs / max(width - 1, 1)
    green = 255 * ys / max(height - 1, 1)
    blue = 127 + 100 * np.sin((xs + ys) / 9.0)
    pixels = np.stack([red, green, blue], axis=-1) + rng.normal(0, 6, (height, width, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def _noise(width: int, height: int, seed: int) -> Image.Image:
    """Incompressible RGB noise, for files that must be big in bytes."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def _solid(colour: tuple[int, ...], size: tuple[int, int] = (16, 16), mode: str = "RGB") -> Image.Image:
    return Image.new(mode, size, colour)


def _quadrants(width: int, height: int) -> Image.Image:
    """Four flat colours (red, green / blue, white), so any rotation is visible."""
    image = Image.new("RGB", (width, height))
    half_w, half_h = width // 2, height // 2
    image.paste((255, 0, 0), (0, 0, half_w, half_h))
    image.paste((0, 255, 0), (half_w, 0, width, half_h))
    image.paste((0, 0, 255), (0, half_h, half_w, height))
    image.paste((255, 255, 255), (half_w, half_h, width, height))
    return image


# --------------------------------------------------------------------------------------------
# Hand-made containers: PNG chunks, a raw TIFF, JPEG segment surgery.
# --------------------------------------------------------------------------------------------

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def png_chunk(kind: bytes, payload: bytes) -> bytes:
    """A PNG chunk with a correct CRC, so the only defect is the one we put in on purpose."""
    crc = zlib.crc32(kind + payload) & 0xFFFFFFFF
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", crc)


def png_ihdr(width: int, height: int, bit_depth: int = 8, colour_type: int = 2) -> bytes:
    return png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0))


def png_from_rows(width: int, height: int, bit_depth: int, colour_type: int, rows: Iterable[bytes]) -> bytes:
    """A PNG whose IDAT is streamed from `rows` (each without its filter byte)."""
    compressor = zlib.compressobj(9)
    parts = [compressor.compress(b"\x00" + row) for row in rows]
    parts.append(compressor.flush())
    return b"".join(
        (
            PNG_SIGNATURE,
            png_ihdr(width, height, bit_depth, colour_type),
            png_chunk(b"IDAT", b"".join(parts)),
            png_chunk(b"IEND", b""),
        )
    )


def png_chunks(data: bytes) -> list[tuple[bytes, int, int]]:
    """(type, offset of the chunk, payload length) for each chunk of a PNG."""
    chunks = []
    position = len(PNG_SIGNATURE)
    while position + 8 <= len(data):
        length, kind = struct.unpack(">I4s", data[position : position + 8])
        chunks.append((kind, position, length))
        position += 12 + length
    return chunks


def _png_idat_span(data: bytes) -> tuple[int, int]:
    """Start and end of the compressed pixel data (first IDAT payload .. last IDAT payload)."""
    idats = [(offset, length) for kind, offset, length in png_chunks(data) if kind == b"IDAT"]
    return idats[0][0] + 8, idats[-1][0] + 8 + idats[-1][1]


def _replace_png_chunk(data: bytes, kind: bytes, payload: bytes) -> bytes:
    """Swap the payload of the first `kind` chunk, keeping the CRC correct."""
    for chunk_kind, offset, length in png_chunks(data):
        if chunk_kind == kind:
            return data[:offset] + png_chunk(kind, payload) + data[offset + 12 + length :]
    raise ValueError(f"no {kind!r} chunk")


def tiff_header_only(width: int, height: int) -> bytes:
    """A little-endian greyscale TIFF that declares `width` x `height` and holds one strip byte."""
    entries = [
        (256, 4, 1, width),  # ImageWidth (LONG)
        (257, 4, 1, height),  # ImageLength
        (258, 3, 1, 8),  # BitsPerSample
        (259, 3, 1, 1),  # Compression: none
        (262, 3, 1, 1),  # Photometric: black is zero
        (273, 4, 1, 8),  # StripOffsets: right after the header
        (277, 3, 1, 1),  # SamplesPerPixel
        (278, 4, 1, height),  # RowsPerStrip
        (279, 4, 1, 1),  # StripByteCounts
    ]
    ifd_offset = 8 + 2  # header, then 2 bytes of "pixel data"
    header = b"II*\x00" + struct.pack("<I", ifd_offset) + b"\x00\x00"
    body = struct.pack("<H", len(entries))
    for tag, kind, count, value in entries:
        packed = struct.pack("<H", value) + b"\x00\x00" if kind == 3 else struct.pack("<I", value)
        body += struct.pack("<HHI", tag, kind, count) + packed
    return header + body + struct.pack("<I", 0)



def tiff_of_one_row_strips(width: int, height: int, order: str = "<", big: bool = False) -> bytes:
    """A greyscale TIFF stored as one strip per row (classic or BigTIFF, little- or big-endian
    by `order`), every strip pointing at the same row of pixels."""
    # BigTIFF has 8-byte counts, values and directory size, and strips listed as LONG8.
    size, number, piece_kind, fields_format = (8, "Q", 16, "Q") if big else (4, "I", 4, "H")

    def entry(tag: int, kind: int, count: int, value: int) -> bytes:
        packed = struct.pack(order + {3: "H", 4: "I", 16: "Q"}[kind], value).ljust(size, b"\x00")
        return struct.pack(f"{order}HH{number}", tag, kind, count) + packed

    header = (b"II" if order == "<" else b"MM") + (
        struct.pack(f"{order}HHHQ", 43, 8, 0, 16) if big else struct.pack(f"{order}HI", 42, 8)
    )
    fields = 9
    offsets_at = len(header) + struct.calcsize(fields_format) + fields * (4 + 2 * size) + size
    counts_at = offsets_at + size * height
    pixels_at = counts_at + size * height
    entries = [
        entry(256, 4, 1, width),  # ImageWidth
        entry(257, 4, 1, height),  # ImageLength
        entry(258, 3, 1, 8),  # BitsPerSample
        entry(259, 3, 1, 1),  # Compression: none
        entry(262, 3, 1, 1),  # Photometric: black is zero
        entry(273, piece_kind, height, offsets_at if height > 1 else pixels_at),  # StripOffsets
        entry(277, 3, 1, 1),  # SamplesPerPixel
        entry(278, 4, 1, 1),  # RowsPerStrip
        entry(279, piece_kind, height, counts_at if height > 1 else width),  # StripByteCounts
    ]
    directory = struct.pack(order + fields_format, fields) + b"".join(entries) + bytes(size)
    strips = struct.pack(f"{order}{height}{number}", *[pixels_at] * height)
    strips += struct.pack(f"{order}{height}{number}", *[width] * height)
    return header + directory + strips + bytes(i % 256 for i in range(width))


_STANDALONE_MARKERS = {0xD8, 0xD9, 0x01} | set(range(0xD0, 0xD8))


def jpeg_segments(data: bytes) -> list[tuple[int, int, int]]:
    """(marker, offset of the 0xFF, segment length incl. its length field) up to and incl. SOS."""
    segments = []
    position = 2
    while position + 4 <= len(data) and data[position] == 0xFF:
        marker = data[position + 1]
        if marker in _STANDALONE_MARKERS:
            position += 2
            continue
        length = struct.unpack(">H", data[position + 2 : position + 4])[0]
        segments.append((marker, position, length))
        if marker == 0xDA:
            break
        position += 2 + length
    return segments


def _jpeg_segment(data: bytes, marker: int) -> tuple[int, int]:
    for found, offset, length in jpeg_segments(data):
        if found == marker:
            return offset, length
    raise ValueError(f"no marker {marker:#x}")


def _jpeg_sof_offset(data: bytes) -> int:
    """Offset of the precision byte of the (baseline or progressive) frame header."""
    for marker in (0xC0, 0xC1, 0xC2):
        try:
            return _jpeg_segment(data, marker)[0] + 4
        except ValueError:
            continue
    raise ValueError("no SOF segment")


def _scan_data_end(data: bytes, start: int) -> int:
    """Where the entropy-coded data starting at `start` ends (at the next real marker).

    Inside entropy data 0xFF is always followed by 0x00 (byte stuffing) or a restart marker,
    so the first 0xFF followed by anything else ends the scan.
    """
    position = start
    while True:
        position = data.index(b"\xff", position)
        follower = data[position + 1]
        if follower != 0x00 and not 0xD0 <= follower <= 0xD7:
            return position
        position += 2


def _jpeg_scan_span(data: bytes) -> tuple[int, int]:
    """Start and end of the entropy-coded data of the first scan (up to the next real marker)."""
    offset, length = _jpeg_segment(data, 0xDA)
    start = offset + 2 + length
    return start, _scan_data_end(data, start)


def jpeg_scans(data: bytes) -> list[tuple[int, int]]:
    """(offset of the SOS marker, end of its entropy data) for every scan of a JPEG."""
    scans = []
    position = 2
    while position + 4 <= len(data) and data[position] == 0xFF and data[position + 1] != 0xD9:
        if data[position + 1] in _STANDALONE_MARKERS:
            position += 2
            continue
        end = position + 2 + struct.unpack(">H", data[position + 2 : position + 4])[0]
        if data[position + 1] == 0xDA:
            end = _scan_data_end(data, end)
            scans.append((position, end))
        position = end
    return scans


def jpeg_repeating_a_pass(data: bytes, copies: int) -> bytes:
    """A progressive JPEG with its first AC pass (a scan whose spectral start Ss is above 0)
    repeated `copies` more times before the end marker: still a picture libjpeg decodes, one
    whole-picture pass per copy."""
    for start, end in jpeg_scans(data):
        components = data[start + 4]
        if data[start + 5 + 2 * components] > 0:
            end_marker = data.rindex(b"\xff\xd9")
            return data[:end_marker] + data[start:end] * copies + data[end_marker:]
    raise ValueError("no AC scan: not a progressive JPEG")


def _patch(data: bytes, offset: int, replacement: bytes) -> bytes:
    return data[:offset] + replacement + data[offset + len(replacement) :]


def _set_jpeg_size(data: bytes, width: int, height: int) -> bytes:
    sof = _jpeg_sof_offset(data)
    return _patch(data, sof + 1, struct.pack(">HH", height, width))


def _gif_image_descriptor(data: bytes) -> int:
    """Offset of the first image descriptor (0x2C) of a GIF written by Pillow."""
    flags = data[10]
    position = 13 + (3 * 2 ** ((flags & 7) + 1) if flags & 0x80 else 0)
    while data[position] == 0x21:  # skip extensions
        position += 2
        while data[position]:
            position += data[position] + 1
        position += 1
    if data[position] != 0x2C:
        raise ValueError("no image descriptor")
    return position


def _webp_chunk(fourcc: bytes, payload: bytes) -> bytes:
    padding = b"\x00" if len(payload) % 2 else b""
    return fourcc + struct.pack("<I", len(payload)) + payload + padding


def _riff(body: bytes) -> bytes:
    return b"RIFF" + struct.pack("<I", 4 + len(body)) + b"WEBP" + body


def _webp_canvas_bomb(width: int, height: int) -> bytes:
    """A VP8X header declaring a huge canvas around a real 8x8 lossless frame."""
    small = _encode(_solid((10, 20, 30), (8, 8)), "WEBP", lossless=True)
    vp8l = small[12:]
    flags = b"\x00\x00\x00\x00"
    vp8x = flags + (width - 1).to_bytes(3, "little") + (height - 1).to_bytes(3, "little")
    return _riff(_webp_chunk(b"VP8X", vp8x) + vp8l)


def _webp_vp8l_size(data: bytes, width: int, height: int) -> bytes:
    """Rewrite the 14-bit width/height fields of a simple lossless WebP."""
    bits = int.from_bytes(data[21:25], "little")
    bits = (bits & ~0xFFFFFFF) | (width - 1) | ((height - 1) << 14)
    return _patch(data, 21, bits.to_bytes(4, "little"))


# --------------------------------------------------------------------------------------------
# The corpus, kind by kind. Each builder yields (file name, bytes, expect, note).
# --------------------------------------------------------------------------------------------

Entry = tuple[str, bytes, str, str]


def _bombs(seed: int) -> Iterable[Entry]:
    """Huge declared dimensions with tiny bodies: must be refused before any pixel is decoded."""
    tiny_idat = png_chunk(b"IDAT", zlib.compress(b"\x00" * 64))
    for width, height, depth, colour in (
        (100_000, 100_000, 8, 2),
        (65_535, 65_535, 1, 0),
        (2_147_483_647, 1, 8, 0),
        (1, 2_147_483_647, 8, 0),
        (30_000, 30_000, 16, 6),
        (8_001, 8_000, 8, 2),
    ):
        data = PNG_SIGNATURE + png_ihdr(width, height, depth, colour) + tiny_idat + png_chunk(b"IEND", b"")
        yield f"png_ihdr_{width}x{height}.png", data, REJECTED, "PNG header declares huge size"
    zero_row = bytes((10_000 + 7) // 8)
    complete = png_from_rows(10_000, 10_000, 1, 0, (zero_row for _ in range(10_000)))
    yield "png_complete_10000x10000_1bit.png", complete, REJECTED, "complete, valid 100-megapixel PNG in KBs"
    gif = _encode(_solid((200, 0, 0), (1, 1)), "GIF")
    for width, height in ((65_535, 65_535), (20_000, 20_000), (65_535, 1_000)):
        screen = _patch(gif, 6, struct.pack("<HH", width, height))
        yield f"gif_screen_{width}x{height}.gif", screen, REJECTED, "GIF logical screen"
    descriptor = _gif_image_descriptor(gif)
    extent = _patch(gif, descriptor + 1, struct.pack("<HHHH", 60_000, 60_000, 5_000, 5_000))
    yield "gif_frame_extent_65000x65000.gif", extent, REJECTED, "GIF frame placed far outside the screen"
    jpeg = _encode(_photo(16, 16, seed), "JPEG")
    for width, height in ((65_500, 65_500), (60_000, 2_000)):
        yield f"jpeg_sof_{width}x{height}.jpg", _set_jpeg_size(jpeg, width, height), REJECTED, "JPEG frame header"
    yield "webp_vp8x_16384x16384.webp", _webp_canvas_bomb(16_384, 16_384), REJECTED, "WebP canvas"
    yield "webp_vp8x_12000x12000.webp", _webp_canvas_bomb(12_000, 12_000), REJECTED, "WebP canvas"
    lossless = _encode(_solid((1, 2, 3), (8, 8)), "WEBP", lossless=True)
    yield "webp_vp8l_16384x16384.webp", _webp_vp8l_size(lossless, 16_384, 16_384), REJECTED, "WebP lossless header"
    bmp = _encode(_solid((0, 0, 0), (4, 4)), "BMP")
    yield "bmp_50000x50000.bmp", _patch(bmp, 18, struct.pack("<ii", 50_000, 50_000)), REJECTED, "BMP header"
    yield "tiff_100000x100000.tif", tiff_header_only(100_000, 100_000), REJECTED, "TIFF tags"


def _cut_points(start: int, end: int, count: int) -> list[int]:
    """`count` distinct offsets spread over [start, start + 0.9 * (end - start)]."""
    span = max(1, int((end - start) * 0.9))
    points = sorted({start + span * i // max(count - 1, 1) for i in range(count)})
    return [max(1, p) for p in points]


def _truncated(seed: int) -> Iterable[Entry]:
    """Files cut short, from inside the header to near the end of the pixel data."""
    photo = _photo(96, 64, seed)
    jpeg = _encode(photo, "JPEG", quality=90)
    png = _encode(photo, "PNG")
    gif = _encode(photo.convert("P"), "GIF")
    webp_lossy = _encode(photo, "WEBP", quality=80)
    webp_lossless = _encode(photo, "WEBP", lossless=True)
    descriptor = _gif_image_descriptor(gif)
    spans = {
        "jpeg": (jpeg, ".jpg", 1, len(jpeg) - 2),
        "png": (png, ".png", 1, _png_idat_span(png)[1]),
        "gif": (gif, ".gif", 1, len(gif) - 3),
        "webp_lossy": (webp_lossy, ".webp", 1, len(webp_lossy) - 1),
        "webp_lossless": (webp_lossless, ".webp", 1, len(webp_lossless) - 1),
    }
    for name, (data, suffix, start, end) in spans.items():
        for cut in _cut_points(start, end, 10):
            yield f"{name}_cut_at_{cut}{suffix}", data[:cut], REJECTED, f"{name} cut to {cut} of {len(data)} bytes"
    yield "gif_header_only.gif", gif[:descriptor], REJECTED, "GIF with no image"
    yield "gif_descriptor_only.gif", gif[: descriptor + 10], REJECTED, "GIF image descriptor without data"
    yield "png_signature_only.png", PNG_SIGNATURE, REJECTED, "PNG signature only"
    yield "jpeg_soi_only.jpg", b"\xff\xd8\xff", REJECTED, "JPEG start marker only"
    yield "webp_riff_only.webp", b"RIFF\x00\x00\x00\x00WEBP", REJECTED, "WebP container header only"


def _corrupt(seed: int) -> Iterable[Entry]:
    """Targeted damage to headers and compressed streams that no decoder can recover from."""
    photo = _photo(64, 48, seed + 1)
    jpeg = _encode(photo, "JPEG", quality=90)
    sof = _jpeg_sof_offset(jpeg)
    yield "jpeg_precision_7.jpg", _patch(jpeg, sof, b"\x07"), REJECTED, "invalid sample precision"
    yield "jpeg_zero_components.jpg", _patch(jpeg, sof + 5, b"\x00"), REJECTED, "frame with no components"
    sos, _ = _jpeg_segment(jpeg, 0xDA)
    yield "jpeg_sos_bad_component.jpg", _patch(jpeg, sos + 5, b"\x09"), REJECTED, "scan names a missing component"
    dht, _ = _jpeg_segment(jpeg, 0xC4)
    yield "jpeg_dht_bogus_counts.jpg", _patch(jpeg, dht + 5, b"\xff" * 16), REJECTED, "Huffman table counts > 256"
    dqt, _ = _jpeg_segment(jpeg, 0xDB)
    yield "jpeg_dqt_length_zero.jpg", _patch(jpeg, dqt + 2, b"\x00\x00"), REJECTED, "bogus marker length"
    yield "jpeg_soi_eoi.jpg", b"\xff\xd8\xff\xd9", REJECTED, "no frame at all"
    noise_after_sof = jpeg[:sof] + bytes(range(256)) * 4
    yield "jpeg_headers_then_garbage.jpg", noise_after_sof, REJECTED, "frame header replaced by noise"

    png = _encode(photo, "PNG")
    flipped_ihdr = bytearray(png)
    flipped_ihdr[len(PNG_SIGNATURE) + 8 + 3] ^= 0x5A
    yield "png_ihdr_crc_mismatch.png", bytes(flipped_ihdr), REJECTED, "IHDR byte flipped, CRC no longer matches"
    ihdr = struct.pack(">IIBBBBB", 64, 48, 7, 2, 0, 0, 0)
    yield "png_bit_depth_7.png", _replace_png_chunk(png, b"IHDR", ihdr), REJECTED, "impossible bit depth"
    ihdr = struct.pack(">IIBBBBB", 64, 48, 8, 5, 0, 0, 0)
    yield "png_colour_type_5.png", _replace_png_chunk(png, b"IHDR", ihdr), REJECTED, "impossible colour type"
    start, end = _png_idat_span(png)
    yield "png_idat_not_zlib.png", _patch(png, start, b"\xff\xff\xff\xff"), REJECTED, "IDAT is not a zlib stream"
    yield "png_no_idat.png", PNG_SIGNATURE + png_ihdr(64, 48) + png_chunk(b"IEND", b""), REJECTED, "no pixel data"
    raw = b"".join(b"\x07" + bytes(8) for _ in range(8))  # filter type 7 does not exist
    bad_filter = _replace_png_chunk(png_from_rows(8, 8, 8, 0, []), b"IDAT", zlib.compress(raw))
    yield "png_bad_filter_type.png", bad_filter, REJECTED, "row filter type 7"
    huge_chunk = PNG_SIGNATURE + png_ihdr(8, 8) + struct.pack(">I", 0x7FFFFFF0) + b"IDAT" + bytes(32)
    yield "png_chunk_length_2gb.png", huge_chunk, REJECTED, "chunk claims 2 GB"

    gif = _encode(photo.convert("P"), "GIF")
    descriptor = _gif_image_descriptor(gif)
    code_size_at = descriptor + 10
    if gif[descriptor + 9] & 0x80:
        code_size_at += 3 * 2 ** ((gif[descriptor + 9] & 7) + 1)
    yield "gif_lzw_code_size_15.gif", _patch(gif, code_size_at, b"\x0f"), REJECTED, "LZW minimum code size 15"
    garbage = bytes([255]) + bytes(random.Random(seed).randrange(256) for _ in range(255))
    yield "gif_lzw_garbage.gif", gif[: code_size_at + 1] + garbage + b"\x00\x3b", REJECTED, "LZW data is noise"
    yield "gif_bad_separator.gif", _patch(gif, descriptor, b"\x99"), REJECTED, "unknown block type"

    lossy = _encode(photo, "WEBP", quality=80)
    yield "webp_vp8_start_code.webp", _patch(lossy, 23, b"\x00\x00\x00"), REJECTED, "VP8 start code destroyed"
    yield "webp_unknown_chunk.webp", _patch(lossy, 12, b"XXXX"), REJECTED, "image chunk renamed"
    lossless = _encode(photo, "WEBP", lossless=True)
    yield "webp_vp8l_signature.webp", _patch(lossless, 20, b"\x00"), REJECTED, "VP8L signature byte"
    yield "webp_riff_size_huge.webp", _patch(lossy, 4, b"\xff\xff\xff\x7f"), REJECTED, "RIFF size larger than file"


def _flip_scan_bytes(data: bytes, rng: random.Random, flips: int) -> bytes:
    """Flip bytes inside JPEG entropy data without creating or destroying a marker."""
    start, end = _jpeg_scan_span(data)
    damaged = bytearray(data)
    done = 0
    while done < flips:
        i = rng.randrange(start + 1, end - 1)
        new = damaged[i] ^ rng.choice((0x01, 0x10, 0x55, 0x0F))
        if 0xFF in (damaged[i], damaged[i - 1], new):
            continue
        damaged[i] = new
        done += 1
    return bytes(damaged)


def _corrupt_scan(seed: int) -> Iterable[Entry]:
    """JPEGs with flipped bits in the compressed pixels: libjpeg conceals the damage.

    The picture comes out garbled but complete, exactly as browsers show it, so these are
    expected to be indexed: refusing them would refuse many slightly damaged real uploads.
    """
    rng = random.Random(seed)
    for progressive in (False, True):
        data = _encode(_photo(128, 96, seed + 2), "JPEG", quality=85, progressive=progressive)
        label = "progressive" if progressive else "baseline"
        for flips in (1, 4, 16, 64):
            damaged = _flip_scan_bytes(data, rng, flips)
            yield f"jpeg_{label}_{flips}_flips.jpg", damaged, INDEXED, "entropy data damaged, markers intact"


def _empty(seed: int) -> Iterable[Entry]:
    for suffix in (".jpg", ".png", ".gif", ".webp", ""):
        yield f"empty{suffix}", b"", REJECTED, "0 bytes"


def _wrong_extension(seed: int) -> Iterable[Entry]:
    """Valid pictures whose names lie about the format: the content decides."""
    photo = _photo(48, 32, seed + 3)
    yield "really_png.jpg", _encode(photo, "PNG"), INDEXED, "PNG named .jpg"
    yield "really_jpeg.png", _encode(photo, "JPEG"), INDEXED, "JPEG named .png"
    yield "really_gif.jpg", _encode(photo.convert("P"), "GIF"), INDEXED, "GIF named .jpg"
    yield "really_webp.jpg", _encode(photo, "WEBP"), INDEXED, "WebP named .jpg"
    yield "really_jpeg.webp", _encode(photo, "JPEG"), INDEXED, "JPEG named .webp"
    yield "really_jpeg.txt", _encode(photo, "JPEG"), INDEXED, "JPEG named .txt"
    yield "really_bmp.jpg", _encode(photo, "BMP"), INDEXED, "BMP named .jpg"
    yield "really_tiff.png", _encode(photo, "TIFF"), INDEXED, "TIFF named .png"
    yield "no_extension", _encode(photo, "JPEG"), INDEXED, "no extension at all"
    yield "SHOUTING.JPEG", _encode(photo, "JPEG"), INDEXED, "upper-case extension"


def _zip_of(files: dict[str, bytes]) -> bytes:
    """A ZIP archive with fixed timestamps, so the corpus is byte-for-byte reproducible."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, payload in files.items():
            archive.writestr(zipfile.ZipInfo(name, date_time=(2020, 1, 1, 0, 0, 0)), payload)
    return buffer.getvalue()


_HTML = (
    b"<!DOCTYPE html>\n<html><head><title>403 Forbidden</title></head>\n"
    b"<body><h1>Forbidden</h1><p>You don't have permission to access this resource.</p></body></html>\n"
)

_PDF = (
    b"%PDF-1.4\n1 0 obj << /Type /Catalog /Pages 2 0 R >> endobj\n"
    b"2 0 obj << /Type /Pages /Kids [] /Count 0 >> endobj\ntrailer << /Root 1 0 R >>\n%%EOF\n"
)


def _not_images(seed: int) -> Iterable[Entry]:
    """Things that are not pictures at all, all wearing a .jpg name."""
    rng = np.random.default_rng(seed)
    yield "error_page.jpg", _HTML, REJECTED, "HTML error page saved as the picture"
    yield "html_with_bom.jpg", b"\xef\xbb\xbf  \n\n" + _HTML.lower(), REJECTED, "HTML after a BOM and blank lines"
    yield "html_fragment.jpg", b"<div class='photo'><img src='x.jpg'></div>", REJECTED, "HTML fragment"
    yield "plain_text.jpg", b"This is definitely a photo of my cat.\n" * 20, REJECTED, "text"
    yield "bm_text.jpg", b"BMW 3 series, photos attached\n" * 4, REJECTED, "text starting with BMP magic 'BM'"
    yield "json.jpg", b'{"error": "rate limited", "retry_after": 3.5}', REJECTED, "JSON"
    yield "xml.jpg", b'<?xml version="1.0"?><note><to>you</to></note>', REJECTED, "XML"
    svg = b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"><rect width="10" height="10"/></svg>'
    yield "drawing.jpg", svg, REJECTED, "SVG"
    yield "archive.jpg", _zip_of({"a.txt": b"hello"}), REJECTED, "ZIP"
    yield "document.jpg", _PDF, REJECTED, "PDF"
    yield "compressed.jpg", gzip.compress(b"x" * 1000, mtime=0), REJECTED, "gzip"
    yield "program.jpg", b"\x7fELF\x02\x01\x01" + bytes(120), REJECTED, "ELF executable"
    yield "windows_program.jpg", b"MZ\x90\x00" + bytes(124), REJECTED, "PE executable"
    mp4 = struct.pack(">I", 24) + b"ftypisom" + b"\x00\x00\x02\x00isomiso2" + struct.pack(">I", 8) + b"mdat"
    yield "video.jpg", mp4, REJECTED, "MP4"
    wav = b"RIFF" + struct.pack("<I", 36) + b"WAVEfmt " + bytes(28)
    yield "sound.jpg", wav, REJECTED, "WAV"
    noise = b"\x00\x01" + rng.integers(0, 256, 4096, dtype=np.uint8).tobytes()
    yield "random_bytes.jpg", noise, REJECTED, "random binary data"
    yield "utf16_text.jpg", "\ufeffhello, this is text".encode("utf-16-le"), REJECTED, "UTF-16 text"
    yield "one_byte.jpg", b"\xff", REJECTED, "a single byte"


def _polyglots(seed: int) -> Iterable[Entry]:
    """Files that are two things at once; the first bytes decide what they are."""
    jpeg = _encode(_photo(40, 30, seed + 4), "JPEG")
    png = _encode(_photo(40, 30, seed + 5), "PNG")
    script = b"<html><script>alert(document.cookie)</script></html>"
    yield "gif_header_then_html.jpg", b"GIF89a" + script, REJECTED, "GIF magic followed by HTML"
    tiny_screen = b"GIF89a\x01\x00\x01\x00\x00\x00\x00"
    yield "gif_screen_then_html.gif", tiny_screen + script, REJECTED, "GIF screen followed by HTML"
    yield "jpeg_then_zip.jpg", jpeg + _zip_of({"payload.txt": b"hidden"}), INDEXED, "ZIP appended to a valid JPEG"
    yield "jpeg_then_pdf.jpg", jpeg + _PDF, INDEXED, "PDF appended to a valid JPEG"
    yield "png_then_html.png", png + script, INDEXED, "HTML after IEND"
    comment = b"\xff\xfe" + struct.pack(">H", len(script) + 2) + script
    yield "jpeg_html_comment.jpg", jpeg[:2] + comment + jpeg[2:], INDEXED, "HTML inside a JPEG comment"
    padded_html = _HTML + b"<!--" + b" " * 4096 + b"-->"
    yield "html_then_jpeg.jpg", padded_html + jpeg, REJECTED, "HTML with a JPEG after it"
    yield "pdf_then_jpeg.jpg", _PDF + jpeg, REJECTED, "PDF with a JPEG after it"
    yield "zip_containing_jpeg.jpg", _zip_of({"photo.jpg": jpeg}), REJECTED, "ZIP holding a JPEG"


def _animated(seed: int) -> Iterable[Entry]:
    """Animations: the first frame is what gets indexed."""
    colours = [(220, 20, 20), (20, 220, 20), (20, 20, 220)]
    frames = [_solid(colour, (32, 24)) for colour in colours]
    common = {"save_all": True, "append_images": frames[1:], "duration": 80, "loop": 0}
    yield "animated.gif", _encode(frames[0], "GIF", **common), INDEXED, "3-frame GIF"
    yield "animated_lossless.webp", _encode(frames[0], "WEBP", lossless=True, **common), INDEXED, "3-frame WebP"
    yield "animated_lossy.webp", _encode(frames[0], "WEBP", quality=90, **common), INDEXED, "3-frame lossy WebP"
    yield "animated.png", _encode(frames[0], "PNG", **common), INDEXED, "3-frame APNG"
    rgba_frames = [_solid(colour + (128,), (32, 24), "RGBA") for colour in colours]
    rgba_common = dict(common, append_images=rgba_frames[1:])
    translucent_webp = _encode(rgba_frames[0], "WEBP", lossless=True, **rgba_common)
    yield "animated_alpha.webp", translucent_webp, INDEXED, "translucent"
    yield "animated_alpha.png", _encode(rgba_frames[0], "PNG", **rgba_common), INDEXED, "translucent APNG"
    many = [_solid((i * 8 % 256, 0, 0), (16, 16)) for i in range(40)]
    long_gif = _encode(many[0], "GIF", save_all=True, append_images=many[1:])
    yield "animated_40_frames.gif", long_gif, INDEXED, "40 frames"


def _png16(width: int, height: int, colour_type: int, channels: int) -> bytes:
    """A 16-bit-per-channel PNG gradient, written by hand because Pillow only writes grey ones."""
    ramp = np.linspace(0, 65535, width, dtype=np.float64).astype(">u2")
    row = np.repeat(ramp[:, None], channels, axis=1)
    if channels in (2, 4):
        row[:, -1] = 65535
    return png_from_rows(width, height, 16, colour_type, (row.tobytes() for _ in range(height)))


def _png16_colour_key() -> bytes:
    """A 16-bit grey PNG, half of it the grey its tRNS chunk marks transparent."""
    row = b"\x00\x00" * 8 + b"\x80\x00" * 8
    plain = png_from_rows(16, 16, 16, 0, [row] * 16)
    ihdr_end = len(PNG_SIGNATURE) + 25
    return plain[:ihdr_end] + png_chunk(b"tRNS", b"\x00\x00") + plain[ihdr_end:]


def _colour_modes(seed: int) -> Iterable[Entry]:
    """Every colour model a real upload might use, all expected to become RGB."""
    photo = _photo(48, 32, seed + 6)
    yield "cmyk.jpg", _encode(_solid((0, 255, 255, 0), (32, 32), "CMYK"), "JPEG"), INDEXED, "CMYK JPEG"
    yield "grey.jpg", _encode(photo.convert("L"), "JPEG"), INDEXED, "greyscale JPEG"
    yield "progressive.jpg", _encode(photo, "JPEG", progressive=True), INDEXED, "progressive JPEG"
    yield "subsampling_444.jpg", _encode(photo, "JPEG", subsampling=0), INDEXED, "4:4:4 JPEG"
    gradient = np.tile(np.linspace(0, 65535, 256).astype(np.uint16), (8, 1))
    yield "grey16.png", _encode(Image.fromarray(gradient), "PNG"), INDEXED, "16-bit greyscale PNG"
    yield "rgb16.png", _png16(64, 8, 2, 3), INDEXED, "16-bit RGB PNG"
    yield "rgba16.png", _png16(64, 8, 6, 4), INDEXED, "16-bit RGBA PNG"
    yield "la16.png", _png16(64, 8, 4, 2), INDEXED, "16-bit grey+alpha PNG"
    palette = _solid(0, (16, 16), "P")
    palette.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    palette.paste(1, (8, 0, 16, 16))
    yield "palette_alpha.png", _encode(palette, "PNG", transparency=b"\x00\xff"), INDEXED, "palette with tRNS"
    yield "palette.png", _encode(palette, "PNG"), INDEXED, "palette"
    yield "palette_transparent.gif", _encode(palette, "GIF", transparency=0), INDEXED, "GIF transparency"
    yield "la.png", _encode(_solid((90, 128), (16, 16), "LA"), "PNG"), INDEXED, "grey + alpha"
    yield "rgba.png", _encode(_solid((0, 0, 0, 0), (16, 16), "RGBA"), "PNG"), INDEXED, "fully transparent"
    yield "grey_trns.png", _encode(_solid(7, (16, 16), "L"), "PNG", transparency=7), INDEXED, "grey colour key"
    yield "grey16_trns.png", _png16_colour_key(), INDEXED, "16-bit grey colour key"
    yield "rgb_trns.png", _encode(photo, "PNG", transparency=(1, 2, 3)), INDEXED, "RGB colour key"
    yield "bilevel.png", _encode(photo.convert("1"), "PNG"), INDEXED, "1-bit PNG"
    yield "hand_written_grey.png", png_from_rows(4, 4, 8, 0, (bytes(4) for _ in range(4))), INDEXED, "minimal PNG"
    yield "interlaced.gif", _encode(photo.convert("P"), "GIF", interlace=True), INDEXED, "interlaced GIF"
    yield "alpha.webp", _encode(photo.convert("RGBA"), "WEBP"), INDEXED, "WebP with alpha"
    floats = np.linspace(0, 1, 64 * 8, dtype=np.float32).reshape(8, 64)
    yield "float.tif", _encode(Image.fromarray(floats), "TIFF"), INDEXED, "32-bit float TIFF"
    yield "grey16.tif", _encode(Image.fromarray(gradient), "TIFF"), INDEXED, "16-bit TIFF"
    yield "cmyk.tif", _encode(_solid((0, 255, 255, 0), (8, 8), "CMYK"), "TIFF"), INDEXED, "CMYK TIFF"
    yield "bilevel.bmp", _encode(photo.convert("1"), "BMP"), INDEXED, "1-bit BMP"
    yield "rgba.bmp", _encode(photo.convert("RGBA"), "BMP"), INDEXED, "32-bit BMP"
    yield "ycbcr.jpg", _encode(photo.convert("YCbCr"), "JPEG"), INDEXED, "JPEG written from YCbCr"
    if features.check("avif"):
        yield "photo.avif", _encode(photo, "AVIF"), INDEXED, "AVIF"


def _exif_jpeg(image: Image.Image, orientation: int | None, raw_exif: bytes | None = None) -> bytes:
    exif = Image.Exif()
    if orientation is not None:
        exif[0x0112] = orientation
    return _encode(image, "JPEG", quality=95, exif=raw_exif if raw_exif is not None else exif.tobytes())


def _exif(seed: int) -> Iterable[Entry]:
    """Camera photos stored sideways with an orientation tag, and broken EXIF blocks."""
    image = _quadrants(40, 20)
    for orientation in range(1, 9):
        rotated = _exif_jpeg(image, orientation)
        yield f"orientation_{orientation}.jpg", rotated, INDEXED, f"EXIF orientation {orientation}"
    yield "orientation_9.jpg", _exif_jpeg(image, 9), INDEXED, "orientation value out of range"
    yield "orientation_0.jpg", _exif_jpeg(image, 0), INDEXED, "orientation value 0"
    noise = random.Random(seed).randbytes(200)
    yield "exif_garbage.jpg", _exif_jpeg(image, None, b"Exif\x00\x00" + noise), INDEXED, "EXIF block is noise"
    cut_ifd = b"Exif\x00\x00II*\x00\x08\x00\x00\x00\xff\xff"
    yield "exif_truncated_ifd.jpg", _exif_jpeg(image, None, cut_ifd), INDEXED, "IFD cut short"
    exif = Image.Exif()
    exif[0x0112] = 6
    yield "orientation_6.png", _encode(image, "PNG", exif=exif.tobytes()), INDEXED, "PNG eXIf orientation 6"
    yield "orientation_6.webp", _encode(image, "WEBP", lossless=True, exif=exif.tobytes()), INDEXED, "WebP EXIF"
    yield "orientation_6.tif", _encode(image, "TIFF", tiffinfo={0x0112: 6}), INDEXED, "TIFF orientation tag"
    big = _exif_jpeg(_photo(1600, 1200, seed), 6)
    yield "orientation_6_big.jpg", big, INDEXED, "big rotated JPEG (draft path)"


def _extreme_aspect(seed: int) -> Iterable[Entry]:
    """Valid but awkward shapes: one pixel wide or tall, and a single pixel."""
    tall = _photo(1, 10_000, seed)
    wide = _photo(10_000, 1, seed)
    yield "tall_1x10000.png", _encode(tall, "PNG"), INDEXED, "1 x 10000"
    yield "wide_10000x1.png", _encode(wide, "PNG"), INDEXED, "10000 x 1"
    yield "tall_1x10000.jpg", _encode(tall, "JPEG"), INDEXED, "1 x 10000"
    yield "wide_10000x1.jpg", _encode(wide, "JPEG"), INDEXED, "10000 x 1"
    yield "wide_10000x1.gif", _encode(wide.convert("P"), "GIF"), INDEXED, "10000 x 1"
    yield "wide_10000x1.webp", _encode(wide, "WEBP", lossless=True), INDEXED, "10000 x 1"
    yield "tall_2x16383.webp", _encode(_photo(2, 16_383, seed), "WEBP"), INDEXED, "WebP maximum height"
    yield "tall_1x200000.png", _encode(_photo(1, 200_000, seed), "PNG"), INDEXED, "1 x 200000: resized whole, 40 GB"
    yield "wide_200000x1.png", _encode(_photo(200_000, 1, seed), "PNG"), INDEXED, "200000 x 1"
    for fmt, suffix in (("PNG", "png"), ("JPEG", "jpg"), ("GIF", "gif"), ("WEBP", "webp"), ("BMP", "bmp")):
        yield f"single_pixel.{suffix}", _encode(_solid((12, 34, 56), (1, 1)), fmt), INDEXED, "1 x 1"


def _costly_structures(seed: int) -> Iterable[Entry]:
    """Small files whose layout, not their pixels, would keep a parser busy for seconds or unpack
    into gigabytes: thousands of progressive passes, segments, chunks, blocks or strips, and
    compressed metadata bombs. Within the limits, the same layouts are ordinary pictures."""
    progressive = _encode(_photo(64, 48, seed + 9), "JPEG", progressive=True)  # 10 passes
    yield "jpeg_500_passes.jpg", jpeg_repeating_a_pass(progressive, 490), INDEXED, "500 progressive passes"
    yield "jpeg_501_passes.jpg", jpeg_repeating_a_pass(progressive, 491), REJECTED, "501 progressive passes"
    jpeg = _encode(_photo(32, 24, seed + 10), "JPEG")
    comment = b"\xff\xfe\x00\x02"
    yield "jpeg_5000_comments.jpg", jpeg[:2] + comment * 5_000 + jpeg[2:], INDEXED, "5000 empty comments"
    yield "jpeg_20000_comments.jpg", jpeg[:2] + comment * 20_000 + jpeg[2:], REJECTED, "20000 empty comments"
    app0_end = 4 + struct.unpack(">H", jpeg[4:6])[0]
    for size, expect in ((4096, INDEXED), (1024 * 1024 + 1, REJECTED)):
        padded = jpeg[:app0_end] + bytes(size) + jpeg[app0_end:]
        yield f"jpeg_{size}_bytes_of_padding.jpg", padded, expect, "zero bytes between header segments"
    png = _encode(_solid((40, 80, 120), (8, 8)), "PNG")
    ihdr_end = len(PNG_SIGNATURE) + 25
    for extra, expect in ((1_000, INDEXED), (100_000, REJECTED)):
        chunks = png[:ihdr_end] + png_chunk(b"abCd", b"") * extra + png[ihdr_end:]
        yield f"png_{extra + 3}_chunks.png", chunks, expect, "empty unknown chunks before the pixels"
    bomb = zlib.compress(bytes(2 * 1024 * 1024), 9)
    for kind, header in ((b"zTXt", b"Comment\x00\x00"), (b"iCCP", b"icc\x00\x00")):
        name = kind.decode().lower()
        yield f"png_{name}_bomb.png", png[:ihdr_end] + png_chunk(kind, header + bomb) + png[ihdr_end:], REJECTED, "2 MB"
    gif = _encode(_photo(8, 8, seed + 11).convert("P"), "GIF")
    picture = _gif_image_descriptor(gif)
    for comments, expect in ((2_000, INDEXED), (60_000, REJECTED)):
        blocks = gif[:picture] + b"\x21\xfe\x01a\x00" * comments + gif[picture:]
        yield f"gif_{comments}_comments.gif", blocks, expect, "one-letter comments before the picture"
    for rows, expect in ((5_000, INDEXED), (100_001, REJECTED)):
        yield f"tiff_{rows}_strips.tif", tiff_of_one_row_strips(2, rows), expect, "one strip per row"


def _degenerate(seed: int) -> Iterable[Entry]:
    """Zero-sized pictures: nothing to index."""
    rows = zlib.compress(b"")
    for width, height in ((0, 0), (0, 100), (100, 0)):
        data = PNG_SIGNATURE + png_ihdr(width, height) + png_chunk(b"IDAT", rows) + png_chunk(b"IEND", b"")
        yield f"png_{width}x{height}.png", data, REJECTED, "zero dimension"
    gif = _encode(_solid((1, 1, 1), (1, 1)), "GIF")
    zero_gif = _patch(gif, 6, b"\x00\x00\x00\x00")
    descriptor = _gif_image_descriptor(zero_gif)
    yield "gif_0x0.gif", _patch(zero_gif, descriptor + 5, b"\x00\x00\x00\x00"), REJECTED, "zero screen, zero frame"
    jpeg = _encode(_photo(16, 16, seed), "JPEG")
    yield "jpeg_width_0.jpg", _set_jpeg_size(jpeg, 0, 16), REJECTED, "zero width"
    yield "jpeg_height_0.jpg", _set_jpeg_size(jpeg, 16, 0), REJECTED, "zero height (DNL)"
    bmp = _encode(_solid((0, 0, 0), (4, 4)), "BMP")
    yield "bmp_0x4.bmp", _patch(bmp, 18, struct.pack("<i", 0)), REJECTED, "zero width"


def _unsupported(seed: int) -> Iterable[Entry]:
    """Real picture formats that Shoebox deliberately does not decode."""
    photo = _photo(32, 32, seed + 7)
    heic = struct.pack(">I", 24) + b"ftypheic" + b"\x00\x00\x00\x00mif1heic" + bytes(64)
    yield "photo.heic", heic, REJECTED, "HEIC container (no decoder plugin)"
    yield "icon.jpg", _encode(photo, "ICO"), REJECTED, "Windows icon"
    yield "layers.psd", b"8BPS\x00\x01" + bytes(64), REJECTED, "Photoshop header"
    yield "picture.tga", _encode(photo, "TGA"), REJECTED, "TGA has no magic bytes"
    yield "picture.ppm", _encode(photo, "PPM"), REJECTED, "PPM"
    yield "picture.jp2", b"\x00\x00\x00\x0cjP  \r\n\x87\n" + bytes(64), REJECTED, "JPEG 2000 signature"


def _padded_jpeg(total: int, seed: int) -> bytes:
    """A valid JPEG padded after its end marker to exactly `total` bytes."""
    jpeg = _encode(_photo(64, 64, seed), "JPEG")
    return jpeg + bytes(total - len(jpeg))


def _size_limit(seed: int) -> Iterable[Entry]:
    """Valid pictures around `CORPUS_MAX_FILE_BYTES`: the byte limit alone decides."""
    limit = CORPUS_MAX_FILE_BYTES
    yield "noise_1000x1000.png", _encode(_noise(1000, 1000, seed), "PNG", compress_level=1), REJECTED, "~3 MB PNG"
    big_jpeg = _encode(_noise(900, 900, seed + 1), "JPEG", quality=100, subsampling=0)
    yield "noise_900x900.jpg", big_jpeg, REJECTED, "~3 MB JPEG"
    yield "noise_800x800.png", _encode(_noise(800, 800, seed + 2), "PNG", compress_level=1), INDEXED, "~1.9 MB PNG"
    yield "exactly_at_limit.jpg", _padded_jpeg(limit, seed), INDEXED, "exactly the limit"
    yield "one_byte_over_limit.jpg", _padded_jpeg(limit + 1, seed), REJECTED, "limit + 1"
    text = png_chunk(b"tEXt", b"Comment\x00" + b"A" * limit)
    small = _encode(_solid((5, 5, 5), (8, 8)), "PNG")
    yield "small_pixels_big_text.png", small[:33] + text + small[33:], REJECTED, "8x8 PNG with a 2 MB text chunk"


def _odd_names(seed: int, name_max: int) -> Iterable[Entry]:
    """Valid pictures with names that break naive path handling, logging or terminals."""
    data = _encode(_photo(24, 16, seed + 8), "JPEG")
    names = [
        "..%2f..%2fetc%2fpasswd.jpg",
        "..%5c..%5cwindows%5csystem32%5cconfig.jpg",
        "..\\..\\boot.ini.jpg",
        "..jpg",
        ".hidden.jpg",
        "-rf --no-preserve-root.jpg",
        "photo with  spaces .jpg",
        " leading space.jpg",
        "trailing dot.jpg.",
        "$(reboot) `id`; rm -rf ~.jpg",
        "<script>alert(1)<%2fscript>.jpg",
        "%00null%00byte.jpg",
        "line\nbreak.jpg",
        "CON.jpg",
        "🐈\u200d⬛ cat 📸.jpg",
        "invoice\u202egpj.exe",
        "\u200fصورة العائلة.jpg",
        "写真 旅行.jpg",
        "cafe\u0301.jpg",
        "caf\u00e9.jpg",
        "zero\u200bwidth\u200bspace.jpg",
        "a" * (name_max - 4) + ".jpg",
        "📷" * ((name_max - 4) // 4) + ".jpg",
        "é" * ((name_max - 4) // 2) + ".jpg",
    ]
    for name in names:
        yield name, data, INDEXED, "odd file name, valid JPEG"


BUILDERS: dict[str, Callable[[int], Iterable[Entry]]] = {
    "bomb": _bombs,
    "truncated": _truncated,
    "corrupt": _corrupt,
    "corrupt_scan": _corrupt_scan,
    "empty": _empty,
    "wrong_extension": _wrong_extension,
    "not_an_image": _not_images,
    "polyglot": _polyglots,
    "animated": _animated,
    "colour_mode": _colour_modes,
    "exif_orientation": _exif,
    "extreme_aspect": _extreme_aspect,
    "costly_structure": _costly_structures,
    "degenerate": _degenerate,
    "unsupported_format": _unsupported,
    "size_limit": _size_limit,
}


def _name_max(directory: Path) -> int:
    """The longest file name, in bytes, that the file system under `directory` accepts."""
    try:
        return min(int(os.pathconf(directory, "PC_NAME_MAX")), 255)
    except (AttributeError, OSError, ValueError):
        return 255


def _safe_child(directory: Path, name: str) -> Path:
    """`directory / name`, refusing any name that could step outside `directory`."""
    if not name or name in (".", "..") or "/" in name or "\x00" in name or (os.sep != "/" and os.sep in name):
        raise ValueError(f"unsafe corpus file name {name!r}")
    path = directory / name
    if path.resolve().parent != directory.resolve():
        raise ValueError(f"corpus file name {name!r} escapes {directory}")
    return path


def _write_kind(out_dir: Path, kind: str, entries: Iterable[Entry]) -> list[CorpusFile]:
    directory = out_dir / kind
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for name, data, expect, note in entries:
        path = _safe_child(directory, name)
        path.write_bytes(data)
        written.append(CorpusFile(path=path, kind=kind, expect=expect, note=note))
    return written


def generate_corpus(out_dir: Path, seed: int = 0) -> list[CorpusFile]:
    """Write the whole corpus under `out_dir` (created if needed) and return its labels."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    corpus: list[CorpusFile] = []
    for kind, builder in BUILDERS.items():
        corpus.extend(_write_kind(out_dir, kind, builder(seed)))
    odd_dir = out_dir / "odd_name"
    odd_dir.mkdir(exist_ok=True)
    corpus.extend(_write_kind(out_dir, "odd_name", _odd_names(seed, _name_max(odd_dir))))
    return corpus


def summary_table(corpus: list[CorpusFile]) -> str:
    """Kinds with their counts of expected outcomes, as aligned plain text."""
    counts = Counter((item.kind, item.expect) for item in corpus)
    kinds = list(dict.fromkeys(item.kind for item in corpus))
    lines = [f"{'kind':<20} {'indexed':>8} {'rejected':>9} {'total':>6}"]
    for kind in kinds:
        indexed, rejected = counts[(kind, INDEXED)], counts[(kind, REJECTED)]
        lines.append(f"{kind:<20} {indexed:>8} {rejected:>9} {indexed + rejected:>6}")
    total_indexed = sum(1 for item in corpus if item.expect == INDEXED)
    lines.append(f"{'total':<20} {total_indexed:>8} {len(corpus) - total_indexed:>9} {len(corpus):>6}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", type=Path, help="folder to write the corpus into")
    parser.add_argument("--seed", type=int, default=0, help="seed for noise and damage positions")
    args = parser.parse_args(argv)
    corpus = generate_corpus(args.out_dir, seed=args.seed)
    print(summary_table(corpus))
    print(f"\nwritten to {args.out_dir} (labels assume a {CORPUS_MAX_FILE_BYTES // (1024 * 1024)} MB file limit "
          f"and a {CORPUS_MAX_PIXELS // 1_000_000}-megapixel limit)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
