"""Safe decoding of untrusted uploads: every hostile kind, every colour conversion, exact outcomes.

The last part regenerates the hostile corpus (bench/hostile_corpus.py) and checks that every file's
outcome matches its label, so the corpus and the decoder cannot drift apart.
"""

from __future__ import annotations

import gc
import io
import os
import resource
import struct
import time
import warnings
import zipfile
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image, ImageFile, features

from bench import hostile_corpus as corpus_mod
from store import ingest, resample
from store.ingest import (
    CORRUPT_REASON,
    THUMBNAIL_EXTENSION,
    DecodedImage,
    RejectedImage,
    decode_image,
    read_limited,
    save_thumbnail,
    sniff_format,
    thumbnail_of,
    too_large_reason,
)
from store.settings import IngestSettings

MB = 1024 * 1024
LIMITS = IngestSettings()




def encode(image: Image.Image, fmt: str, **params: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **params)
    return buffer.getvalue()


def rejection(data: bytes, limits: IngestSettings = LIMITS, **kwargs: int) -> str:
    with pytest.raises(RejectedImage) as caught:
        decode_image(data, limits, **kwargs)
    assert caught.value.reason == str(caught.value)
    return caught.value.reason


def pixel(decoded: DecodedImage, xy: tuple[int, int]) -> tuple[int, int, int]:
    value = decoded.image.getpixel(xy)
    assert isinstance(value, tuple)
    return value[:3]


def close_to(actual: tuple[int, ...], expected: tuple[int, ...], tolerance: int = 40) -> bool:
    return all(abs(a - e) <= tolerance for a, e in zip(actual, expected, strict=True))


def quadrants(width: int, height: int) -> Image.Image:
    """Red, green / blue, white quadrants: every rotation and mirror looks different."""
    return corpus_mod._quadrants(width, height)


# ------------------------------------------------------------------------------------------------
# sniff_format
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fmt", "expected"),
    [("JPEG", "JPEG"), ("PNG", "PNG"), ("GIF", "GIF"), ("WEBP", "WEBP"), ("BMP", "BMP"), ("TIFF", "TIFF")],
)
def test_sniff_recognises_real_encodings(fmt: str, expected: str) -> None:
    assert sniff_format(encode(Image.new("RGB", (4, 4)), fmt)) == expected


def test_sniff_recognises_avif_only_when_pillow_decodes_it() -> None:
    if features.check("avif"):
        assert sniff_format(encode(Image.new("RGB", (8, 8)), "AVIF")) == "AVIF"
    else:
        avif = struct.pack(">I", 24) + b"ftypavif" + b"\x00\x00\x00\x00mif1avif" + bytes(16)
        assert sniff_format(avif) is None
    heic = struct.pack(">I", 24) + b"ftypheic" + b"\x00\x00\x00\x00mif1heic" + bytes(16)
    assert sniff_format(heic) is None  # no HEIF plugin registered


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"<!DOCTYPE html><html></html>",
        b"PK\x03\x04" + bytes(40),
        b"%PDF-1.7\n",
        b"BMW brochure with photos attached, plain text" * 2,
        b"\xff\xd8",  # JPEG magic cut short
        b"RIFF\x10\x00\x00\x00WAVEfmt ",
    ],
)
def test_sniff_refuses_everything_else(data: bytes) -> None:
    assert sniff_format(data) is None


# ------------------------------------------------------------------------------------------------
# read_limited
# ------------------------------------------------------------------------------------------------


def test_read_limited_returns_the_whole_file(tmp_path: Path) -> None:
    path = tmp_path / "a.jpg"
    path.write_bytes(b"x" * 1000)
    assert read_limited(path, 1000) == b"x" * 1000


def test_read_limited_rejects_by_size_with_a_readable_reason(tmp_path: Path) -> None:
    path = tmp_path / "big.png"
    path.write_bytes(bytes(int(1.5 * MB)))
    with pytest.raises(RejectedImage, match=r"^file is 1\.5 MB, over the 1 MB limit$"):
        read_limited(path, MB)


