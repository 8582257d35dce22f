"""Resizing on torch's uint8 kernels: same sizes and pixels as Pillow, and no OpenMP team."""

from __future__ import annotations

import gc
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from store import resample
from store.resample import as_tensor, fit_within, resize_and_center_crop, shrink_to_fit, to_image
from tests.conftest import LargestTensor

MB = 1024 * 1024


def _photo(width: int, height: int, seed: int = 0) -> Image.Image:
    """Smooth colour fields plus grain: resampling differences show up on both."""
    rng = np.random.default_rng(seed)
    coarse = Image.fromarray(rng.integers(0, 256, size=(6, 8, 3), dtype=np.uint8)).resize((width, height))
    grain = rng.normal(0, 12, size=(height, width, 3))
    return Image.fromarray(np.clip(np.asarray(coarse, dtype=np.float64) + grain, 0, 255).astype(np.uint8))


def test_fit_within_keeps_the_shape_and_never_enlarges() -> None:
    assert fit_within(1024, 768, 768) == (768, 576)
    assert fit_within(768, 1024, 768) == (576, 768)
    assert fit_within(10_000, 1, 768) == (768, 1)
    assert fit_within(500, 300, 768) == (500, 300)
    assert fit_within(769, 769, 768) == (768, 768)


def test_pixels_survive_the_round_trip_in_either_layout() -> None:
    image = _photo(37, 23)
    pixels = as_tensor(image)
    assert pixels.shape == (1, 4, 23, 37) and pixels.dtype == torch.uint8
    assert np.array_equal(pixels[0, :3].permute(1, 2, 0).numpy(), np.asarray(image))
    assert np.array_equal(np.asarray(to_image(pixels)), np.asarray(image))
    planar = pixels.contiguous()
    assert np.array_equal(np.asarray(to_image(planar)), np.asarray(image))
    for three_channels in (pixels[:, :3], planar[:, :3].contiguous()):
        assert np.array_equal(np.asarray(to_image(three_channels)), np.asarray(image))
    with pytest.raises(ValueError, match="RGB"):
        as_tensor(image.convert("L"))


def _copied(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.uint8).copy()


@pytest.mark.skipif(
    not hasattr(Image.Image, "__arrow_c_array__"), reason="Pillow before 11.2 has no Arrow export to lend pixels"
)
def test_pixels_are_lent_without_a_copy_and_outlive_the_picture(monkeypatch: pytest.MonkeyPatch) -> None:
    image = _photo(1024, 768, seed=3)
    expected = _copied(image)

    def no_copy(*args: object) -> bytes:
        raise AssertionError("the pixels were copied out")

    monkeypatch.setattr(image, "tobytes", no_copy)
    pixels = as_tensor(image)
    assert pixels.shape == (1, 4, 768, 1024)
    assert np.array_equal(pixels[0, :3].permute(1, 2, 0).numpy(), expected)
    # The view keeps Pillow's memory alive after the picture is closed and collected.
    view = pixels[:, :3, 100:200]
    image.close()
    del image, pixels
    gc.collect()
    churn = [_photo(1024, 768, seed=s) for s in range(4, 8)]
    assert np.array_equal(view[0].permute(1, 2, 0).numpy(), expected[100:200])
    assert churn


def test_pixels_are_copied_where_pillow_cannot_lend_them(monkeypatch: pytest.MonkeyPatch) -> None:
    """Pictures over Pillow's block size, older Pillows, and any layout not read here."""
    large = _photo(2100, 2100, seed=4)  # 17.6 MB of pixels: more than one 16 MB block
    assert np.array_equal(as_tensor(large)[0, :3].permute(1, 2, 0).numpy(), _copied(large))
    monkeypatch.setattr(resample, "_lent_pixels", lambda image: None)
    image = _photo(64, 48, seed=5)
    assert np.array_equal(as_tensor(image)[0, :3].permute(1, 2, 0).numpy(), _copied(image))


