"""Writes that meet: two processes on one data folder (the bot and the CLI beside it), and writes
in one process that overlap a save, a re-clustering or a forget."""

from __future__ import annotations

import asyncio
import os
import sqlite3
import subprocess
import sys
import threading
import time
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
    live = tmp_path / f"{INDEX_FILE}.{os.getppid()}-1.tmp"  # another process, alive
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


class _ModelWhileAnotherForgets:
    """A "new model" whose first pass lets another process forget the first image: the bot
    deleting a photo while the CLI re-indexes."""

    def __init__(self, embedder: ClipEmbedder, other: Library, loop: asyncio.AbstractEventLoop) -> None:
        self.dim = embedder.dim
        self.model_id = "another-model"
        self._embedder, self._other, self._loop = embedder, other, loop
        self.forgotten: int | None = None

    def embed_images(self, images: list[object]) -> np.ndarray:
        if self.forgotten is None:
            ids = asyncio.run_coroutine_threadsafe(self._other.catalog.all_image_ids(), self._loop).result()
            self.forgotten = int(ids[0])
            assert asyncio.run_coroutine_threadsafe(self._other.forget_image(self.forgotten), self._loop).result()
        return self._embedder.embed_images(images)  # type: ignore[arg-type]

    def embed_texts(self, texts: list[str]) -> np.ndarray:
        return self._embedder.embed_texts(texts)


async def test_a_reindex_goes_on_when_an_image_is_forgotten_under_it(
    cli_and_bot: tuple[Library, Library], embedder: ClipEmbedder, tmp_path: Path
) -> None:
    cli, bot = cli_and_bot
    await cli.index([IncomingImage(file_source(photo(tmp_path / "more", "b.jpg", 2)))])
    model = _ModelWhileAnotherForgets(embedder, bot, asyncio.get_running_loop())
    assert await cli.reindex(model) == 1  # type: ignore[arg-type]
    assert model.forgotten not in cli.vectors.ids().tolist()
    assert await cli.catalog.models_in_use() == {"another-model": 1}


async def test_a_catch_up_and_a_commit_of_this_process_never_hold_an_id_twice(
    cli_and_bot: tuple[Library, Library], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A search's catch-up (the other process wrote) reads the catalog while this process
    commits: the commit's images must reach FAISS once, whichever is seen first."""
    cli, bot = cli_and_bot
    await bot.index([IncomingImage(file_source(photo(tmp_path / "bot", "b.jpg", 5)))])
    committed = asyncio.Event()
    after_commit, read = cli._after_commit, cli.catalog.image_ids_and_generation

    async def after_commit_noted(*args: object) -> None:
        committed.set()
        await after_commit(*args)  # type: ignore[arg-type]

    async def read_once_committed() -> tuple[np.ndarray, int]:
        await committed.wait()
        return await read()

    monkeypatch.setattr(cli, "_after_commit", after_commit_noted)
    monkeypatch.setattr(cli.catalog, "image_ids_and_generation", read_once_committed)
    catching_up = asyncio.ensure_future(cli.sync_vectors())
    await asyncio.sleep(0.05)
    await cli.index([IncomingImage(file_source(photo(tmp_path / "cli", "c.jpg", 9)))])
    await catching_up
    in_index = cli.vectors.ids().tolist()
    assert sorted(in_index) == (await cli.catalog.all_image_ids()).tolist()


async def test_verify_repairs_an_id_held_twice(library: Library, tmp_path: Path) -> None:
    [stored] = await library.index([IncomingImage(file_source(photo(tmp_path, "c.jpg", 9)))])
    vector = library.vectors.vector(stored.image_id or 0)
    assert vector is not None
    library.vectors.add(np.array([stored.image_id]), vector.reshape(1, -1))
    first = await library.verify(repair=True)
    assert any("1 twice" in line for line in first.repaired), first
    assert (await library.verify(repair=False)).problems == []
    assert library.vectors.ids().tolist() == [stored.image_id]


async def test_a_save_whose_caller_was_cancelled_finishes_before_the_next(
    library: Library, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The queue's worker is cancelled at shutdown in the middle of a save that re-clusters the
    index; `close` then saves again. The second must wait for the first, not run beside it."""
    rng = np.random.default_rng(0)
    library.vectors.add(np.arange(1, 3001), rng.normal(size=(3000, library.embedder.dim)).astype(np.float32))
    library._dirty_since_save = 1
    monkeypatch.setattr(library.vectors, "wants_relayout", lambda: True)
    train = vectors_module._train_ivf
    trainings: list[float] = []

    def slow_train(vectors: np.ndarray, ids: np.ndarray, d: int) -> object:
        trainings.append(time.monotonic())
        time.sleep(0.5)
        return train(vectors, ids, d)

    monkeypatch.setattr(vectors_module, "_train_ivf", slow_train)
    first = asyncio.ensure_future(library.save_vectors())
    await asyncio.sleep(0.2)
    first.cancel()
    await library.save_vectors()
    assert len(trainings) == 2 and trainings[1] - trainings[0] >= 0.5  # one after the other
    assert sorted(library.vectors.ids().tolist()) == list(range(1, 3001))


def test_a_temp_file_of_this_process_id_is_swept_unless_its_thread_is_alive(tmp_path: Path) -> None:
    """In a container the bot is PID 1 after every restart: a save killed there leaves a file
    under the new process's own id."""
    killed = tmp_path / f"{INDEX_FILE}.{os.getpid()}-12345.tmp"
    saving = tmp_path / f"{INDEX_FILE}.{os.getpid()}-{threading.get_ident()}.tmp"
    for path in (killed, saving):
        path.write_bytes(b"partial")
    assert sweep_stale_temp_files(tmp_path) == 1
    assert not killed.exists() and saving.exists()


async def test_a_moved_file_keeps_its_imported_text(library: Library, tmp_path: Path) -> None:
    folder = tmp_path / "pictures"
    first = photo(folder, "a.jpg", 3)
    await library.index_paths([folder])
    assert await library.set_file_text(first, "grandpa at the lake")
    moved = folder / "2024" / "a.jpg"
    moved.parent.mkdir()
    first.rename(moved)
    await library.index_paths([folder])
    await library.forget_missing_files(folder)
    [kept] = await library.catalog.file_sources_under(str(folder.resolve()))
    assert (kept.path, kept.posted_text) == (str(moved.resolve()), "grandpa at the lake")
