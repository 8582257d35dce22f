"""Writes that meet: two processes on one data folder (the bot and the CLI beside it), and writes
in one process that overlap a save, a re-clustering or a forget."""

from __future__ import annotations

import asyncio
import os
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import AsyncIterator

import numpy as np
import pytest

from store import vectors as vectors_module
from store.db import SCHEMA_VERSION, Catalog
from store.embedder import ClipEmbedder
from store.library import IncomingImage, Library, file_source
from store.settings import Settings
from store.vectors import INDEX_FILE, VectorIndex, sweep_stale_temp_files
from tests.conftest import jpeg_bytes


def photo(folder: Path, name: str, mark: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_bytes(jpeg_bytes((30, 120, 200), mark=mark))
    return path


async def test_a_commit_that_changed_nothing_leaves_another_writers_change_to_a_catch_up(
    settings: Settings, embedder: ClipEmbedder, tmp_path: Path
) -> None:
    """The bot indexes a photo while the CLI indexes a folder again in which nothing changed.
    The CLI's commit must not take the bot's change for its own: its index would then say it is
    current without the bot's photo, save so, and the photo would stay out of search."""
    old = photo(tmp_path / "photos", "old.jpg", 1)
    bot = await Library.open(settings, embedder)
    await bot.index([IncomingImage(file_source(old))])
    cli = await Library.open(settings, embedder)
    [new] = await bot.index([IncomingImage(file_source(photo(tmp_path, "new.jpg", 7)))])
    await bot.close()
    [again] = await cli.index([IncomingImage(file_source(old))])
    assert (new.status, again.status) == ("indexed", "unchanged")
    await cli.close()  # the CLI saves last

    reopened = await Library.open(settings, embedder)
    try:
        in_catalog = set((await reopened.catalog.all_image_ids()).tolist())
        assert new.image_id in in_catalog
        assert set(reopened.vectors.ids().tolist()) == in_catalog
    finally:
        await reopened.close()


async def test_saves_that_meet_take_turns(library: Library) -> None:
    """A batch's save and a forget's save at once: each used to write the same temp file, and
    the second rename failed after its change had committed."""
    rng = np.random.default_rng(0)
    library.vectors.add(np.arange(1, 60_001), rng.normal(size=(60_000, library.embedder.dim)).astype(np.float32))
    for _ in range(3):
        results = await asyncio.gather(*(library.save_vectors() for _ in range(3)), return_exceptions=True)
        assert [r for r in results if isinstance(r, BaseException)] == []
    assert sorted(p.name for p in library.data_dir.glob("vectors.*")) == ["vectors.faiss", "vectors.json"]


def test_writes_made_while_the_index_is_reclustered_are_kept(monkeypatch: pytest.MonkeyPatch) -> None:
    """Re-clustering trains without the lock (searches go on); an image added and one forgotten
    meanwhile must be so in the new layout too."""
    dim = 16
    index = VectorIndex(dim, "m")
    rng = np.random.default_rng(1)
    index.add(np.arange(1, 2001), rng.normal(size=(2000, dim)).astype(np.float32))
    train = vectors_module._train_ivf

    def train_while_writes_land(vectors: np.ndarray, ids: np.ndarray, d: int) -> object:
        index.add(np.array([5000]), rng.normal(size=(1, dim)).astype(np.float32))
        index.remove(np.array([1]))
        index.add(np.array([5001]), rng.normal(size=(1, dim)).astype(np.float32))
        index.remove(np.array([5001]))
        return train(vectors, ids, d)

    monkeypatch.setattr(vectors_module, "_train_ivf", train_while_writes_land)
    index.relayout()
    assert index.layout == "ivf"
    ids = set(index.ids().tolist())
    assert 5000 in ids and 1 not in ids and 5001 not in ids and len(ids) == 2000
    index.add(np.array([6000]), rng.normal(size=(1, dim)).astype(np.float32))  # no longer recorded
    assert index._changes_while_training is None


def test_temp_files_of_a_killed_save_are_swept_and_a_live_ones_kept(tmp_path: Path) -> None:
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(gone.stdout)
    dead = tmp_path / f"{INDEX_FILE}.{dead_pid}-140000.tmp"
    old_style = tmp_path / f"{INDEX_FILE}.{dead_pid}.tmp"
    live = tmp_path / f"{INDEX_FILE}.{os.getpid()}-1.tmp"
    for path in (dead, old_style, live):
        path.write_bytes(b"partial")
    assert sweep_stale_temp_files(tmp_path) == 2
    assert not dead.exists() and not old_style.exists() and live.exists()


async def test_two_processes_creating_the_catalog_at_once_take_turns(tmp_path: Path) -> None:
    """The bot and the CLI started together on a new data folder: the second finds each step of
    the schema done instead of running it again ("table meta already exists")."""
    path = tmp_path / "shoebox.sqlite3"
    for _ in range(10):
        path.unlink(missing_ok=True)
        catalogs = await asyncio.gather(*(Catalog(path).open() for _ in range(3)), return_exceptions=True)
        failures = [c for c in catalogs if isinstance(c, BaseException)]
        for catalog in catalogs:
            if isinstance(catalog, Catalog):
                await catalog.close()
        assert failures == []
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION


async def test_a_forget_keeps_the_copy_of_its_bytes_indexed_again_meanwhile(
    library: Library, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A forget commits; before it has deleted the stored copy, the same bytes are indexed from
    another file, which finds the copy in place and keeps it. Whatever the forget looked at
    before that, it must not delete the copy from under the new image."""
    first_path = photo(tmp_path, "a.jpg", 1)
    [first] = await library.index([IncomingImage(file_source(first_path))])
    again = tmp_path / "again.jpg"
    again.write_bytes(first_path.read_bytes())
    indexed_again = asyncio.Event()
    listing = library.catalog.all_thumbs

    async def listing_from_before_the_index() -> set[str]:
        seen = await listing()
        await indexed_again.wait()
        return seen

    monkeypatch.setattr(library.catalog, "all_thumbs", listing_from_before_the_index)
    forget = asyncio.create_task(library.forget_image(first.image_id))
    for _ in range(500):
        if await library.catalog.get_image(first.image_id) is None:
            break  # the forget has committed
        await asyncio.sleep(0.01)
    [second] = await library.index([IncomingImage(file_source(again))])
    indexed_again.set()
    assert await asyncio.wait_for(forget, timeout=30)
    assert second.status == "indexed"
    record = await library.catalog.get_image(second.image_id)
    assert record is not None and library.thumb_path(record).is_file()


async def test_a_file_back_to_its_indexed_bytes_clears_its_failure(library: Library, tmp_path: Path) -> None:
    path = photo(tmp_path, "a.jpg", 1)
    good = path.read_bytes()
    await library.index([IncomingImage(file_source(path))])
    path.write_bytes(good[: len(good) // 3])  # a save caught half-way
    [bad] = await library.index([IncomingImage(file_source(path))])
    assert bad.status == "failed" and len(await library.catalog.recent_failures(10)) == 1
    path.write_bytes(good)
    [back] = await library.index([IncomingImage(file_source(path))])
    assert back.status == "unchanged"
    assert await library.catalog.recent_failures(10) == []


@pytest.fixture
async def cli_and_bot(settings: Settings, embedder: ClipEmbedder, tmp_path: Path) -> AsyncIterator[tuple[Library, Library]]:
    """Two libraries on one data folder (two processes), the first holding one photo."""
    cli = await Library.open(settings, embedder)
    bot = await Library.open(settings, embedder)
    try:
        await cli.index([IncomingImage(file_source(photo(tmp_path / "photos", "a.jpg", 1)))])
        yield cli, bot
    finally:
        await bot.close()
        await cli.close()


class _ModelThatWatchesAnotherIndexer:
    """A "new model" (the test model's weights under another name) whose every pass first lets
    another process's library store a new photo: the bot indexing while the CLI re-indexes."""

    def __init__(self, embedder: ClipEmbedder, other: Library, folder: Path, loop: asyncio.AbstractEventLoop, arrivals: int) -> None:
        self.dim = embedder.dim
        self.model_id = "another-model"
        self._embedder, self._other, self._folder, self._loop = embedder, other, folder, loop
        self.arrivals = arrivals
        self.stored: list[int] = []

    def embed_images(self, images: list[object]) -> np.ndarray:
        if len(self.stored) < self.arrivals:
            path = photo(self._folder, f"new{len(self.stored)}.jpg", 100 + len(self.stored))
            index = self._other.index([IncomingImage(file_source(path))])
            [outcome] = asyncio.run_coroutine_threadsafe(index, self._loop).result()
            self.stored.append(outcome.image_id)
        return self._embedder.embed_images(images)  # type: ignore[arg-type]

    def embed_texts(self, texts: list[str]) -> np.ndarray:
        return self._embedder.embed_texts(texts)


async def test_a_reindex_takes_in_the_images_stored_while_it_runs(
    cli_and_bot: tuple[Library, Library], embedder: ClipEmbedder, tmp_path: Path
) -> None:
    cli, bot = cli_and_bot
    model = _ModelThatWatchesAnotherIndexer(embedder, bot, tmp_path / "later", asyncio.get_running_loop(), 2)
    assert await cli.reindex(model) == 3  # type: ignore[arg-type]
    assert len(model.stored) == 2
    assert await cli.catalog.models_in_use() == {"another-model": 3}
    assert set(cli.vectors.ids().tolist()) == set((await cli.catalog.all_image_ids()).tolist())


async def test_a_reindex_outpaced_by_new_images_stops_before_the_swap_and_says_why(
    cli_and_bot: tuple[Library, Library], embedder: ClipEmbedder, tmp_path: Path
) -> None:
    from store.library import REINDEX_ROUNDS, ReindexOutpaced

    cli, bot = cli_and_bot
    model = _ModelThatWatchesAnotherIndexer(embedder, bot, tmp_path / "later", asyncio.get_running_loop(), 10_000)
    with pytest.raises(ReindexOutpaced, match="kept arriving") as stopped:
        await cli.reindex(model)  # type: ignore[arg-type]
    assert len(model.stored) == REINDEX_ROUNDS
    assert stopped.value.done == REINDEX_ROUNDS
    assert set(await cli.catalog.models_in_use()) == {embedder.model_id}  # nothing swapped