def test_shrink_to_fit_sizes_and_leaves_small_pictures_alone() -> None:
    big = as_tensor(_photo(1024, 768))
    small = shrink_to_fit(big, 768)
    assert small.shape == (1, 4, 576, 768)
    tall = shrink_to_fit(as_tensor(_photo(300, 2000)), 768)
    assert tall.shape == (1, 4, 768, 115)
    fits = as_tensor(_photo(640, 480))
    assert shrink_to_fit(fits, 768) is fits


def test_shrinking_averages_like_pillow() -> None:
    """Bilinear with antialiasing is Pillow's triangle filter: within a level of it."""
    image = _photo(1024, 768, seed=1)
    ours = np.asarray(to_image(shrink_to_fit(as_tensor(image), 768)), dtype=np.int16)
    pillows = np.asarray(image.resize((768, 576), Image.Resampling.BILINEAR), dtype=np.int16)
    assert np.max(np.abs(ours - pillows)) <= 1


@pytest.mark.parametrize("size", [(1024, 768), (300, 1000), (64, 64), (50, 80), (211, 937)])
def test_resize_and_center_crop_is_torchvisions_on_pillow(size: tuple[int, int]) -> None:
    """What open_clip's `Resize(side, bicubic)` + `CenterCrop(side)` make, to within 2 levels
    and a fraction of a level on average (the two round their intermediate pass differently),
    including pictures smaller than the crop (enlarged)."""
    from torchvision import transforms

    image = _photo(*size, seed=2)
    theirs = np.asarray(
        transforms.Compose([transforms.Resize(224, transforms.InterpolationMode.BICUBIC), transforms.CenterCrop(224)])(
            image
        ),
        dtype=np.int16,
    )
    ours = resize_and_center_crop(as_tensor(image), 224, (224, 224), "bicubic")
    assert ours.shape == (3, 224, 224)
    ours_hwc = ours.permute(1, 2, 0).numpy().astype(np.int16)
    difference = np.abs(ours_hwc - theirs)
    assert difference.max() <= 2
    assert difference.mean() < 0.3


def test_crop_larger_than_the_picture_is_refused() -> None:
    with pytest.raises(ValueError, match="larger"):
        resize_and_center_crop(as_tensor(_photo(80, 50)), 32, (40, 40), "bicubic")


def _whole_resize_crop(pixels: torch.Tensor, side: int, crop: int, mode: str) -> tuple[np.ndarray, int]:
    """The crop as torchvision makes it, the whole picture resized and then cut, and the bytes of
    that whole resize."""
    height, width = pixels.shape[-2:]
    new_width, new_height = resample.shortest_side_size(width, height, side)
    whole = F.interpolate(pixels, size=(new_height, new_width), mode=mode, antialias=True)
    top, left = int(round((new_height - crop) / 2.0)), int(round((new_width - crop) / 2.0))
    return whole[0, :3, top : top + crop, left : left + crop].numpy(), whole.untyped_storage().nbytes()


def _cropped(pixels: torch.Tensor, side: int, crop: int, mode: str) -> tuple[np.ndarray, int]:
    """`resize_and_center_crop`'s crop and the most memory it took for one tensor on the way."""
    with LargestTensor() as seen:
        ours = resize_and_center_crop(pixels, side, (crop, crop), mode)  # type: ignore[arg-type]
    return ours.numpy(), seen.nbytes