def test_read_limited_checks_the_size_before_reading(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "big.jpg"
    path.write_bytes(bytes(3 * MB))
    reads: list[int] = []
    real_read = os.read

    def counting_read(fd: int, n: int) -> bytes:
        chunk = real_read(fd, n)
        reads.append(len(chunk))
        return chunk

    monkeypatch.setattr(ingest.os, "read", counting_read)
    with pytest.raises(RejectedImage):
        read_limited(path, MB)
    assert reads == []


def test_read_limited_never_reads_past_the_limit_when_stat_lies(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A file that grows after stat (or a size-0 special file) is still cut at max_bytes + 1."""
    path = tmp_path / "growing.jpg"
    path.write_bytes(bytes(5 * MB))
    real_fstat, real_read = os.fstat, os.read
    reads: list[int] = []

    def shrunken_fstat(fd: int) -> os.stat_result:
        fields = list(real_fstat(fd))
        fields[6] = 10  # st_size
        return os.stat_result(fields)

    def counting_read(fd: int, n: int) -> bytes:
        chunk = real_read(fd, n)
        reads.append(len(chunk))
        return chunk

    monkeypatch.setattr(ingest.os, "fstat", shrunken_fstat)
    monkeypatch.setattr(ingest.os, "read", counting_read)
    with pytest.raises(RejectedImage, match="over the 1 MB limit"):
        read_limited(path, MB)
    assert sum(reads) == MB + 1


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (lambda p: p.write_bytes(b""), "file is empty"),
        (lambda p: None, "file does not exist"),
        (lambda p: p.mkdir(), "not a regular file (it is a folder)"),
        (lambda p: os.mkfifo(p), "not a regular file"),
        (lambda p: p.symlink_to("/dev/zero"), "not a regular file"),
    ],
    ids=["empty", "missing", "folder", "fifo", "device"],
)
def test_read_limited_rejects_what_is_not_a_readable_file(
    tmp_path: Path, make: Callable[[Path], object], reason: str
) -> None:
    path = tmp_path / "photo.jpg"
    make(path)
    started = time.perf_counter()
    with pytest.raises(RejectedImage) as caught:
        read_limited(path, MB)
    assert caught.value.reason == reason
    assert time.perf_counter() - started < 2  # a FIFO must not block


def test_too_large_reason_wording() -> None:
    assert too_large_reason(int(80.2 * MB), 50 * MB) == "file is 80.2 MB, over the 50 MB limit"
    assert too_large_reason(50 * MB + 1, 50 * MB) == "file is 50.1 MB, over the 50 MB limit"
    assert too_large_reason(3000, 2048) == "file is 2.9 KB, over the 2 KB limit"


# ------------------------------------------------------------------------------------------------
# decode_image: rejections
# ------------------------------------------------------------------------------------------------


def test_file_size_limit_is_checked_before_anything_else() -> None:
    data = encode(Image.new("RGB", (8, 8)), "PNG") + bytes(int(1.5 * MB))
    assert rejection(data, IngestSettings(max_file_bytes=MB)) == "file is 1.5 MB, over the 1 MB limit"


def test_empty_bytes() -> None:
    assert rejection(b"") == "file is empty"


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"<!DOCTYPE html><html><body>Not found</body></html>", "not an image (looks like HTML)"),
        (b"\xef\xbb\xbf\n  <html><head></head></html>", "not an image (looks like HTML)"),
        (b"Dear diary, today I took a photo.\n", "not an image (looks like text)"),
        (b'{"ok": false}', "not an image (looks like JSON)"),
        (b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n", "not an image (looks like a PDF document)"),
        (b"\x7fELF\x02\x01\x01" + bytes(60), "not an image (looks like a program)"),
        (b"<svg xmlns='http://www.w3.org/2000/svg'/>", "unsupported image format (SVG drawing)"),
        (b"\x00\x01\x02\x03\xfe\xfd\xfc" * 50, "not an image (unrecognised binary data)"),
    ],
)
def test_not_an_image_is_named(data: bytes, reason: str) -> None:
    assert rejection(data) == reason


def test_zip_named_jpg_is_rejected_as_zip() -> None:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("photo.jpg", encode(Image.new("RGB", (4, 4)), "JPEG"))
    assert rejection(buffer.getvalue()) == "not an image (looks like a ZIP archive)"


def test_gif_header_followed_by_html_is_rejected() -> None:
    # The "logical screen" bytes are "<h" and "tm": a 26684x28020 canvas, refused from the header.
    reason = rejection(b"GIF89a<html><script>alert(1)</script></html>")
    assert reason == "image is 26684x28020 pixels, over the 64-megapixel limit"
    assert rejection(b"GIF89a\x01\x00\x01\x00\x00\x00\x00<html></html>") == CORRUPT_REASON


def test_jpeg_with_zip_appended_is_still_the_jpeg() -> None:
    jpeg = encode(Image.new("RGB", (20, 10), (200, 30, 30)), "JPEG")
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("secret.txt", "hidden")
    decoded = decode_image(jpeg + buffer.getvalue(), LIMITS)
    assert (decoded.width, decoded.height, decoded.format) == (20, 10, "JPEG")
    assert close_to(pixel(decoded, (10, 5)), (200, 30, 30))


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "GIF", "WEBP"])
@pytest.mark.parametrize("fraction", [0.1, 0.5, 0.8])
def test_truncated_files_are_rejected_as_corrupt(fmt: str, fraction: float) -> None:
    image = corpus_mod._photo(96, 64, 1)
    data = encode(image.convert("P") if fmt == "GIF" else image, fmt)
    assert rejection(data[: int(len(data) * fraction)]) == CORRUPT_REASON
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_corrupt_png_header_is_rejected() -> None:
    data = bytearray(encode(Image.new("RGB", (16, 16)), "PNG"))
    data[19] ^= 0x40  # inside IHDR: the chunk CRC no longer matches
    assert rejection(bytes(data)) == CORRUPT_REASON


def test_decompression_bomb_is_refused_from_the_header_without_allocating() -> None:
    data = (
        corpus_mod.PNG_SIGNATURE
        + corpus_mod.png_ihdr(100_000, 100_000)
        + corpus_mod.png_chunk(b"IDAT", b"\x78\x9c\x03\x00\x00\x00\x00\x01")
        + corpus_mod.png_chunk(b"IEND", b"")
    )
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    started = time.perf_counter()
    reason = rejection(data)
    elapsed = time.perf_counter() - started
    grown_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before
    assert reason == "image is 100000x100000 pixels, over the 64-megapixel limit"
    assert elapsed < 0.5
    assert grown_kib < 50 * 1024


def test_complete_valid_bomb_png_is_refused() -> None:
    row = bytes(10_000 // 8)
    data = corpus_mod.png_from_rows(10_000, 10_000, 1, 0, (row for _ in range(10_000)))
    assert len(data) < 100_000
    assert rejection(data) == "image is 10000x10000 pixels, over the 64-megapixel limit"


def test_pixel_limit_is_the_configured_one() -> None:
    data = encode(Image.new("RGB", (40, 30)), "PNG")
    limits = IngestSettings(max_pixels=1000)
    assert rejection(data, limits) == "image is 40x30 pixels, over the 1000-pixel limit"
    assert decode_image(data, IngestSettings(max_pixels=1200)).image.size == (40, 30)


def test_pillow_bomb_warning_is_contained_and_global_state_untouched() -> None:
    """A JPEG declaring 90 megapixels trips Pillow's warning threshold; it must not leak out."""
    jpeg = corpus_mod._set_jpeg_size(encode(Image.new("RGB", (16, 16)), "JPEG"), 10_000, 9_000)
    filters_before = list(warnings.filters)
    max_pixels_before = Image.MAX_IMAGE_PIXELS
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        reason = rejection(jpeg)
    assert reason == "image is 10000x9000 pixels, over the 64-megapixel limit"
    assert [w for w in caught if issubclass(w.category, Image.DecompressionBombWarning)] == []
    assert warnings.filters == filters_before
    assert Image.MAX_IMAGE_PIXELS == max_pixels_before


def test_pillow_bomb_error_becomes_a_reason_even_with_a_huge_configured_limit() -> None:
    jpeg = corpus_mod._set_jpeg_size(encode(Image.new("RGB", (16, 16)), "JPEG"), 65_500, 65_500)
    assert rejection(jpeg, IngestSettings(max_pixels=10**12)) == "image is over the 179-megapixel limit"


def test_webp_canvas_bomb_is_refused_before_libwebp_allocates_it() -> None:
    assert rejection(corpus_mod._webp_canvas_bomb(12_000, 12_000)) == (
        "image is 12000x12000 pixels, over the 64-megapixel limit"
    )


def never_opened(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make any Pillow open fail the test: the file must be judged from its bytes alone."""

    def refuse(*args: object, **kwargs: object) -> Image.Image:
        raise AssertionError("Pillow was asked to open the file")

    monkeypatch.setattr(Image, "open", refuse)


def progressive_jpeg(passes_added: int) -> bytes:
    return corpus_mod.jpeg_repeating_a_pass(encode(corpus_mod._photo(64, 48, 1), "JPEG", progressive=True), passes_added)


def test_a_jpeg_of_too_many_progressive_passes_is_refused_before_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each pass is decoded over the whole picture: thousands of repeats of a small one took
    minutes. libjpeg's own script has 10 passes; past 500 the file is refused unopened."""
    assert len(corpus_mod.jpeg_scans(progressive_jpeg(0))) == 10
    assert decode_image(progressive_jpeg(ingest.MAX_JPEG_SCANS - 10), LIMITS).image.size == (64, 48)
    never_opened(monkeypatch)
    assert rejection(progressive_jpeg(ingest.MAX_JPEG_SCANS - 9)) == (
        "image is stored in too many progressive passes (more than 500)"
    )


def test_scan_markers_inside_metadata_or_after_the_picture_are_not_passes(monkeypatch: pytest.MonkeyPatch) -> None:
    """The walk jumps over each segment by its length and stops at the end marker, so an
    embedded thumbnail, a comment full of 0xFFDA bytes or a video appended after the picture
    (as in motion photos) adds no passes; the file's own passes still count."""
    noise = b"\xff\xda" * 30_000
    comment = b"\xff\xfe" + struct.pack(">H", 2 + len(noise)) + noise
    thumbnail = encode(Image.new("RGB", (16, 16)), "JPEG", progressive=True) * 60
    exif = b"\xff\xe1" + struct.pack(">H", 2 + len(thumbnail)) + thumbnail

    def padded(jpeg: bytes) -> bytes:
        return jpeg[:2] + comment + exif + jpeg[2:] + noise * 20

    assert decode_image(padded(progressive_jpeg(0)), LIMITS).image.size == (64, 48)
    never_opened(monkeypatch)
    assert "progressive passes" in rejection(padded(progressive_jpeg(ingest.MAX_JPEG_SCANS)))


def test_a_jpeg_of_too_many_sections_is_refused_before_opening(monkeypatch: pytest.MonkeyPatch) -> None:
    """Pillow reads every segment before the picture in Python and keeps each APPn: 10 million
    empty ones took 11 s and 1.4 GB. A camera writes a few dozen; past 10,000 it is refused."""
    jpeg = encode(Image.new("RGB", (16, 16), (200, 50, 50)), "JPEG")
    many_comments = jpeg[:2] + b"\xff\xfe\x00\x02" * 9_000 + jpeg[2:]
    assert decode_image(many_comments, LIMITS).image.size == (16, 16)
    never_opened(monkeypatch)
    for marker in (b"\xff\xfe", b"\xff\xe5"):
        spam = jpeg[:2] + (marker + b"\x00\x02") * (ingest.MAX_JPEG_SECTIONS + 1) + jpeg[2:]
        assert rejection(spam) == "image file is split into too many sections (more than 10000)"


def test_a_jpeg_with_a_megabyte_of_padding_before_the_picture_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    """Pillow steps over bytes between segments one at a time (6 s for 20 MB of 0xFF); a few
    KB of it is a common flaw that decodes, over 1 MB is corrupt."""
    jpeg = encode(Image.new("RGB", (16, 16), (200, 50, 50)), "JPEG")
    after_app0 = 2 + 2 + struct.unpack(">H", jpeg[4:6])[0]
    for filler in (b"\x00", b"\xff"):
        padded = jpeg[:after_app0] + filler * 4096 + jpeg[after_app0:]
        assert decode_image(padded, LIMITS).image.size == (16, 16)
    never_opened(monkeypatch)
    for filler in (b"\x00", b"\xff"):
        padded = jpeg[:after_app0] + filler * (ingest.MAX_JPEG_STRAY_BYTES + 1) + jpeg[after_app0:]
        assert rejection(padded) == CORRUPT_REASON


def test_a_png_of_too_many_chunks_is_refused_before_opening(monkeypatch: pytest.MonkeyPatch) -> None:
    """Pillow reads every chunk in Python and keeps each unknown one: 3 million empty chunks
    took 5.8 s and 415 MB. Up to 100,000 are read (pixel data split small, long animations);
    more are refused unopened, before or after the pixel data alike. Bytes after the end chunk
    are not chunks."""
    small = encode(Image.new("RGB", (4, 4), (1, 2, 3)), "PNG")
    assert [kind for kind, _, _ in corpus_mod.png_chunks(small)] == [b"IHDR", b"IDAT", b"IEND"]
    ihdr_end, iend = 8 + 25, len(small) - 12
    unknown = corpus_mod.png_chunk(b"abCd", b"")

    def with_chunks(before: int, after: int) -> bytes:
        return small[:ihdr_end] + unknown * before + small[ihdr_end:iend] + unknown * after + small[iend:]

    assert decode_image(with_chunks(ingest.MAX_PNG_CHUNKS - 3, 0), LIMITS).image.size == (4, 4)
    assert decode_image(small + unknown * 200_000, LIMITS).image.size == (4, 4)
    never_opened(monkeypatch)
    assert rejection(with_chunks(ingest.MAX_PNG_CHUNKS - 2, 0)) == (
        "image file is split into too many sections (more than 100000)"
    )
    assert "too many sections" in rejection(with_chunks(0, ingest.MAX_PNG_CHUNKS))
    empty_idat = corpus_mod.png_chunk(b"IDAT", b"")
    assert "too many sections" in rejection(small[:iend] + empty_idat * ingest.MAX_PNG_CHUNKS + small[iend:])


def test_a_gif_of_too_many_blocks_before_its_picture_is_refused_before_opening(monkeypatch: pytest.MonkeyPatch) -> None:
    """Pillow reads a GIF's extensions before its first picture in Python: 5 million comments
    took 2.3 s and 0.9 GB. Up to 100,000 blocks and sub-blocks are read; more are refused."""
    gif = encode(Image.new("P", (4, 4), 1), "GIF")
    picture = corpus_mod._gif_image_descriptor(gif)
    one_byte_comment = b"\x21\xfe\x01a\x00"  # an extension and its one sub-block: 2 blocks
    long_comment = b"\x21\xfe" + b"\xff" + b"a" * 255 + b"\x01a" * 99_998 + b"\x00"  # 100,000 blocks

    def with_before_picture(blocks: bytes) -> bytes:
        return gif[:picture] + blocks + gif[picture:]

    assert decode_image(with_before_picture(one_byte_comment * 50_000), LIMITS).image.size == (4, 4)
    assert decode_image(with_before_picture(long_comment), LIMITS).image.size == (4, 4)
    never_opened(monkeypatch)
    for blocks in (one_byte_comment * 50_001, long_comment[:-1] + b"\x01a\x00"):  # 100,002 and 100,001
        assert rejection(with_before_picture(blocks)) == "image file is split into too many sections (more than 100000)"


@pytest.mark.parametrize(("order", "big"), [("<", False), (">", False), ("<", True)])
def test_a_tiff_of_too_many_strips_is_refused_before_opening(
    order: str, big: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Pillow lists every strip of a TIFF in Python: 4 million one-row strips took 16 s and
    1.5 GB. Up to 100,000 strips or tiles are read (a strip per row of a tall scan); more are
    refused unopened, in either byte order and in BigTIFF."""
    tall = corpus_mod.tiff_of_one_row_strips(3, 20_000, order, big)
    assert decode_image(tall, LIMITS).image.size == (3, 20_000)
    never_opened(monkeypatch)
    too_tall = corpus_mod.tiff_of_one_row_strips(3, ingest.MAX_TIFF_PIECES + 1, order, big)
    assert rejection(too_tall) == "image file is split into too many sections (more than 100000)"


@pytest.mark.parametrize(("width", "height"), [(0, 0), (0, 10), (10, 0)])
def test_zero_sized_png_is_rejected(width: int, height: int) -> None:
    data = (
        corpus_mod.PNG_SIGNATURE
        + corpus_mod.png_ihdr(width, height)
        + corpus_mod.png_chunk(b"IDAT", b"\x78\x9c\x03\x00\x00\x00\x00\x01")
        + corpus_mod.png_chunk(b"IEND", b"")
    )
    assert rejection(data) == f"image has no pixels ({width}x{height})"


def _metadata_bomb(kind: bytes, header: bytes, size: int = 2 * MB) -> bytes:
    return corpus_mod.png_chunk(kind, header + zlib.compress(bytes(size), 9))


@pytest.mark.parametrize(
    ("chunk", "after_pixels"),
    [
        (_metadata_bomb(b"zTXt", b"Comment\x00\x00"), False),
        (_metadata_bomb(b"iCCP", b"icc\x00\x00"), False),
        (_metadata_bomb(b"iTXt", b"XML:com.adobe.xmp\x00\x01\x00\x00\x00"), True),
        (_metadata_bomb(b"zTXt", b"Comment\x00\x00", 512 * 1024) * 130, False),
    ],
    ids=["text", "colour profile", "text after the pixels", "many texts"],
)
def test_a_png_whose_metadata_unpacks_too_large_is_refused_for_that(chunk: bytes, after_pixels: bool) -> None:
    """A few KB of compressed text or colour profile can unpack into gigabytes; Pillow stops at
    1 MB a chunk and 64 MB in all, and the file is refused for its metadata, not as corrupt."""
    small = encode(Image.new("RGB", (4, 4), (1, 2, 3)), "PNG")
    at = len(small) - 12 if after_pixels else 8 + 25
    assert len(chunk) < 400 * 1024
    assert rejection(small[:at] + chunk + small[at:]) == "image carries too much embedded metadata"


def test_unexpected_pillow_exception_becomes_a_short_reason(monkeypatch: pytest.MonkeyPatch) -> None:
    def explode(*args: object, **kwargs: object) -> Image.Image:
        raise RuntimeError("internal decoder state machine exploded at 0xdeadbeef")

    monkeypatch.setattr(Image, "open", explode)
    reason = rejection(encode(Image.new("RGB", (4, 4)), "PNG"))
    assert reason == CORRUPT_REASON


@pytest.mark.parametrize("error", [MemoryError, KeyboardInterrupt])
def test_memory_error_and_interrupts_are_not_swallowed(
    monkeypatch: pytest.MonkeyPatch, error: type[BaseException]
) -> None:
    def explode(*args: object, **kwargs: object) -> Image.Image:
        raise error()

    monkeypatch.setattr(Image, "open", explode)
    with pytest.raises(error):
        decode_image(encode(Image.new("RGB", (4, 4)), "PNG"), LIMITS)


def test_negative_min_side_is_a_programming_error() -> None:
    with pytest.raises(ValueError):
        decode_image(encode(Image.new("RGB", (4, 4)), "PNG"), LIMITS, min_side=-1)


# ------------------------------------------------------------------------------------------------
# decode_image: orientation, conversions, frames, shapes
# ------------------------------------------------------------------------------------------------

RED, GREEN, BLUE, WHITE = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255)

# Orientation -> (size, colours at top-left, top-right, bottom-left, bottom-right) of a 40x20
# picture whose stored quadrants are red, green / blue, white.
ORIENTED = {
    1: ((40, 20), (RED, GREEN, BLUE, WHITE)),
    2: ((40, 20), (GREEN, RED, WHITE, BLUE)),
    3: ((40, 20), (WHITE, BLUE, GREEN, RED)),
    4: ((40, 20), (BLUE, WHITE, RED, GREEN)),
    5: ((20, 40), (RED, BLUE, GREEN, WHITE)),
    6: ((20, 40), (BLUE, RED, WHITE, GREEN)),
    7: ((20, 40), (WHITE, GREEN, BLUE, RED)),
    8: ((20, 40), (GREEN, WHITE, RED, BLUE)),
}


def corner_colours(decoded: DecodedImage) -> list[tuple[int, int, int]]:
    width, height = decoded.image.size
    inset = 3
    left, top, right, bottom = inset, inset, width - 1 - inset, height - 1 - inset
    points = [(left, top), (right, top), (left, bottom), (right, bottom)]
    return [pixel(decoded, point) for point in points]


@pytest.mark.parametrize("orientation", sorted(ORIENTED))
def test_exif_orientation_is_applied(orientation: int) -> None:
    data = corpus_mod._exif_jpeg(quadrants(40, 20), orientation)
    decoded = decode_image(data, LIMITS)
    size, expected = ORIENTED[orientation]
    assert decoded.image.size == size
    assert (decoded.width, decoded.height) == size
    for actual, wanted in zip(corner_colours(decoded), expected, strict=True):
        assert close_to(actual, wanted, 60), (orientation, actual, wanted)


def test_png_exif_orientation_is_applied() -> None:
    exif = Image.Exif()
    exif[0x0112] = 6
    decoded = decode_image(encode(quadrants(40, 20), "PNG", exif=exif.tobytes()), LIMITS)
    assert decoded.image.size == (20, 40)
    assert corner_colours(decoded) == list(ORIENTED[6][1])


def test_tiff_orientation_is_applied_once() -> None:
    """Pillow rotates TIFFs itself while loading; the decoder must not rotate them a second time."""
    decoded = decode_image(encode(quadrants(40, 20), "TIFF", tiffinfo={0x0112: 6}), LIMITS)
    assert (decoded.width, decoded.height) == (20, 40)
    assert corner_colours(decoded) == list(ORIENTED[6][1])


@pytest.mark.parametrize(
    "raw", [b"Exif\x00\x00" + bytes(range(256)) * 2, b"Exif\x00\x00II*\x00\x08\x00\x00\x00\xff\xff"]
)
def test_broken_exif_keeps_the_picture_unrotated(raw: bytes) -> None:
    decoded = decode_image(corpus_mod._exif_jpeg(quadrants(40, 20), None, raw), LIMITS)
    assert decoded.image.size == (40, 20)


def test_big_rotated_jpeg_uses_draft_but_reports_the_original_size() -> None:
    data = corpus_mod._exif_jpeg(corpus_mod._photo(1600, 1200, 0), 6)
    decoded = decode_image(data, LIMITS, min_side=300)
    assert (decoded.width, decoded.height) == (1200, 1600)
    assert decoded.image.size == (300, 400)  # 1/4 scale, then rotated
    full = decode_image(data, LIMITS)
    assert full.image.size == (1200, 1600)


@pytest.mark.parametrize(
    ("size", "min_side", "decoded_size"),
    [
        ((3200, 2400), 768, (800, 600)),
        ((1000, 4000), 768, (250, 1000)),  # the longest side still meets min_side
        ((1000, 800), 768, (1000, 800)),  # not much larger than needed: full decode
        ((3200, 2400), 0, (3200, 2400)),
    ],
)
def test_jpeg_draft_keeps_the_longest_side_at_least_min_side(
    size: tuple[int, int], min_side: int, decoded_size: tuple[int, int]
) -> None:
    data = encode(Image.new("RGB", size, (10, 120, 200)), "JPEG")
    decoded = decode_image(data, LIMITS, min_side=min_side)
    assert decoded.image.size == decoded_size
    assert (decoded.width, decoded.height) == size
    assert max(decoded.image.size) >= min_side
    assert decoded.image.mode == "RGB"


def test_min_side_does_not_shrink_non_jpeg() -> None:
    decoded = decode_image(encode(Image.new("RGB", (2000, 100)), "PNG"), LIMITS, min_side=100)
    assert decoded.image.size == (2000, 100)


def test_palette_with_transparency_composites_onto_white() -> None:
    image = Image.new("P", (16, 16), 0)
    image.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    image.paste(1, (8, 0, 16, 16))
    decoded = decode_image(encode(image, "PNG", transparency=b"\x00\xff"), LIMITS)
    assert decoded.image.mode == "RGB"
    assert pixel(decoded, (2, 2)) == WHITE  # index 0 (red) is fully transparent
    assert pixel(decoded, (12, 2)) == BLUE


def test_gif_transparency_composites_onto_white() -> None:
    image = Image.new("P", (8, 8), 0)
    image.putpalette([0, 0, 0, 200, 10, 10] + [0] * 762)
    image.paste(1, (4, 0, 8, 8))
    decoded = decode_image(encode(image, "GIF", transparency=0), LIMITS)
    assert pixel(decoded, (1, 1)) == WHITE
    assert pixel(decoded, (6, 1)) == (200, 10, 10)


@pytest.mark.parametrize(
    ("mode", "colour", "expected"),
    [
        ("RGBA", (0, 0, 0, 0), WHITE),  # fully transparent black is white, not black
        ("RGBA", (255, 0, 0, 128), (255, 127, 127)),
        ("LA", (90, 128), (172, 172, 172)),
        ("RGBA", (10, 20, 30, 255), (10, 20, 30)),
    ],
)
def test_alpha_is_composited_onto_white(
    mode: str, colour: tuple[int, ...], expected: tuple[int, int, int]
) -> None:
    decoded = decode_image(encode(Image.new(mode, (8, 8), colour), "PNG"), LIMITS)
    assert decoded.image.mode == "RGB"
    assert close_to(pixel(decoded, (4, 4)), expected, 1)


def test_grey_colour_key_transparency_is_white() -> None:
    image = Image.new("L", (8, 8), 7)
    image.paste(200, (4, 0, 8, 8))
    decoded = decode_image(encode(image, "PNG", transparency=7), LIMITS)
    assert pixel(decoded, (1, 1)) == WHITE
    assert pixel(decoded, (6, 1)) == (200, 200, 200)


def test_sixteen_bit_grey_colour_key_transparency_is_white_too() -> None:
    """The 16-bit twin of the test above: transparent pixels are white, not the black their
    grey value stands for, and the rest keeps its grey."""
    row = b"\x00\x00" * 4 + b"\x80\x00" * 4
    trns = corpus_mod.png_chunk(b"tRNS", b"\x00\x00")
    plain = corpus_mod.png_from_rows(8, 8, 16, 0, [row] * 8)
    ihdr_end = 8 + 25
    data = plain[:ihdr_end] + trns + plain[ihdr_end:]
    with Image.open(io.BytesIO(data)) as raw:
        assert raw.mode == "I;16" and raw.info["transparency"] == 0
    decoded = decode_image(data, LIMITS)
    assert pixel(decoded, (1, 1)) == WHITE
    assert pixel(decoded, (6, 1)) == (128, 128, 128)
    assert pixel(decode_image(plain, LIMITS), (1, 1)) == (0, 0, 0)


def test_sixteen_bit_gradient_keeps_its_full_range() -> None:
    gradient = np.tile(np.linspace(0, 65535, 256).astype(np.uint16), (4, 1))
    data = encode(Image.fromarray(gradient), "PNG")
    with Image.open(io.BytesIO(data)) as raw:
        assert raw.mode == "I;16"
    grey = np.asarray(decode_image(data, LIMITS).image)[0, :, 0].astype(int)
    assert grey[0] == 0 and grey[-1] == 255
    assert abs(grey[128] - 128) <= 1
    assert np.all(np.diff(grey) >= 0)
    assert len(np.unique(grey)) > 200  # scaled, not clipped to a handful of values


def test_sixteen_bit_tiff_and_rgb_png_keep_their_range() -> None:
    gradient = np.tile(np.linspace(0, 65535, 256).astype(np.uint16), (4, 1))
    tiff = np.asarray(decode_image(encode(Image.fromarray(gradient), "TIFF"), LIMITS).image)
    assert (tiff.min(), tiff.max()) == (0, 255)
    rgb16 = np.asarray(decode_image(corpus_mod._png16(64, 4, 2, 3), LIMITS).image)
    assert (rgb16.min(), rgb16.max()) == (0, 255)


def test_float_and_wide_integer_images_are_scaled() -> None:
    floats = np.linspace(0, 1, 256, dtype=np.float32).reshape(1, 256).repeat(2, axis=0)
    decoded = decode_image(encode(Image.fromarray(floats), "TIFF"), LIMITS)
    row = np.asarray(decoded.image)[0, :, 0]
    assert (row.min(), row.max()) == (0, 255)
    wide = Image.fromarray(np.array([[0, 1000, 65535]], dtype=np.int32))
    assert wide.mode == "I"
    assert np.asarray(ingest.to_rgb(wide))[0, :, 0].tolist() == [0, 4, 255]


def test_cmyk_red_stays_red() -> None:
    decoded = decode_image(encode(Image.new("CMYK", (16, 16), (0, 255, 255, 0)), "JPEG"), LIMITS)
    red, green, blue = pixel(decoded, (8, 8))
    assert decoded.image.mode == "RGB"
    assert red > 220 and green < 40 and blue < 40


def test_bilevel_and_greyscale_become_rgb() -> None:
    image = Image.new("1", (8, 8), 0)
    image.paste(1, (4, 0, 8, 8))
    decoded = decode_image(encode(image, "PNG"), LIMITS)
    assert decoded.image.mode == "RGB"
    assert pixel(decoded, (1, 1)) == (0, 0, 0)
    assert pixel(decoded, (6, 1)) == WHITE
    grey = decode_image(encode(Image.new("L", (8, 8), 77), "JPEG"), LIMITS)
    assert grey.image.mode == "RGB" and close_to(pixel(grey, (4, 4)), (77, 77, 77), 2)


def test_ycbcr_image_is_converted() -> None:
    ycbcr = Image.new("RGB", (8, 8), (30, 160, 90)).convert("YCbCr")
    assert close_to(ingest.to_rgb(ycbcr).getpixel((0, 0)), (30, 160, 90), 3)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("fmt", "params"),
    [("GIF", {}), ("WEBP", {"lossless": True}), ("PNG", {})],
    ids=["gif", "webp", "apng"],
)
def test_animation_gives_the_first_frame(fmt: str, params: dict[str, object]) -> None:
    frames = [Image.new("RGB", (24, 16), colour) for colour in [(220, 20, 20), (20, 220, 20), (20, 20, 220)]]
    data = encode(frames[0], fmt, save_all=True, append_images=frames[1:], duration=50, loop=0, **params)
    decoded = decode_image(data, LIMITS)
    assert decoded.format == fmt
    assert decoded.image.size == (24, 16)
    assert close_to(pixel(decoded, (12, 8)), (220, 20, 20), 8)


@pytest.mark.parametrize(
    ("size", "fmt"), [((1, 10_000), "PNG"), ((10_000, 1), "PNG"), ((1, 10_000), "JPEG"), ((10_000, 1), "GIF")]
)
def test_extreme_aspect_ratios_decode(size: tuple[int, int], fmt: str) -> None:
    image = Image.new("RGB", size, (51, 102, 153))  # in the web palette, so GIF keeps it exactly
    decoded = decode_image(encode(image.convert("P") if fmt == "GIF" else image, fmt), LIMITS, min_side=768)
    assert decoded.image.size == size
    assert (decoded.width, decoded.height) == size
    assert close_to(pixel(decoded, (0, 0)), (51, 102, 153), 6)


def test_decoded_image_is_loaded_and_detached() -> None:
    decoded = decode_image(encode(Image.new("RGB", (8, 8), (1, 2, 3)), "PNG"), LIMITS)
    assert not isinstance(decoded.image, ImageFile.ImageFile)
    assert decoded.image.mode == "RGB"
    assert decoded.image.getpixel((0, 0)) == (1, 2, 3)


@pytest.mark.skipif(not hasattr(Image, "fromarrow"), reason="Pillow before 11.2 cannot share pixels, so it copies")
def test_a_decoded_photo_shares_its_pixels_instead_of_copying_them(monkeypatch: pytest.MonkeyPatch) -> None:
    """The common case (an RGB JPEG that needs no turning) is detached without a pixel copy."""
    photo = corpus_mod._photo(1024, 768, 7)
    data = encode(photo, "JPEG", quality=95)

    def no_copy(self: Image.Image) -> Image.Image:
        raise AssertionError("the decoded pixels were copied")

    monkeypatch.setattr(Image.Image, "copy", no_copy)
    decoded = decode_image(data, LIMITS)
    monkeypatch.undo()
    assert not isinstance(decoded.image, ImageFile.ImageFile)
    with Image.open(io.BytesIO(data)) as reference:
        expected = np.asarray(reference.convert("RGB"))
    gc.collect()  # the ImageFile it came from is gone; the pixels are not
    assert np.array_equal(np.asarray(decoded.image), expected)
    assert resample._lent_pixels(decoded.image) is not None  # and the resizes can borrow them in turn
    decoded.image.paste((0, 0, 0), (0, 0, 4, 4))  # writing copies first
    assert decoded.image.getpixel((0, 0)) == (0, 0, 0)


def test_a_picture_over_one_memory_block_is_still_decoded_whole() -> None:
    """Pillow keeps pictures over 16 MB in several blocks, which cannot be shared: copied."""
    decoded = decode_image(encode(Image.new("RGB", (2100, 2100), (9, 8, 7)), "PNG"), LIMITS)
    assert not isinstance(decoded.image, ImageFile.ImageFile)
    assert decoded.image.size == (2100, 2100)
    assert decoded.image.getpixel((2099, 2099)) == (9, 8, 7)


# ------------------------------------------------------------------------------------------------
# Stored copies
# ------------------------------------------------------------------------------------------------


def stored_copy(image: Image.Image, max_side: int) -> bytes:
    """The bytes the library stores as a picture's copy."""
    buffer = io.BytesIO()
    save_thumbnail(thumbnail_of(image, max_side), buffer)
    return buffer.getvalue()


def test_thumbnail_fits_and_is_a_quality_85_jpeg() -> None:
    data = stored_copy(corpus_mod._photo(2000, 1000, 3), 768)
    assert THUMBNAIL_EXTENSION == "jpg"
    with Image.open(io.BytesIO(data)) as thumb:
        assert thumb.format == "JPEG" and thumb.mode == "RGB"
        assert thumb.size == (768, 384)
        reference = Image.open(io.BytesIO(encode(Image.new("RGB", (8, 8)), "JPEG", quality=85)))
        assert thumb.quantization == reference.quantization  # type: ignore[attr-defined]


def test_thumbnail_never_upscales_and_handles_alpha() -> None:
    data = stored_copy(Image.new("RGBA", (100, 50), (0, 0, 0, 0)), 768)
    with Image.open(io.BytesIO(data)) as thumb:
        assert thumb.size == (100, 50)
        assert close_to(thumb.getpixel((50, 25)), WHITE, 2)  # type: ignore[arg-type]


def test_thumbnail_drops_metadata() -> None:
    exif = Image.Exif()
    exif[0x0112] = 1
    exif[0x010F] = "Camera maker with GPS"
    source = Image.open(io.BytesIO(encode(Image.new("RGB", (64, 64)), "JPEG", exif=exif.tobytes())))
    source.load()
    assert "exif" in source.info
    data = stored_copy(source, 32)
    with Image.open(io.BytesIO(data)) as thumb:
        assert "exif" not in thumb.info
        assert len(thumb.getexif()) == 0


def test_a_copy_that_already_fits_is_written_without_any_metadata() -> None:
    """A picture small enough is stored as it is, so the encoder, not a resize, must leave out
    EXIF, the ICC profile and the comment (Pillow copies a source's comment unless told not to)."""
    from PIL import ImageCms

    exif = Image.Exif()
    exif[0x010F] = "Camera maker with GPS"
    icc = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    original = encode(Image.new("RGB", (64, 48), "teal"), "JPEG", exif=exif.tobytes(), icc_profile=icc, comment=b"at home")
    source = Image.open(io.BytesIO(original))
    source.load()
    assert {"exif", "icc_profile", "comment"} <= set(source.info)
    copy = thumbnail_of(source, 768)
    assert copy.size == (64, 48)
    target = io.BytesIO()
    save_thumbnail(copy, target)
    data = target.getvalue()
    assert b"at home" not in data and b"Camera maker" not in data
    with Image.open(io.BytesIO(data)) as thumb:
        assert not {"exif", "icc_profile", "comment"} & set(thumb.info)


def test_thumbnail_of_an_extreme_aspect_keeps_one_pixel() -> None:
    data = stored_copy(Image.new("RGB", (10_000, 1)), 768)
    with Image.open(io.BytesIO(data)) as thumb:
        assert thumb.size == (768, 1)


# ------------------------------------------------------------------------------------------------
# The hostile corpus
# ------------------------------------------------------------------------------------------------

REQUIRED_KINDS = {
    "bomb",
    "costly_structure",
    "truncated",
    "corrupt",
    "empty",
    "wrong_extension",
    "not_an_image",
    "polyglot",
    "animated",
    "colour_mode",
    "exif_orientation",
    "extreme_aspect",
    "size_limit",
    "odd_name",
}


Corpus = tuple[Path, list[Any]]  # (folder, CorpusFile list) from bench/hostile_corpus.py


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Corpus:
    out = tmp_path_factory.mktemp("hostile")
    return out, corpus_mod.generate_corpus(out, seed=0)


def _outcome(path: Path, limits: IngestSettings) -> tuple[str, str]:
    try:
        decoded = decode_image(read_limited(path, limits.max_file_bytes), limits, min_side=limits.thumb_max_side)
    except RejectedImage as error:
        return "rejected", error.reason
    assert decoded.image.mode == "RGB"
    assert decoded.width > 0 and decoded.height > 0
    return "indexed", ""


def test_corpus_is_big_varied_and_stays_inside_its_folder(corpus: Corpus) -> None:
    out, files = corpus
    assert len(files) >= 200
    assert REQUIRED_KINDS <= {item.kind for item in files}
    assert {item.expect for item in files} == {"indexed", "rejected"}
    root = out.resolve()
    for item in files:
        assert item.path.is_file()
        assert root in item.path.resolve().parents
    names = {item.path.name for item in files}
    assert "..%2f..%2fetc%2fpasswd.jpg" in names
    assert max(len(name.encode()) for name in names) >= 250


def test_every_corpus_file_gets_its_expected_outcome(corpus: Corpus) -> None:
    _, files = corpus
    limits = IngestSettings(
        max_file_bytes=corpus_mod.CORPUS_MAX_FILE_BYTES, max_pixels=corpus_mod.CORPUS_MAX_PIXELS
    )
    wrong = []
    for item in files:
        started = time.perf_counter()
        outcome, reason = _outcome(item.path, limits)
        elapsed = time.perf_counter() - started
        if outcome != item.expect:
            wrong.append(f"{item.kind}/{item.path.name!r}: expected {item.expect}, got {outcome} {reason!r}")
        if outcome == "rejected":
            assert "\n" not in reason and len(reason) < 100, reason
            assert "Traceback" not in reason and "PIL" not in reason, reason
        if item.kind == "bomb":
            assert "pixel limit" in reason, (item.path.name, reason)
            assert elapsed < 0.5, (item.path.name, elapsed)
        if item.kind == "costly_structure" and outcome == "rejected":
            assert reason.startswith(("image file is split", "image is stored in", "image carries")) or (
                reason == CORRUPT_REASON and "padding" in item.path.name
            ), (item.path.name, reason)
    assert wrong == []


def test_corpus_is_reproducible_from_its_seed(corpus: Corpus, tmp_path: Path) -> None:
    out, files = corpus
    again = corpus_mod.generate_corpus(tmp_path, seed=0)
    assert [(f.kind, f.path.name, f.expect) for f in again] == [(f.kind, f.path.name, f.expect) for f in files]
    for first, second in zip(files, again, strict=True):
        assert first.path.read_bytes() == second.path.read_bytes(), first.path.name


def test_corpus_command_line_prints_the_summary(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert corpus_mod.main([str(tmp_path / "out"), "--seed", "7"]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("kind")
    assert "2 MB file limit" in printed
    assert any(line.startswith("total") for line in printed.splitlines())
    assert (tmp_path / "out" / "bomb").is_dir()


def test_corpus_summary_table_counts_every_file(corpus: Corpus) -> None:
    _, files = corpus
    table = corpus_mod.summary_table(files)
    last = table.splitlines()[-1].split()
    assert last[0] == "total" and int(last[-1]) == len(files)
    assert int(last[1]) == sum(1 for f in files if f.expect == "indexed")
    for kind in REQUIRED_KINDS:
        assert any(line.startswith(kind + " ") for line in table.splitlines())
