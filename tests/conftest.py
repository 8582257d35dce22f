"""Shared fixtures: the shipped small CLIP, a real library on disk, and image makers.

Tests run offline on `shoebox-tiny`, the model this repository trains and ships, through the same
open_clip loading code the product uses. `SHOEBOX_TEST_CHECKPOINT` may point at other weights of
the same architecture (used while retraining the shipped ones).
"""

from __future__ import annotations

import io
import os
import threading
import time
from pathlib import Path
from typing import AsyncIterator, Callable

import pytest
from PIL import Image

os.environ["HF_HUB_OFFLINE"] = "1"
# Vectors must not depend on which CPU runs the suite: `auto` would pick bf16 on some machines
# only. The automatic choice has its own tests in test_embedder.py.
os.environ["SHOEBOX_CLIP_PRECISION"] = "fp32"

from store.embedder import ClipEmbedder, load_embedder  # noqa: E402
from store.library import Library  # noqa: E402
from store.settings import ClipSettings, IngestSettings, Settings  # noqa: E402


def tiny_clip_settings() -> ClipSettings:
    checkpoint = os.environ.get("SHOEBOX_TEST_CHECKPOINT")
    return ClipSettings(
        model="shoebox-tiny",
        pretrained=None,
        checkpoint=Path(checkpoint) if checkpoint else None,
        precision="fp32",
        batch_size=16,
    )


@pytest.fixture(scope="session")
def embedder() -> ClipEmbedder:
    return load_embedder(tiny_clip_settings())


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(
        data_dir=tmp_path / "data",
        clip=tiny_clip_settings(),
        ingest=IngestSettings(max_file_bytes=5 * 1024 * 1024, max_pixels=40_000_000),
    )


@pytest.fixture
async def library(settings: Settings, embedder: ClipEmbedder) -> AsyncIterator[Library]:
    lib = await Library.open(settings, embedder)
    try:
        yield lib
    finally:
        await lib.close()


@pytest.fixture
def cli_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Point the CLI at the small model, whatever the developer's own environment says, and run
    it from an empty folder: the CLI reads `.env` from where it runs, and a developer's own (a
    key, captions on) would otherwise reach the tests."""
    monkeypatch.chdir(tmp_path)
    checkpoint = os.environ.get("SHOEBOX_TEST_CHECKPOINT")
    for name in list(os.environ):
        if name.startswith("SHOEBOX_") or name.startswith("ANTHROPIC_"):
            monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("SHOEBOX_CLIP_MODEL", "shoebox-tiny")
    if checkpoint:
        monkeypatch.setenv("SHOEBOX_CLIP_CHECKPOINT", checkpoint)


def jpeg_bytes(colour: tuple[int, int, int], size: tuple[int, int] = (96, 64), mark: int = 0) -> bytes:
    """A small JPEG of one colour; `mark` draws a few distinguishing pixels so bytes differ."""
    image = Image.new("RGB", size, colour)
    for i in range(mark):
        image.putpixel((i % size[0], (i * 7) % size[1]), (255 - colour[0], 255 - colour[1], 255 - colour[2]))
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def scene_jpeg(colour: str, shape: str, seed: int = 0, size: int = 160, degrade: bool = False) -> bytes:
    """A JPEG of one big coloured shape in the centre, the kind of picture the shipped small CLIP
    knows; `degrade` adds the generator's blur, noise and JPEG artefacts."""
    import numpy as np

    from store.tinyclip.scenes import SceneObject, SceneSpec, render_scene

    rng = np.random.default_rng([seed, len(colour), len(shape)])
    spec = SceneSpec([SceneObject(colour, shape, "big", "centre")])
    buffer = io.BytesIO()
    render_scene(spec, rng, size=size, degrade=degrade).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


@pytest.fixture
def make_jpeg() -> Callable[..., bytes]:
    return jpeg_bytes


def sqlite_threads() -> set[threading.Thread]:
    """The running aiosqlite connection threads (one per open connection)."""
    return {t for t in threading.enumerate() if "_connection_worker_thread" in t.name}


def sqlite_threads_left(before: set[threading.Thread], wait: float = 5.0) -> list[threading.Thread]:
    """Connection threads started since `before` that are still running after up to `wait`
    seconds: each belongs to a connection nobody closed, which keeps the process from exiting."""
    deadline = time.monotonic() + wait
    new = sqlite_threads() - before
    for thread in new:
        thread.join(timeout=max(0.0, deadline - time.monotonic()))
    return [thread for thread in new if thread.is_alive()]


NOT_A_DATABASE = b"these bytes are not an SQLite database\n" * 200


class LargestTensor:
    """While entered, the largest block of memory that a torch operation on this thread makes
    for its result (views of the operation's inputs do not count): what a resize costs, measured
    without timing anything and without the process's earlier peaks in the way."""

    def __init__(self) -> None:
        from torch.utils._python_dispatch import TorchDispatchMode

        outer = self

        class _Watch(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
                result = func(*args, **(kwargs or {}))
                outer._note(result, (*args, *(kwargs or {}).values()))
                return result

        self._mode = _Watch()
        self.nbytes = 0

    def _note(self, result: object, inputs: tuple[object, ...]) -> None:
        import torch

        def tensors(values: object) -> list[torch.Tensor]:
            items = values if isinstance(values, (tuple, list)) else (values,)
            return [value for value in items if isinstance(value, torch.Tensor)]

        borrowed = {tensor.untyped_storage().data_ptr() for tensor in tensors(inputs)}
        for tensor in tensors(result):
            storage = tensor.untyped_storage()
            if storage.data_ptr() not in borrowed:
                self.nbytes = max(self.nbytes, storage.nbytes())

    def __enter__(self) -> "LargestTensor":
        self._mode.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._mode.__exit__(*exc)
