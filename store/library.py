"""The library: Shoebox's one entry point to its images — indexing, searching, forgetting, repair.

It ties the catalog (SQLite, the truth), the vector index (FAISS, derived), the stored copies and
the embedder together and owns the rules that keep them consistent:

* a new image is decoded, copied and embedded first; only then is it committed in one SQLite
  transaction, and only after the commit does it enter the in-memory FAISS index;
* a deletion commits in SQLite first, then leaves FAISS;
* on open (and before each search) FAISS is caught up with SQLite by comparing ids, so a crash
  anywhere costs re-work at most.

CPU work (decoding, the model, FAISS) runs in executors so an asyncio caller never stalls.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import os
import re
import sqlite3
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Callable, Iterable, Sequence, TypeVar

import aiosqlite
import numpy as np
import torch
from PIL import Image

from store import resample
from store.db import Catalog, DatabaseUnavailable, ImageRecord, NewImage, SourceFilter, SourceRecord, first_row
from store.embedder import Embedder
from store.ingest import (
    THUMBNAIL_EXTENSION,
    DecodedImage,
    RejectedImage,
    decode_image,
    read_limited,
    save_thumbnail,
    thumbnail_of,
    too_large_reason,
)
from store.settings import Settings
from store.thumbs import ThumbStore
from store.vectors import VectorIndex, sweep_stale_temp_files

log = logging.getLogger(__name__)

PREPARE_REASON = "image could not be prepared for searching"

DB_FILE = "shoebox.sqlite3"
FUSION_RANK_CONSTANT = 60  # reciprocal-rank fusion: 1 / (c + rank); 60 is the customary value
SAVE_INTERVAL = 30.0  # seconds between saves of the vector index file while writes go on
# Batches in the model at once while indexing, each with its share of the model's threads
# (one each on two cores); more are read and decoded meanwhile (see `Library.index`).
MODEL_LANES = 2
# Batches read and decoded ahead of the lanes. Two, because lanes that finish together (they
# start together, and equal batches keep them in step) each need one: with only one ready,
# the second lane waited 60-100 ms for its next batch to be decoded, once in every few batches.
BATCHES_AHEAD = 2
# A scoped search first checks the best unrestricted candidates against the scope (see
# `Library._search_checking`). Checking one candidate in SQLite costs about as much as listing four
# of the images a scope allows (2.2 us against 0.54 us each, at 100k images), so a scope narrow
# enough that its images number under four times the candidates it would need is listed instead;
# and never more candidates than this.
CHECK_COST_IN_LISTINGS = 4
MAX_CHECKED_CANDIDATES = 4096
# Rounds a re-index makes for images stored while it runs (each round embeds only those), before
# it gives up on a library that never stops growing.
REINDEX_ROUNDS = 20
Progress = Callable[[int, int], None]
_SHA256 = re.compile(r"[0-9a-f]{64}")
Item = TypeVar("Item")


class ModelMismatch(RuntimeError):
    """The catalog was embedded with another model than the one loaded."""


class ReindexIncomplete(RuntimeError):
    """Some images could not be re-embedded (their stored copy is missing or unreadable), so the
    new vectors were not swapped in: one model's vectors never sit beside another's."""

    def __init__(self, image_ids: Sequence[int], done: int) -> None:
        self.image_ids = list(image_ids)
        self.done = done
        shown = ", ".join(str(i) for i in self.image_ids[:10]) + (" ..." if len(self.image_ids) > 10 else "")
        super().__init__(
            f"{len(self.image_ids)} image(s) could not be re-embedded because their stored copies are "
            f"missing or unreadable (ids {shown}); the index still uses the old vectors. Restore those "
            f"copies (from a backup, or by indexing the original files again), or forget those "
            f"images, then run the re-index again: the "
            f"{done} image(s) already done are kept and not embedded again."
        )


class ReindexOutpaced(ReindexIncomplete):
    """New images kept arriving (another process indexing all along) faster than the re-index
    could take them in, so it stopped short of the swap; what it embedded is kept."""

    def __init__(self, done: int) -> None:
        RuntimeError.__init__(
            self,
            f"new images kept arriving while re-embedding, through {REINDEX_ROUNDS} rounds; the index still "
            f"uses the old vectors. Run the re-index again once indexing is quieter: the {done} image(s) "
            "already done are kept and not embedded again.",
        )
        self.image_ids = []
        self.done = done


@dataclass
class IncomingImage:
    """One image to index: where it came from, and its bytes unless they are read from `path`."""

    source: SourceRecord
    data: bytes | None = None


@dataclass
class IndexOutcome:
    source: SourceRecord
    status: str  # "indexed" | "duplicate" | "unchanged" | "failed"
    image_id: int | None = None
    reason: str | None = None


@dataclass
class _Prepared:
    incoming: IncomingImage
    sha256: str = ""
    size: int = 0
    data: bytes | None = None
    decoded: DecodedImage | None = None
    copy: Image.Image | None = None  # the stored copy to write, until its write starts
    copy_written: asyncio.Future[str] | None = None  # its path relative to the data dir
    model_input: object | None = None
    outcome: IndexOutcome | None = None


@dataclass
class VerifyReport:
    problems: list[str] = field(default_factory=list)
    repaired: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def as_dict(self) -> dict[str, object]:
        return {"ok": self.ok, "problems": self.problems, "repaired": self.repaired}


def sha256_of(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class Library:
    def __init__(self, settings: Settings, embedder: Embedder) -> None:
        self.settings = settings
        self.embedder = embedder
        self.data_dir = settings.data_dir
        self.catalog = Catalog(self.data_dir / DB_FILE)
        self.thumbs = ThumbStore(self.data_dir)
        self.vectors = VectorIndex(embedder.dim, embedder.model_id)
        self._cpu = ThreadPoolExecutor(max_workers=2, thread_name_prefix="shoebox-decode")
        # Stored copies are written on threads of their own: each ends in an fsync, and a
        # decoding thread blocked on the disk would leave its core idle.
        self._writers = ThreadPoolExecutor(max_workers=2, thread_name_prefix="shoebox-copies")
        self._model = ThreadPoolExecutor(max_workers=1, thread_name_prefix="shoebox-model")
        # Embedders that split preprocessing from the forward pass (ClipEmbedder) get the resize
        # and crop done on the decoding threads, and index in lanes (see `index`).
        self._splits_preprocessing = all(
            callable(getattr(embedder, name, None))
            for name in ("preprocess_pixels", "embed_preprocessed", "embed_preprocessed_in_lane")
        )
        self._lanes = ThreadPoolExecutor(max_workers=MODEL_LANES, thread_name_prefix="shoebox-lane")
        self._sync_lock = asyncio.Lock()
        self._save_lock = asyncio.Lock()
        self._dirty_since_save = 0
        self._last_save = time.monotonic()
        self._save_seconds = 0.0
        self._closed = False

    # ---- life cycle -------------------------------------------------------------------------

    @classmethod
    async def open(
        cls, settings: Settings, embedder: Embedder, *, allow_other_model: bool = False
    ) -> "Library":
        library = cls(settings, embedder)
        try:
            await library._open(allow_other_model)
        except BaseException:
            # The caller never gets the library to close: release its connections and threads
            # here, or they keep the process from exiting after it has reported the error.
            library._closed = True
            await library._release()
            raise
        return library

    async def _open(self, allow_other_model: bool) -> None:
        try:
            self.data_dir.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise DatabaseUnavailable(
                f"cannot create the data folder {self.data_dir} ({error.strerror or error}): choose "
                "another with --data or SHOEBOX_DATA"
            ) from error
        await self.catalog.open()
        stored_model = await self.catalog.get_meta("model_id")
        if stored_model is None:
            async with self.catalog.transaction() as conn:
                await self.catalog.set_meta(conn, "model_id", self.embedder.model_id)
                await self.catalog.set_meta(conn, "dim", str(self.embedder.dim))
        elif stored_model != self.embedder.model_id:
            if not allow_other_model:
                raise ModelMismatch(
                    f"This library was indexed with the CLIP model '{stored_model}', but "
                    f"'{self.embedder.model_id}' is loaded. Run `shoebox reindex` to re-embed every "
                    "image with the new model, or set SHOEBOX_CLIP_MODEL / SHOEBOX_CLIP_PRETRAINED "
                    "back to the old one."
                )
            return  # reindex mode: the stored vectors are foreign to this model, don't load them
        await self.sweep_stored_copies()
        await asyncio.get_running_loop().run_in_executor(self._cpu, sweep_stale_temp_files, self.data_dir)
        loaded = await asyncio.get_running_loop().run_in_executor(
            self._cpu, VectorIndex.load, self.data_dir, self.embedder.dim, self.embedder.model_id
        )
        if loaded is not None:
            self.vectors = loaded
        await self.sync_vectors()
        if self._dirty_since_save or self.vectors.wants_relayout():
            await self.save_vectors()

    async def close(self) -> None:
        """Save the vector index and release everything; safe to call twice."""
        if self._closed:
            return
        self._closed = True
        try:
            if self._dirty_since_save:
                await self.save_vectors()
        finally:
            await self._release()

    async def _release(self) -> None:
        """Close the catalog and stop the worker threads, saving nothing."""
        await self.catalog.close()
        for pool in (self._cpu, self._writers, self._model, self._lanes):
            pool.shutdown(wait=True)

    async def __aenter__(self) -> "Library":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def save_vectors(self) -> None:
        """Persist FAISS (after re-clustering it if the collection outgrew its layout), one save
        at a time. A caller cancelled meanwhile (the queue's worker at shutdown) stops waiting,
        but the save goes on and holds the turn until its threads are done: the next save
        (`close`'s) waits for it instead of running beside it."""
        await asyncio.shield(asyncio.ensure_future(self._save_vectors_in_turn()))

    async def _save_vectors_in_turn(self) -> None:
        loop = asyncio.get_running_loop()
        async with self._save_lock:
            started = time.monotonic()
            # What is saved covers the changes counted so far; those made during it stay counted.
            dirty = self._dirty_since_save
            vectors = self.vectors
            if vectors.wants_relayout():
                await loop.run_in_executor(self._cpu, vectors.relayout)
            await loop.run_in_executor(self._cpu, vectors.save, self.data_dir)
            self._dirty_since_save = max(0, self._dirty_since_save - dirty)
            self._last_save = time.monotonic()
            self._save_seconds = self._last_save - started

    async def sweep_stored_copies(self) -> int:
        """Delete stored copies no image refers to, the leftovers of a crash; returns how many.

        A copy is written inside the transaction that commits its row, and a dropped image's copy
        is unlinked after its deletion commits, so a crash (or a failed commit) in either window
        leaves an orphan. This holds SQLite's write lock while it looks: copies are only written
        inside write transactions, so no other process can be between writing a copy and
        committing its row, and every unreferenced copy seen now is garbage.
        """
        loop = asyncio.get_running_loop()
        async with self.catalog.transaction() as conn:
            async with conn.execute("SELECT thumb FROM images") as cur:
                known = {str(row[0]) for row in await cur.fetchall()}
            return await loop.run_in_executor(self._cpu, self.thumbs.sweep, known)

    async def _maybe_save(self) -> None:
        """Save now and then, not after every write: the file is only a head start for the next
        open (SQLite is the truth and a stale file is caught up), so saving may take at most a
        tenth of the time and happens at least every SAVE_INTERVAL seconds while writes go on."""
        if not self._dirty_since_save or self._save_lock.locked():
            return  # nothing new, or a save is on its way
        interval = max(SAVE_INTERVAL, 10 * self._save_seconds)
        if time.monotonic() - self._last_save >= interval:
            await self.save_vectors()

    async def sync_vectors(self) -> bool:
        """Bring FAISS up to date with SQLite; returns whether anything changed.

        Cheap when nothing changed (one SELECT of the generation counter), so it runs before every
        search: that is also how a long-running bot sees images another process indexed.
        """
        if await self.catalog.generation() == self.vectors.generation:
            return False
        async with self._sync_lock:
            return await self._catch_up()

    async def _catch_up(self) -> bool:
        """Diff FAISS against SQLite by id and apply the difference (hold `_sync_lock`)."""
        if await self.catalog.generation() == self.vectors.generation:
            return False  # caught up meanwhile (by the search ahead of this one): no ids to read
        db_ids, generation = await self.catalog.image_ids_and_generation()
        if generation == self.vectors.generation:
            return False
        index_ids = self.vectors.ids()
        extra = np.setdiff1d(index_ids, db_ids, assume_unique=True)
        missing = np.setdiff1d(db_ids, index_ids, assume_unique=True)
        if len(extra):
            self.vectors.remove(extra)
        if len(missing):
            log.info("Catching the vector index up: %d to add", len(missing))
            for start in range(0, len(missing), 10_000):
                ids, vecs = await self.catalog.vectors_for(missing[start : start + 10_000])
                self.vectors.add(ids, vecs)
        self.vectors.generation = generation
        changed = bool(len(extra) or len(missing))
        if changed:
            self._dirty_since_save += 1
        return changed

    # ---- executors --------------------------------------------------------------------------

    async def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        return await asyncio.get_running_loop().run_in_executor(
            self._model, self.embedder.embed_texts, list(texts)
        )

    async def embed_images(self, images: Sequence[Image.Image]) -> np.ndarray:
        return await asyncio.get_running_loop().run_in_executor(
            self._model, self.embedder.embed_images, list(images)
        )

    async def decode(self, data: bytes, *, min_side: int = 0) -> DecodedImage:
        """Decode untrusted bytes off the event loop (raises RejectedImage)."""
        return await asyncio.get_running_loop().run_in_executor(
            self._cpu, lambda: decode_image(data, self.settings.ingest, min_side=min_side)
        )

    # ---- indexing ---------------------------------------------------------------------------

    async def index(
        self,
        items: Sequence[IncomingImage],
        progress: Progress | None = None,
        batch_size: int | None = None,
    ) -> list[IndexOutcome]:
        """Index images a batch at a time, several batches on their way at once.

        Each batch commits in one transaction, in order, so an interruption keeps whole batches
        only. One bad file never stops the others: it gets an outcome with a reason.

        With an embedder that splits preprocessing from the model (ClipEmbedder), `MODEL_LANES`
        batches are in the model side by side, each forward pass on a lane thread with its share
        of the model's threads, while `BATCHES_AHEAD` more are read and decoded and the one before
        them commits. On two cores that is two one-thread passes, with no barrier inside a pass where
        one thread waits for another that a decoder has taken the core from; so decoding and
        committing share the cores with the model instead of waiting for it (beside a single
        two-thread pass, decoding measured slower than decoding between passes), and a pass that
        ends finds the next batch ready. A job of one batch (a chat post, or the bot's queue,
        which hands over a batch at a time) has nothing to share the cores with, so its pass runs
        on the embedder's torch thread with all of the model's threads. A job of several batches
        is cut into a multiple of `MODEL_LANES` batches of even size (17 photos: 9 and 8, not 16
        and 1), so that no batch is left to run on one thread while the other lane has nothing to
        do. Other embedders get one batch at a time, the next one read and decoded while this one
        commits.
        """
        items = _unique_sources(items)
        size = batch_size or max(8, getattr(getattr(self.embedder, "settings", None), "batch_size", 16))
        batches = _even_batches(items, size, MODEL_LANES if self._splits_preprocessing else 1)
        lanes = min(MODEL_LANES, len(batches))
        upcoming = iter(batches)
        on_the_way: deque[asyncio.Future[tuple[list[_Prepared], dict[int, np.ndarray]]]] = deque()

        def start_next() -> None:
            batch = next(upcoming, None)
            if batch is not None:
                on_the_way.append(asyncio.ensure_future(self._prepare_and_embed(batch, lanes)))

        outcomes: list[IndexOutcome] = []
        try:
            for _ in range(lanes + BATCHES_AHEAD if self._splits_preprocessing else 1):
                start_next()
            while on_the_way:
                prepared, vectors = await on_the_way.popleft()
                start_next()
                outcomes.extend(await self._commit_batch(prepared, vectors))
                if progress:
                    progress(len(outcomes), len(items))
                await self._maybe_save()
        finally:
            for unfinished in on_the_way:
                unfinished.cancel()
            await asyncio.gather(*on_the_way, return_exceptions=True)
        return outcomes

    async def _prepare_and_embed(
        self, batch: list[IncomingImage], lanes: int
    ) -> tuple[list[_Prepared], dict[int, np.ndarray]]:
        prepared = await self._prepare(batch)
        return prepared, await self._embed_batch(prepared, lanes)

    async def _prepare(self, batch: list[IncomingImage]) -> list[_Prepared]:
        """Read and hash the batch, settle what is already known, then decode only what is new.

        Re-running `index` over a folder (after a crash, or to pick up new photos) therefore costs
        a read and a hash per known file, not a decode.
        """
        loop = asyncio.get_running_loop()
        prepared = list(await asyncio.gather(
            *(loop.run_in_executor(self._cpu, self._read_one, item) for item in batch)
        ))
        readable = [item for item in prepared if item.outcome is None]
        stored = await self.catalog.sources_with_sha([item.incoming.source for item in readable])
        for item in readable:
            existing, sha256 = stored.get(item.incoming.source.key, (None, None))
            if existing is not None and sha256 == item.sha256:
                item.outcome = IndexOutcome(existing, "unchanged", existing.image_id)
        copies = await self.catalog.stored_copies([item.sha256 for item in readable])
        # New bytes need decoding and a vector; known ones only a new source, at commit (and their
        # stored copy again, should it have gone missing).
        fresh = [item for item in readable if item.outcome is None and item.sha256 not in copies]
        known = [item for item in readable if item.sha256 in copies]
        _, restored = await asyncio.gather(
            asyncio.gather(*(loop.run_in_executor(self._cpu, self._decode_one, item) for item in fresh)),
            asyncio.gather(*(loop.run_in_executor(self._cpu, self._restore_copy, item, copies[item.sha256])
                             for item in known)),
        )
        await self._keep_restored_copies_of_stored_images([item for item, wrote in zip(known, restored) if wrote])
        for item in prepared:
            item.data = None
        return prepared

    async def _keep_restored_copies_of_stored_images(self, restored: list[_Prepared]) -> None:
        """A copy written again for an image that was forgotten meanwhile goes again.

        Checked after writing and under the write lock: a forget that commits before this check
        is seen here, one that commits after it deletes the file itself, and no batch can be
        storing the same bytes in between.
        """
        if not restored:
            return
        async with self.catalog.transaction() as conn:
            for item in restored:
                if await first_row(conn, "SELECT 1 FROM images WHERE sha256 = ?", (item.sha256,)) is None:
                    self.thumbs.delete(self.thumbs.relative_path(item.sha256, THUMBNAIL_EXTENSION))

    def _read_one(self, item: IncomingImage) -> _Prepared:
        """Read and hash one image (runs in a worker thread)."""
        out = _Prepared(item)
        limits = self.settings.ingest
        try:
            data = item.data
            if data is None:
                if item.source.path is None:
                    raise RejectedImage("no bytes and no path to read them from")
                data = read_limited(Path(item.source.path), limits.max_file_bytes)
            elif len(data) > limits.max_file_bytes:
                raise RejectedImage(too_large_reason(len(data), limits.max_file_bytes))
            out.data = data
            out.size = len(data)
            out.sha256 = sha256_of(data)
        except RejectedImage as error:
            out.outcome = IndexOutcome(item.source, "failed", reason=str(error))
        return out

    def _decode_for_copy(self, data: bytes) -> tuple[DecodedImage, Image.Image, torch.Tensor]:
        """Untrusted bytes decoded: the picture kept (no larger than the stored copy), the stored
        copy itself, and the decoded pixels. Raises RejectedImage."""
        limits = self.settings.ingest
        decoded = decode_image(data, limits, min_side=limits.thumb_max_side)
        pixels = resample.as_tensor(decoded.image)
        shrunk = resample.shrink_to_fit(pixels, limits.thumb_max_side)
        small = decoded.image if shrunk is pixels else resample.to_image(shrunk)
        kept = DecodedImage(small, decoded.width, decoded.height, decoded.format)
        return kept, thumbnail_of(small, limits.thumb_max_side), pixels

    def _decode_one(self, out: _Prepared) -> None:
        """Decode, make the stored copy and preprocess one new image (runs in a worker thread)."""
        assert out.data is not None
        try:
            out.decoded, out.copy, pixels = self._decode_for_copy(out.data)
            if self._splits_preprocessing:
                # From the decoded picture, not the copy: what open_clip's own transform would
                # see, rather than a resize of a resize.
                out.model_input = self._model_input(pixels)
        except RejectedImage as error:
            out.outcome = IndexOutcome(out.incoming.source, "failed", reason=str(error))
        except MemoryError:
            out.outcome = IndexOutcome(out.incoming.source, "failed", reason="image too large to decode")

    def _model_input(self, pixels: torch.Tensor) -> object:
        """The model's input made from decoded pixels, or RejectedImage if it cannot be made.

        Torch reports an allocation it cannot make as RuntimeError, and a transform that cannot
        take a picture as ValueError; either is about this one picture, so it alone is refused
        and the rest of its batch goes on.
        """
        try:
            return self.embedder.preprocess_pixels(pixels)  # type: ignore[attr-defined]
        except (RuntimeError, ValueError) as error:
            log.warning("Could not prepare a %dx%d picture for the model: %s", pixels.shape[-1], pixels.shape[-2], error)
            raise RejectedImage(PREPARE_REASON) from error

    def _restore_copy(self, item: _Prepared, relative: str) -> bool:
        """Write the stored copy of known bytes again if it has gone missing (a worker thread);
        returns whether it wrote one.

        `verify` finds a lost copy but has nothing to make one from; indexing the original again
        has. A copy under a name this version would not give it is left to `verify` to report.
        """
        if item.data is None or self.thumbs.absolute(relative).is_file():
            return False
        if relative != self.thumbs.relative_path(item.sha256, THUMBNAIL_EXTENSION):
            return False
        try:
            _, copy, _ = self._decode_for_copy(item.data)
            self._store_copy(item.sha256, copy)
        except (RejectedImage, MemoryError, OSError) as error:
            log.warning("Could not write the lost stored copy %s again: %s", relative, error)
            return False
        log.info("Wrote the lost stored copy %s again", relative)
        return True

    async def _embed_batch(self, prepared: list[_Prepared], lanes: int) -> dict[int, np.ndarray]:
        """Vectors of the batch's decoded images, keyed by `id()` of their `_Prepared`; the pass
        runs with the model's threads split `lanes` ways."""
        to_embed = [p for p in prepared if p.outcome is None and p.decoded is not None]
        embedded = await self._embed_prepared(to_embed, lanes) if to_embed else []
        return {id(p): v for p, v in zip(to_embed, embedded)}

    async def _commit_batch(self, prepared: list[_Prepared], by_item: dict[int, np.ndarray]) -> list[IndexOutcome]:
        todo = [p for p in prepared if p.outcome is None]
        vectors = [by_item.get(id(p)) for p in todo]
        added: list[tuple[int, np.ndarray]] = []
        removed: list[tuple[int, str]] = []
        async with self.catalog.transaction() as conn:
            copies = self._start_copies(todo)
            try:
                for item in prepared:
                    if item.outcome is not None and item.outcome.status == "failed":
                        await self.catalog.record_failure(conn, item.incoming.source.key, item.outcome.reason or "")
                if not await self._commit_new_together(conn, todo, vectors, added):
                    for item, vector in zip(todo, vectors):
                        item.outcome = await self._commit_isolated(conn, item, vector, added, removed)
                # Unchanged too: a file that failed once and is back to the bytes stored for it.
                stored = [p.incoming.source.key for p in prepared
                          if p.outcome and p.outcome.status in ("indexed", "duplicate", "unchanged")]
                await self.catalog.clear_failures(conn, stored)
                generation = None
                if added or removed or any(p.outcome and p.outcome.status == "duplicate" for p in todo):
                    generation = await self.catalog.bump_generation(conn)
            finally:
                # No write may still be running once the transaction ends (committed or not).
                await asyncio.gather(*copies, return_exceptions=True)
        await self._after_commit(generation, added, [image_id for image_id, _ in removed])
        if removed:
            await self._drop_copies(removed)
        return [p.outcome for p in prepared if p.outcome is not None]

    def _start_copies(self, items: list[_Prepared]) -> list[asyncio.Future[str]]:
        """Start writing the batch's stored copies, side by side, inside the write transaction.

        Inside it, because the sweep of orphaned copies on open runs under the same lock and
        must not take a copy whose row is about to be committed. Side by side, and while the
        rows are being written, because each copy is encoded straight into its file, where
        Pillow lets go of the GIL, and then waits on the disk. Each image's row waits for its own.
        """
        loop = asyncio.get_running_loop()
        started = []
        for item in items:
            if item.copy is not None:
                item.copy_written = loop.run_in_executor(self._writers, self._store_copy, item.sha256, item.copy)
                item.copy = None
                started.append(item.copy_written)
        return started

    def _store_copy(self, sha256: str, copy: Image.Image) -> str:
        return self.thumbs.write_with(sha256, THUMBNAIL_EXTENSION, partial(save_thumbnail, copy))

    async def _commit_new_together(
        self,
        conn: aiosqlite.Connection,
        todo: list[_Prepared],
        vectors: list[np.ndarray | None],
        added: list[tuple[int, np.ndarray]],
    ) -> bool:
        """Store a batch of images that are all new in a few statements for the lot, which is
        what a backfill's batches are; False, with nothing written, when they are not all new
        or a write fails, and the caller then stores them one by one (`_commit_isolated`).

        One by one costs seven trips to the database thread per image, each waking it and the
        event loop while both cores are busy with the model; together, six or seven for the batch.
        Whether an image is new is left to the UNIQUE constraints on sha256 and on each file
        path or attachment: an image or source already stored fails the insert, and the savepoint
        takes the batch back.
        """
        if not todo or len({item.sha256 for item in todo}) < len(todo):
            return False
        if any(item.decoded is None or item.copy_written is None or v is None for item, v in zip(todo, vectors)):
            return False
        written = await asyncio.gather(*(item.copy_written for item in todo), return_exceptions=True)  # type: ignore[misc]
        if any(isinstance(relative, BaseException) for relative in written):
            return False
        news = [
            self._new_image(item, vector, str(relative))  # type: ignore[arg-type]
            for item, vector, relative in zip(todo, vectors, written)
        ]
        await conn.execute("SAVEPOINT new_images")
        try:
            image_ids = await self.catalog.insert_new_images(conn, news)
        except sqlite3.Error as error:
            await conn.execute("ROLLBACK TO new_images")
            await conn.execute("RELEASE new_images")
            log.debug("Storing a batch one image at a time: %s", error)
            return False
        await conn.execute("RELEASE new_images")
        for item, new, image_id in zip(todo, news, image_ids):
            item.outcome = IndexOutcome(new.source, "indexed", image_id)
            added.append((image_id, new.vector))
        return True

    def _new_image(self, item: _Prepared, vector: np.ndarray, thumb: str) -> NewImage:
        """The row of a decoded, embedded image whose stored copy is written at `thumb`."""
        assert item.decoded is not None
        return NewImage(
            sha256=item.sha256,
            size_bytes=item.size,
            width=item.decoded.width,
            height=item.decoded.height,
            format=item.decoded.format,
            thumb=thumb,
            model_id=self.embedder.model_id,
            vector=vector,
            source=item.incoming.source,
        )

    async def _commit_isolated(
        self,
        conn: aiosqlite.Connection,
        item: _Prepared,
        vector: np.ndarray | None,
        added: list[tuple[int, np.ndarray]],
        removed: list[tuple[int, str]],
    ) -> IndexOutcome:
        """Commit one image inside a savepoint: if storing it fails, only it is rolled back."""
        mine_added: list[tuple[int, np.ndarray]] = []
        mine_removed: list[tuple[int, str]] = []
        await conn.execute("SAVEPOINT one_image")
        try:
            outcome = await self._commit_one(conn, item, vector, mine_added, mine_removed)
        except (sqlite3.Error, OSError) as error:
            await conn.execute("ROLLBACK TO one_image")
            await conn.execute("RELEASE one_image")
            log.warning("Could not store %s: %s", item.incoming.source.key, error)
            reason = f"could not be stored ({error})"
            await self.catalog.record_failure(conn, item.incoming.source.key, reason)
            return IndexOutcome(item.incoming.source, "failed", reason=reason)
        await conn.execute("RELEASE one_image")
        added.extend(mine_added)
        removed.extend(mine_removed)
        return outcome

    async def _embed_prepared(self, todo: list[_Prepared], lanes: int) -> np.ndarray:
        """The forward pass of a batch: in a lane when batches share the model, else on the torch
        thread. Not in a lane of its own with all the threads: that lane would start a second
        OpenMP team, and one left beside the torch thread's makes every later text query slower
        (17-23 ms instead of 12-14; see the README's "One torch thread")."""
        if self._splits_preprocessing and all(p.model_input is not None for p in todo):
            inputs = [p.model_input for p in todo]
            loop = asyncio.get_running_loop()
            if lanes > 1:
                return await loop.run_in_executor(
                    self._lanes, self.embedder.embed_preprocessed_in_lane, inputs, lanes  # type: ignore[attr-defined]
                )
            return await loop.run_in_executor(self._model, self.embedder.embed_preprocessed, inputs)  # type: ignore[attr-defined]
        return await self.embed_images([p.decoded.image for p in todo])  # type: ignore[union-attr]

    async def _commit_one(
        self,
        conn: aiosqlite.Connection,
        item: _Prepared,
        vector: np.ndarray | None,
        added: list[tuple[int, np.ndarray]],
        removed: list[tuple[int, str]],
    ) -> IndexOutcome:
        source = item.incoming.source
        catalog = self.catalog
        old, old_sha = await catalog.source_and_sha_for_key(conn, source)
        if old is not None and old.image_id is not None:
            if old_sha == item.sha256:
                return IndexOutcome(old, "unchanged", old.image_id)
            # The same file path (or attachment) now holds other bytes: the old image goes.
            removed.extend(await self._delete_sources(conn, [old]))
        row = await first_row(conn, "SELECT id FROM images WHERE sha256 = ?", (item.sha256,))
        if row is not None:
            image_id = int(row[0])
            await catalog.insert_source(conn, image_id, source)
            return IndexOutcome(source, "duplicate", image_id)
        if item.decoded is None or item.copy_written is None or vector is None:
            # Its bytes were indexed when the batch was read, and gone by the time it committed.
            return IndexOutcome(source, "failed", reason="removed while being indexed; index it again")
        relative = await item.copy_written  # an OSError fails this image alone, with the reason
        new = self._new_image(item, vector, relative)
        image_id = await catalog.insert_image(conn, new)
        await catalog.insert_source(conn, image_id, source)
        await catalog.set_searchable_description(conn, image_id, new.description)
        added.append((image_id, vector))
        return IndexOutcome(source, "indexed", image_id)

    async def _after_commit(
        self, generation: int | None, new_vectors: list[tuple[int, np.ndarray]], removed: Iterable[int] = ()
    ) -> None:
        """Mirror a change committed as `generation` into FAISS, or catch up by id if another
        write came between. A commit that changed nothing (None) has nothing to mirror: the
        generation after it is another writer's, whose change only a catch-up can bring."""
        if generation is None:
            return
        removed_ids = np.fromiter(removed, dtype=np.int64)
        async with self._sync_lock:
            if generation != self.vectors.generation + 1:
                await self._catch_up()
                return
            if len(removed_ids):
                self.vectors.remove(removed_ids)
            if new_vectors:
                self.vectors.add(
                    np.array([i for i, _ in new_vectors], dtype=np.int64),
                    np.stack([v for _, v in new_vectors]),
                )
            self.vectors.generation = generation
            self._dirty_since_save += 1

    async def index_paths(
        self, paths: Iterable[Path], progress: Progress | None = None
    ) -> list[IndexOutcome]:
        """Index files and folders (recursively); each file becomes a `file` source."""
        items = [IncomingImage(file_source(path)) for path in expand_paths(paths)]
        return await self.index(items, progress)

    # ---- forgetting -------------------------------------------------------------------------

    async def _delete_sources(
        self, conn: aiosqlite.Connection, sources: Sequence[SourceRecord]
    ) -> list[tuple[int, str]]:
        """Delete sources inside an open transaction; images left without a source go too.

        Returns (image id, stored copy) of each image that went, for the caller to clean up
        after the commit.
        """
        gone: list[tuple[int, str]] = []
        touched = {s.image_id for s in sources if s.image_id is not None}
        for src in sources:
            await conn.execute("DELETE FROM sources WHERE id = ?", (src.id,))
        for image_id in touched:
            async with conn.execute(
                "SELECT i.thumb, (SELECT COUNT(*) FROM sources s WHERE s.image_id = i.id) "
                "FROM images i WHERE i.id = ?",
                (image_id,),
            ) as cur:
                row = await cur.fetchone()
            if row is None:
                continue
            if int(row[1]) == 0:
                await self.catalog.delete_image(conn, int(image_id))
                gone.append((int(image_id), str(row[0])))
        return gone

    async def _drop_copies(self, gone: Iterable[tuple[int, str]]) -> None:
        """Delete the stored copies of images that left the catalog, unless their bytes came back.

        Checked under the write lock, as the sweep on open is: a copy is only written inside the
        write transaction that commits its row, so a row that refers to it again (the same bytes
        indexed meanwhile, which found the copy still there and kept it) is seen here.
        """
        gone = list(gone)
        if not gone:
            return
        async with self.catalog.transaction() as conn:
            for _, thumb in gone:
                sha256 = Path(thumb).stem
                if _SHA256.fullmatch(sha256):  # the name this version gives: the sha256's index finds it
                    row = await first_row(conn, "SELECT 1 FROM images WHERE sha256 = ? AND thumb = ?", (sha256, thumb))
                else:
                    row = await first_row(conn, "SELECT 1 FROM images WHERE thumb = ?", (thumb,))
                if row is None:
                    self.thumbs.delete(thumb)

    async def remove_sources(self, sources: Sequence[SourceRecord]) -> list[int]:
        """Forget these sources; returns the ids of images that are now gone from search."""
        if not sources:
            return []
        async with self.catalog.transaction() as conn:
            gone = await self._delete_sources(conn, sources)
            generation = await self.catalog.bump_generation(conn)
        await self._after_commit(generation, [], [image_id for image_id, _ in gone])
        await self._drop_copies(gone)
        await self._maybe_save()
        return [image_id for image_id, _ in gone]

    async def forget_missing_files(self, folder: Path) -> list[SourceRecord]:
        """Forget the files indexed from inside `folder` that are no longer on disk, and the
        failures recorded for such files; returns the sources forgotten.

        Only a file known to be gone counts (no such file, or a folder on its way is gone). One
        behind a folder that may not be entered is kept: it may well still be there. Call it after
        indexing the folder, so that a photo that was moved inside it keeps its image (and id)
        through its new path before the old one is forgotten.
        """
        where = str(folder.expanduser().resolve())
        under = await self.catalog.file_sources_under(where)
        gone = [source for source in under if source.path and _known_missing(Path(source.path))]
        await self._pass_text_to_new_paths(gone, [source for source in under if source not in gone])
        await self.remove_sources(gone)
        # The failures of files that are gone would otherwise be "recent" for ever.
        stale = [key for key in await self.catalog.file_failures_under(where) if _known_missing(Path(key[5:]))]
        if stale:
            async with self.catalog.transaction() as conn:
                await self.catalog.clear_failures(conn, stale)
        return gone

    async def _pass_text_to_new_paths(self, gone: list[SourceRecord], kept: list[SourceRecord]) -> None:
        """A file that moved is a new path of the same image: the words imported for it go with
        it, to a path of that image that has none."""
        wordless = {source.image_id: source for source in kept if not source.posted_text and source.id is not None}
        moved = [(wordless.pop(source.image_id), source.posted_text) for source in gone
                 if source.posted_text and source.image_id in wordless]
        if moved:
            async with self.catalog.transaction() as conn:
                for new, text in moved:
                    await self.catalog.set_source_text(conn, new.id, text)  # type: ignore[arg-type]

    async def forget_image(self, image_id: int) -> bool:
        sources = await self.catalog.find_sources("image_id", image_id)
        if not sources:
            return False
        return bool(await self.remove_sources(sources))

    async def forget_messages(self, message_ids: Iterable[int], guild_id: int | None = None) -> list[int]:
        """Forget the photos of these messages (only those posted in `guild_id`, if given: a
        message named by a pasted link may be another server's)."""
        sources = await self.catalog.sources_for_messages(message_ids)
        return await self.remove_sources([s for s in sources if guild_id is None or s.guild_id == guild_id])

    async def forget_where(self, column: str, value: int) -> list[int]:
        return await self.remove_sources(await self.catalog.find_sources(column, value))

    # ---- search -----------------------------------------------------------------------------

    async def search_vector(
        self, vector: np.ndarray, k: int, flt: SourceFilter, exclude: Iterable[int] = ()
    ) -> list[tuple[int, float]]:
        """Top-k (image id, cosine) among images the filter lets through."""
        await self.sync_vectors()
        return await self._search_visible(vector, k, flt, exclude)

    async def _search_visible(
        self, vector: np.ndarray, k: int, flt: SourceFilter, exclude: Iterable[int] = ()
    ) -> list[tuple[int, float]]:
        """Top-k among what the filter lets through, by whichever way costs less for its width.

        Every search from Discord is scoped to the channels the asker can read, which for most
        people is most of the server: listing the images such a scope allows took 55 ms at 100k
        images (and grows with the collection). So the best candidates are checked instead, and
        only a scope too narrow for that lists its images, which are then few.
        """
        excluded = frozenset(int(i) for i in exclude)
        if flt.unrestricted:
            return await self._search_among(vector, k, None, excluded)
        hits = await self._search_checking(vector, k, flt, excluded)
        if hits is None:
            allowed = await self.catalog.visible_image_ids(flt)
            hits = await self._search_among(vector, k, allowed, excluded)
        return hits

    async def _search_checking(
        self, vector: np.ndarray, k: int, flt: SourceFilter, excluded: frozenset[int]
    ) -> list[tuple[int, float]] | None:
        """The top-k visible images, from the best unrestricted candidates that pass the filter.

        The visible images among the top n candidates are exactly the top visible images, as
        long as there are k of them: anything visible that scored higher would be among the n.
        So the pool grows with the share of candidates that passed, until it holds k, and the
        answer is the same one a search restricted to the scope would give. None when that would
        take more candidates than listing the scope's images would cost (judged by the share that
        passed), or when the clustered index's probed lists run out first (the restricted search
        probes further).
        """
        pool = max(4 * (k + len(excluded)), 64)
        while pool <= MAX_CHECKED_CANDIDATES:
            hits = await asyncio.get_running_loop().run_in_executor(
                self._cpu, self.vectors.search, vector, pool, None
            )
            candidates = [(i, s) for i, s in hits if i not in excluded]
            visible = await self.catalog.visible_among(flt, [i for i, _ in candidates])
            kept = [(i, s) for i, s in candidates if i in visible]
            if len(kept) >= k:
                return kept[:k]
            if len(hits) < pool:  # every vector was a candidate (flat), or the probes ran out
                return kept if self.vectors.layout == "flat" else None
            if not kept:
                return None
            grown = math.ceil(pool * k / len(kept) * 2)  # twice: the share passed is an estimate
            if grown * CHECK_COST_IN_LISTINGS > self.vectors.count * len(kept) / pool:
                return None
            pool = grown
        return None

    async def _search_among(
        self, vector: np.ndarray, k: int, allowed: np.ndarray | None, excluded: frozenset[int] = frozenset()
    ) -> list[tuple[int, float]]:
        if excluded and allowed is not None:
            allowed = np.setdiff1d(allowed, np.fromiter(excluded, dtype=np.int64))
        hits = await asyncio.get_running_loop().run_in_executor(
            self._cpu, self.vectors.search, vector, k + len(excluded), allowed
        )
        return [(i, s) for i, s in hits if i not in excluded][:k]

    async def search_text(self, query: str, k: int, flt: SourceFilter) -> list[tuple[int, float]]:
        """CLIP ranking fused with full-text matches on descriptions and posted text.

        Reciprocal-rank fusion lets a name CLIP cannot see ("grandpa") lift a photo whose posted
        text says it, while the score reported stays the CLIP cosine people can compare. The
        SQLite work that needs no vector (catch-up check, full-text match) runs before the text
        tower rather than beside it: on two cores the tower's threads then wait for the one
        sharing its core with SQLite (p99 30 ms against 20 ms at 100k images). The scope's check
        of the CLIP candidates can only come after the tower.
        """
        pool = max(k * 4, 50)
        text_ids, _ = await asyncio.gather(self.catalog.text_matches(query, pool, flt), self.sync_vectors())
        vector = (await self.embed_texts([query]))[0]
        clip_hits = await self._search_visible(vector, pool, flt)
        fused: dict[int, float] = {}
        for rank, (image_id, _) in enumerate(clip_hits):
            fused[image_id] = fused.get(image_id, 0.0) + 1.0 / (FUSION_RANK_CONSTANT + rank + 1)
        for rank, image_id in enumerate(text_ids):
            fused[image_id] = fused.get(image_id, 0.0) + 1.0 / (FUSION_RANK_CONSTANT + rank + 1)
        cosine = dict(clip_hits)
        order = sorted(fused, key=lambda i: (-fused[i], -cosine.get(i, -1.0)))[:k]
        return [(i, cosine[i] if i in cosine else self._cosine(vector, i)) for i in order]

    def _cosine(self, query: np.ndarray, image_id: int) -> float:
        stored = self.vectors.vector(image_id)
        return float(np.dot(query, stored)) if stored is not None else 0.0

    async def vector_of(self, image_id: int) -> np.ndarray | None:
        await self.sync_vectors()
        return self.vectors.vector(image_id)

    # ---- descriptions -----------------------------------------------------------------------

    async def set_description(self, image_id: int, text: str, origin: str) -> bool:
        async with self.catalog.transaction() as conn:
            cur = await conn.execute(
                "UPDATE images SET description = ?, description_source = ? WHERE id = ?",
                (text, origin, image_id),
            )
            if not cur.rowcount:
                return False
            await self.catalog.set_searchable_description(conn, image_id, text)
        return True

    async def set_file_text(self, path: Path, text: str) -> bool:
        """Words about an indexed file (`shoebox import-descriptions`); False when the file is
        not indexed. They belong to the file, not to its bytes: the same picture posted on
        Discord is not found by them, nor shown with them."""
        source = await self.catalog.source_for_key(file_source(path))
        if source is None or source.id is None:
            return False
        async with self.catalog.transaction() as conn:
            return await self.catalog.set_source_text(conn, source.id, text)

    async def set_posted_text(self, message_id: int, text: str) -> int:
        """A message's words were edited: its sources carry, and are found by, the new words
        only. Returns how many sources changed."""
        async with self.catalog.transaction() as conn:
            return await self.catalog.set_posted_text(conn, message_id, text)

    async def note_caption_attempt(self, image_id: int) -> None:
        async with self.catalog.transaction() as conn:
            await conn.execute(
                "UPDATE images SET caption_attempts = caption_attempts + 1 WHERE id = ?", (image_id,)
            )

    def thumb_path(self, record: ImageRecord) -> Path:
        return self.thumbs.absolute(record.thumb)

    # ---- status and repair ------------------------------------------------------------------

    async def stats(self) -> dict[str, object]:
        counts = await self.catalog.counts()
        return {
            "images": counts["images"],
            "sources": counts["sources"],
            "described": counts["described"],
            "failures": counts["failures"],
            "model": self.embedder.model_id,
            "dim": self.embedder.dim,
            "vector_index": {"count": self.vectors.count, "generation": self.vectors.generation},
            "data_dir": str(self.data_dir.resolve()),
        }

    async def verify(self, repair: bool = True) -> VerifyReport:
        """Check that SQLite, FAISS and the stored copies agree; repair what can be repaired."""
        report = VerifyReport()
        catalog = self.catalog
        async with catalog.reader.execute("PRAGMA integrity_check") as cur:
            row = await cur.fetchone()
        if not row or row[0] != "ok":
            report.problems.append(f"SQLite integrity check failed: {row[0] if row else '?'}")
            return report
        async with catalog.reader.execute(
            "SELECT id, thumb FROM images i WHERE NOT EXISTS "
            "(SELECT 1 FROM sources s WHERE s.image_id = i.id)"
        ) as cur:
            orphans = [(int(r[0]), str(r[1])) for r in await cur.fetchall()]
        if orphans:
            self._note(report, repair, f"{len(orphans)} image(s) with no source left")
            if repair:
                async with catalog.transaction() as conn:
                    for image_id, _ in orphans:
                        await catalog.delete_image(conn, image_id)
                    await catalog.bump_generation(conn)
                await self._drop_copies(orphans)
        models = await catalog.models_in_use()
        foreign = {m: n for m, n in models.items() if m != self.embedder.model_id}
        if foreign:
            report.problems.append(
                f"vectors from other models: {foreign}; run `shoebox reindex` to re-embed them"
            )
        async with catalog.reader.execute(
            "SELECT COUNT(*) FROM images WHERE length(vector) != ?", (self.embedder.dim * 4,)
        ) as cur:
            row = await cur.fetchone()
        if row and int(row[0]):
            report.problems.append(f"{row[0]} vector(s) of the wrong size")
        db_ids = await catalog.all_image_ids()
        index_ids = np.sort(self.vectors.ids())
        if not np.array_equal(db_ids, index_ids):
            missing = len(np.setdiff1d(db_ids, index_ids))
            extra = len(np.setdiff1d(index_ids, db_ids))
            twice = len(index_ids) - len(np.unique(index_ids))
            self._note(
                report, repair,
                f"vector index out of step ({missing} missing, {extra} extra" + (f", {twice} twice)" if twice else ")"),
            )
            if repair:  # rebuilt from SQLite: a catch-up by id cannot see an id held twice
                await self._rebuild_vectors()
        async with catalog.reader.execute(
            "SELECT COUNT(*) FROM images_fts f WHERE NOT EXISTS (SELECT 1 FROM images i WHERE i.id = f.rowid)"
        ) as cur:
            row = await cur.fetchone()
        if row and int(row[0]):
            self._note(report, repair, f"{row[0]} stale full-text row(s)")
            if repair:
                async with catalog.transaction() as conn:
                    await conn.execute(
                        "DELETE FROM images_fts WHERE rowid NOT IN (SELECT id FROM images)"
                    )
        if not await catalog.posted_text_index_agrees():
            self._note(report, repair, "the posted-text search index does not match the sources")
            if repair:
                async with catalog.transaction() as conn:
                    await conn.execute("INSERT INTO sources_fts (sources_fts) VALUES ('rebuild')")
        known = await catalog.all_thumbs()
        on_disk = self.thumbs.all_relative()
        absent = known - on_disk
        if absent:
            report.problems.append(
                f"{len(absent)} stored copy/copies missing from {self.thumbs.root} "
                "(search still works; posting those images will not; indexing the original files again writes them)"
            )
        stray = on_disk - known
        if stray:
            self._note(report, repair, f"{len(stray)} stored file(s) no image refers to")
            if repair:
                await self.sweep_stored_copies()
        return report

    @staticmethod
    def _note(report: VerifyReport, repair: bool, problem: str) -> None:
        (report.repaired if repair else report.problems).append(problem)

    # ---- re-embedding -------------------------------------------------------------------------

    async def reindex(self, new_embedder: Embedder, progress: Progress | None = None) -> int:
        """Re-embed every image with another model; the old vectors serve until all are done.

        New vectors are staged in their own table (so an interrupted run resumes where it stopped)
        and swapped in with one transaction at the end, only once every image has one: raises
        `ReindexIncomplete` (having switched nothing) when some stored copy could not be read.
        Images stored meanwhile (the bot indexing while the CLI re-indexes) are embedded in a
        further round; the swap checks under the write lock that none came after the last.
        """
        catalog = self.catalog
        target = new_embedder.model_id
        async with catalog.transaction() as conn:
            await conn.execute("DELETE FROM staged_vectors WHERE model_id != ?", (target,))
        tried: set[int] = set()
        for _ in range(REINDEX_ROUNDS):
            todo = [(image_id, thumb) for image_id, thumb in await self._not_reembedded(catalog.reader, target)
                    if image_id not in tried]
            if todo:
                await self._stage_vectors(new_embedder, todo, progress)
                tried.update(image_id for image_id, _ in todo)
                continue
            async with catalog.transaction() as conn:
                left_out = [image_id for image_id, _ in await self._not_reembedded(conn, target)]
                if not left_out:
                    total_images = await self._swap_in_staged(conn, new_embedder)
                    break
            if set(left_out) <= tried:
                raise ReindexIncomplete(left_out, (await catalog.counts())["images"] - len(left_out))
        else:
            raise ReindexOutpaced(len(tried))
        self.embedder = new_embedder
        await self._rebuild_vectors()
        return total_images

    async def _rebuild_vectors(self) -> None:
        """A new FAISS index for the current model, filled from SQLite and saved."""
        self.vectors = VectorIndex(self.embedder.dim, self.embedder.model_id)
        self.vectors.generation = -1
        await self.sync_vectors()
        await self.save_vectors()

    @staticmethod
    async def _not_reembedded(conn: aiosqlite.Connection, target: str) -> list[tuple[int, str]]:
        """(id, stored copy) of the images without a staged vector from `target`."""
        async with conn.execute(
            "SELECT i.id, i.thumb FROM images i WHERE NOT EXISTS "
            "(SELECT 1 FROM staged_vectors v WHERE v.image_id = i.id AND v.model_id = ?) ORDER BY i.id",
            (target,),
        ) as cur:
            return [(int(r[0]), str(r[1])) for r in await cur.fetchall()]

    async def _stage_vectors(
        self, new_embedder: Embedder, todo: list[tuple[int, str]], progress: Progress | None
    ) -> None:
        """Embed these images' stored copies with the new model and stage the vectors, a chunk per
        transaction (an unreadable copy is left out and counted at the end)."""
        catalog = self.catalog
        target = new_embedder.model_id
        total_images = (await catalog.counts())["images"]
        done = total_images - len(todo)
        loop = asyncio.get_running_loop()
        size = 32
        for start in range(0, len(todo), size):
            chunk = todo[start : start + size]
            images = await loop.run_in_executor(self._cpu, self._load_thumbs, [t for _, t in chunk])
            ok = [(i, im) for (i, _), im in zip(chunk, images) if im is not None]
            vectors = await loop.run_in_executor(
                self._model, new_embedder.embed_images, [im for _, im in ok]
            ) if ok else []
            async with catalog.transaction() as conn:
                for (image_id, _), vector in zip(ok, vectors):
                    # Only for an image still there: another process may have forgotten it meanwhile.
                    await conn.execute(
                        "INSERT OR REPLACE INTO staged_vectors (image_id, model_id, vector) "
                        "SELECT ?, ?, ? WHERE EXISTS (SELECT 1 FROM images WHERE id = ?)",
                        (image_id, target, np.asarray(vector, dtype=np.float32).tobytes(), image_id),
                    )
            done += len(chunk)
            if progress:
                progress(done, total_images)

    async def _swap_in_staged(self, conn: aiosqlite.Connection, new_embedder: Embedder) -> int:
        """Make the staged vectors the images' own, inside the caller's transaction; returns how
        many images there are."""
        target = new_embedder.model_id
        await conn.execute(
            "UPDATE images SET vector = (SELECT v.vector FROM staged_vectors v WHERE v.image_id = images.id), "
            "model_id = ? WHERE id IN (SELECT image_id FROM staged_vectors WHERE model_id = ?)",
            (target, target),
        )
        await conn.execute("DELETE FROM staged_vectors")
        await self.catalog.set_meta(conn, "model_id", target)
        await self.catalog.set_meta(conn, "dim", str(new_embedder.dim))
        await self.catalog.bump_generation(conn)
        row = await first_row(conn, "SELECT COUNT(*) FROM images")
        return int(row[0]) if row else 0

    def _load_thumbs(self, relatives: list[str]) -> list[Image.Image | None]:
        out: list[Image.Image | None] = []
        for relative in relatives:
            try:
                with Image.open(self.thumbs.absolute(relative)) as im:
                    out.append(im.convert("RGB"))
            except OSError as error:
                log.warning("Cannot re-embed %s: %s", relative, error)
                out.append(None)
        return out


def _even_batches(items: Sequence[Item], size: int, multiple_of: int) -> list[list[Item]]:
    """`items` in batches of at most `size`, as few as possible but, past one, a multiple of
    `multiple_of` batches, with sizes that differ by at most one.

    With batches side by side in lanes, a job whose last batch is alone in the model runs that
    batch on one thread while the other core has little to do. Measured with ViT-B-32 on two
    cores (1024x768 photos, median of 4): 17 photos took 1.18 s as 16 + 1 and 0.60 s as 9 + 8;
    48 photos 1.91 s as 3 x 16 and 1.54 s as 4 x 12.
    """
    if not items:
        return []
    count = -(-len(items) // size)
    if count > 1:
        count = min(len(items), count + (-count % multiple_of))
    smaller, larger = divmod(len(items), count)
    batches, start = [], 0
    for number in range(count):
        end = start + smaller + (number < larger)
        batches.append(list(items[start:end]))
        start = end
    return batches


def _unique_sources(items: Sequence[IncomingImage]) -> list[IncomingImage]:
    """The same file or attachment listed twice (overlapping folders, a re-queued post) counts once."""
    seen: set[str] = set()
    unique = []
    for item in items:
        if item.source.key not in seen:
            seen.add(item.source.key)
            unique.append(item)
    return unique


def expand_paths(paths: Iterable[Path], unreadable: list[tuple[Path, str]] | None = None) -> list[Path]:
    """Files as given, folders walked recursively (sorted; hidden files and folders skipped;
    links to folders not followed, so a link back up cannot loop).

    Every file is tried and judged by its content, never by its name, so a mislabelled photo is
    found and a stray document gets a clear "not an image" instead of silently vanishing. For the
    same reason a folder that cannot be listed is added to `unreadable` with the reason, rather
    than passed over as if it were empty.
    """
    found: list[Path] = []
    for path in paths:
        path = Path(path)
        if not path_check(path.is_dir, failing=False):
            found.append(path)
            continue

        def note(error: OSError) -> None:
            if unreadable is not None:
                unreadable.append((Path(error.filename or path), f"folder cannot be read ({error.strerror or error})"))

        inside: list[Path] = []
        for folder, folders, names in os.walk(path, onerror=note):
            folders[:] = [name for name in folders if not name.startswith(".")]
            inside.extend(Path(folder, name) for name in names if not name.startswith("."))
        found.extend(child for child in sorted(inside) if path_check(child.is_file, failing=True))
    return found


def _known_missing(path: Path) -> bool:
    """Whether `path` is certainly gone: a permission error says nothing about that."""
    try:
        path.lstat()
    except (FileNotFoundError, NotADirectoryError):
        return True
    except OSError:
        return False
    return False


def path_check(test: Callable[[], bool], failing: bool) -> bool:
    """`test()`, or `failing` where the file's details may not even be looked at (a folder on
    the way without search permission): such a file is still tried, and reading it says why not."""
    try:
        return test()
    except OSError:
        return failing


def file_source(path: Path) -> SourceRecord:
    from datetime import datetime, timezone

    from store.db import to_iso

    resolved = path.expanduser().resolve()
    try:
        mtime = datetime.fromtimestamp(resolved.stat().st_mtime, tz=timezone.utc)
    except OSError:
        mtime = datetime.now(timezone.utc)
    return SourceRecord(
        kind="file", filename=resolved.name, posted_at=to_iso(mtime), path=str(resolved)
    )


__all__ = [
    "IncomingImage",
    "IndexOutcome",
    "Library",
    "ModelMismatch",
    "VerifyReport",
    "expand_paths",
    "file_source",
    "path_check",
]