@pytest.mark.parametrize("size", [(1024, 768), (768, 1024), (640, 480), (1080, 1920), (300, 1000), (211, 937)])
@pytest.mark.parametrize("mode", ["bicubic", "bilinear"])
def test_resizing_only_the_window_the_crop_needs_gives_the_whole_resizes_pixels(
    size: tuple[int, int], mode: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ordinary photos are resized whole; forced to resize only the crop's window on both axes,
    they still get exactly the pixels of the whole resize, from less memory."""
    monkeypatch.setattr(resample, "_WINDOW_ABOVE", 0)
    pixels = as_tensor(_photo(*size, seed=size[0]))
    theirs, whole_bytes = _whole_resize_crop(pixels, 224, 224, mode)
    ours, largest = _cropped(pixels, 224, 224, mode)
    assert np.array_equal(ours, theirs)
    assert largest < whole_bytes


@pytest.mark.parametrize(("size", "side"), [((3, 5000), 64), ((5000, 3), 64), ((40, 9000), 224), ((17, 2000), 224)])
def test_a_very_long_picture_is_cropped_like_the_whole_resize_from_a_window(size: tuple[int, int], side: int) -> None:
    """Past 18:1, only the crop's window is resized; the crop stays within 3 levels of the whole
    resize's (the window may begin a fraction of a source pixel off its grid)."""
    pixels = as_tensor(_photo(*size, seed=size[1]))
    theirs, whole_bytes = _whole_resize_crop(pixels, side, side, "bicubic")
    ours, largest = _cropped(pixels, side, side, "bicubic")
    difference = np.abs(ours.astype(np.int16) - theirs.astype(np.int16))
    assert difference.max() <= 3 and difference.mean() < 0.5
    assert largest < whole_bytes / 4


@pytest.mark.parametrize("size", [(1, 200_000), (200_000, 1), (2, 100_001)])
def test_a_thin_picture_is_cropped_from_its_middle_in_little_memory(size: tuple[int, int]) -> None:
    """1 x 200,000 resized whole to 224 wide would be 224 x 44,800,000 (40 GB): only the window
    is resized, in a few MB."""
    width, height = size
    ramp = np.linspace(0, 255, max(size)).round().astype(np.uint8)
    grey = np.broadcast_to(ramp[:, None] if height > width else ramp[None, :], (height, width))
    picture = Image.fromarray(np.ascontiguousarray(grey)).convert("RGB")
    ours, largest = _cropped(as_tensor(picture), 224, 224, "bicubic")
    assert ours.shape == (3, 224, 224)
    assert np.abs(ours.astype(np.int16) - 127).max() <= 1  # the middle of the ramp
    assert largest <= 4 * MB


def test_resizing_runs_on_one_openmp_thread_and_restores_the_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    """A decoding thread must not fork an OpenMP team beside the model's. Torch forks only when
    the calling thread's limit is above 1, so every resize must see exactly 1 on a fresh thread,
    and the thread's own limit (and every other thread's) must be what it was afterwards."""
    seen: list[int] = []
    interpolate = resample.F.interpolate

    def spy(*args: object, **kwargs: object) -> torch.Tensor:
        seen.append(torch.get_num_threads())
        return interpolate(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(resample.F, "interpolate", spy)
    before_here = torch.get_num_threads()
    limits_after: list[int] = []

    def decode_like() -> None:
        before = torch.get_num_threads()
        pixels = as_tensor(_photo(1024, 768))
        resize_and_center_crop(shrink_to_fit(pixels, 768), 224, (224, 224), "bicubic")
        limits_after.append(torch.get_num_threads() - before)

    with ThreadPoolExecutor(2, thread_name_prefix="decode-like") as pool:
        list(pool.map(lambda _: decode_like(), range(4)))
    assert seen and set(seen) == {1}, seen
    assert limits_after == [0, 0, 0, 0]
    assert torch.get_num_threads() == before_here


def test_the_limit_is_per_thread() -> None:
    """While one thread resizes on one OpenMP thread, another keeps its own limit."""
    if torch.get_num_threads() < 2:
        pytest.skip("torch runs single-threaded here, so there is no other limit to keep")
    inside = threading.Event()
    release = threading.Event()
    observed: list[int] = []

    def hold() -> None:
        with resample.one_openmp_thread():
            observed.append(torch.get_num_threads())
            inside.set()
            release.wait(10)

    worker = threading.Thread(target=hold)
    worker.start()
    try:
        assert inside.wait(10)
        assert torch.get_num_threads() >= 2
    finally:
        release.set()
        worker.join(10)
    assert observed == [1]
