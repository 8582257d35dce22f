"""The FAISS vector index: a derived, disposable copy of the vectors held in SQLite.

It is saved beside the database with a small JSON header naming the model and the catalog
generation it reflects. On open, a missing, foreign or stale file is rebuilt or caught up from
SQLite, so a crash between the two writes can only ever cost a little re-work, never a wrong answer.

Two layouts, chosen by size (figures from `bench/bench_search.py`, 512-d, 2 cores):

* up to `APPROXIMATE_FROM` vectors, an exact flat inner-product index — a full scan takes at most
  8 ms there (4 ms at 50k), and exact is the best recall there is (clusters probed for 2 ms found
  only 0.92 of the top 10 at 50k);
* past it, an inverted-file index (IVF, flat lists) — a scan of 1M vectors costs ~170 ms, while
  probing enough of ~4·√n clusters to scan `PROBED_VECTORS` vectors costs ~2 ms. On clustered
  (real-like) data that gives recall@10 0.97 at 100k and 0.98 at 1M; a fixed 32 probes gave 0.90
  at 100k, where each list is small. Vectors stay uncompressed (2 KB each at 512-d), so memory
  stays under 3 KB per image.

Scopes given as ids are applied inside the search. A narrow scope (up to `EXACT_SUBSET` visible
images) is searched exactly over just those vectors; a wide one uses the IVF with an id selector and
probes more clusters until it has k results, so a scope never comes back short. (The library hands
over a scope's ids only when it is too narrow for checking the best unrestricted candidates
against it; see `Library._search_visible`.)
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import threading
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterator, TypeVar

import faiss
import numpy as np

from store.atomic import sweep_abandoned_temp_files, write_atomically

log = logging.getLogger(__name__)
T = TypeVar("T")

INDEX_FILE = "vectors.faiss"
HEADER_FILE = "vectors.json"
APPROXIMATE_FROM = 100_000
EXACT_SUBSET = 20_000
# Scoring a scope exactly in the clustered layout: copying one vector out of its list costs about
# as much as scanning 40 in place with the scope's id filter (measured at 100k images: 10k visible
# ids, 29 ms copied against 8 ms scanning every list), so a scope wider than count / 40 is scored
# by scanning every list.
COPY_COST_IN_SCANS = 40
# Vectors a clustered search scans (through as many lists as that takes, at least
# `MIN_NPROBE`): about 2 ms on one core at 512-d. Measured recall@10 on bench_search's clustered
# vectors, probes -> recall: 100k images (1,264 lists) 32 -> 0.887, 128 -> 0.932,
# 256 -> 0.958; 1M (4,000 lists) 32 -> 0.985, 96 -> 0.988.
PROBED_VECTORS = 20_000
MIN_NPROBE = 32
RETRAIN_GROWTH = 8  # rebuild the clusters once the index is this many times its training size


@dataclass(frozen=True)
class IndexHeader:
    model_id: str
    dim: int
    generation: int
    count: int
    layout: str = "flat"
    trained_on: int = 0


def sweep_stale_temp_files(directory: Path) -> int:
    """Delete the temp files of index saves whose writer is gone (killed mid-save: each is as
    large as the index); returns how many."""
    return sweep_abandoned_temp_files(directory, (INDEX_FILE, HEADER_FILE))


def _as_ids(ids: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(ids, dtype=np.int64)


def _flat(dim: int) -> faiss.Index:
    return faiss.IndexIDMap2(faiss.IndexFlatIP(dim))


def _train_ivf(vectors: np.ndarray, ids: np.ndarray, dim: int) -> faiss.IndexIVFFlat:
    """Cluster a sample of the vectors into ~4·√n lists (enough points per list to train well),
    then file every vector in its list."""
    count = len(vectors)
    nlist = max(16, min(int(4 * math.sqrt(count)), count // 39))
    quantizer = faiss.IndexFlatIP(dim)
    index = faiss.IndexIVFFlat(quantizer, dim, nlist, faiss.METRIC_INNER_PRODUCT)
    rng = np.random.default_rng(0)
    sample = vectors[rng.choice(count, size=min(count, nlist * 64), replace=False)]
    index.train(np.ascontiguousarray(sample, dtype=np.float32))
    index.set_direct_map_type(faiss.DirectMap.Hashtable)
    index.add_with_ids(vectors, ids)
    return index


@contextlib.contextmanager
def _single_threaded() -> Iterator[None]:
    """Every FAISS call here but a build runs on one OpenMP thread. One query is a few thousand
    dot products: splitting it across threads costs more than it saves (1.1 ms instead of 3.3 ms
    at 10k vectors), and any call that forks leaves an idle team beside its thread that slows the
    model (see `_on_passing_thread`). The setting is per calling thread in OpenMP."""
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(before)


def _on_passing_thread(build: Callable[[], T]) -> T:
    """Run a multi-threaded FAISS build on a thread that ends with it.

    OpenMP keeps a team of worker threads for every thread that ever ran a parallel region, for
    as long as that thread lives, and those idle workers slow the model's own OpenMP team by half
    (a text query took 26 ms instead of 17 while a thread that had trained an index stayed alive;
    17 again once it ended). So builds get a thread of their own, with every core, and all other
    FAISS calls in this module run `_single_threaded`.
    """
    outcome: list[T] = []
    failure: list[BaseException] = []

    def run() -> None:
        try:
            outcome.append(build())
        except BaseException as error:  # re-raised in the caller's thread
            failure.append(error)

    worker = threading.Thread(target=run, name="shoebox-faiss-build")
    worker.start()
    worker.join()
    if failure:
        raise failure[0]
    return outcome[0]


class VectorIndex:
    """Inner-product search over L2-normalised vectors keyed by image id.

    Inner product of unit vectors is cosine similarity, the score people see. Thread-safe: FAISS
    searches run in executor threads while the event loop adds vectors.
    """

    def __init__(self, dim: int, model_id: str) -> None:
        self.dim = dim
        self.model_id = model_id
        self.generation = 0
        self.nprobe: int | None = None  # None: as many lists as hold `PROBED_VECTORS`
        self._index: faiss.Index = _flat(dim)
        self._trained_on = 0
        self._lock = threading.RLock()
        # While `relayout` trains without the lock, the adds and removes it must replay.
        self._changes_while_training: list[tuple[np.ndarray, np.ndarray | None]] | None = None
        self._relayout_lock = threading.Lock()

    @property
    def layout(self) -> str:
        return "ivf" if isinstance(self._index, faiss.IndexIVF) else "flat"

    @property
    def count(self) -> int:
        return int(self._index.ntotal)

    def ids(self) -> np.ndarray:
        with self._lock, _single_threaded():
            if self.layout == "flat":
                return faiss.vector_to_array(self._index.id_map).astype(np.int64)
            lists = self._index.invlists
            parts = [
                faiss.rev_swig_ptr(lists.get_ids(i), lists.list_size(i)).copy()
                for i in range(self._index.nlist)
                if lists.list_size(i)
            ]
            return np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, np.int64)

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        if len(ids) == 0:
            return
        vectors = np.ascontiguousarray(vectors, dtype=np.float32).reshape(len(ids), self.dim)
        with self._lock, _single_threaded():
            self._index.add_with_ids(vectors, _as_ids(ids))
            if self._changes_while_training is not None:
                self._changes_while_training.append((_as_ids(ids).copy(), vectors.copy()))

    def remove(self, ids: np.ndarray) -> int:
        if len(ids) == 0:
            return 0
        with self._lock, _single_threaded():
            if self._changes_while_training is not None:
                self._changes_while_training.append((_as_ids(ids).copy(), None))
            return int(self._index.remove_ids(_as_ids(ids)))

    def vector(self, image_id: int) -> np.ndarray | None:
        with self._lock, _single_threaded():
            try:
                return self._index.reconstruct(int(image_id))
            except RuntimeError:
                return None

    def probes(self) -> int:
        """Lists a clustered search probes first: enough to scan `PROBED_VECTORS` vectors."""
        if self.nprobe is not None:
            return self.nprobe
        if self.layout == "flat" or self.count == 0:
            return MIN_NPROBE
        per_list = self.count / self._index.nlist
        return int(min(self._index.nlist, max(MIN_NPROBE, math.ceil(PROBED_VECTORS / per_list))))

    def wants_relayout(self) -> bool:
        """Whether the collection has outgrown the current layout (see the module docstring)."""
        if self.layout == "flat":
            return self.count >= APPROXIMATE_FROM
        return self.count >= RETRAIN_GROWTH * max(self._trained_on, 1)

    def relayout(self) -> None:
        """Rebuild as IVF trained on the current vectors (slow: run it in an executor).

        Training runs without the lock, so searches and writes go on meanwhile; the writes made
        during it are replayed into the new index, in order, before it takes over.
        """
        with self._relayout_lock:  # one at a time: each replays only the writes of its own training
            self._relayout()

    def _relayout(self) -> None:
        with self._lock, _single_threaded():
            ids = self.ids()
            vectors = np.vstack([self._index.reconstruct_batch(ids[i : i + 50_000]) for i in range(0, len(ids), 50_000)])
            self._changes_while_training = []
        try:
            index = _on_passing_thread(lambda: _train_ivf(vectors, ids, self.dim))
            with self._lock, _single_threaded():
                for changed_ids, added in self._changes_while_training:
                    if added is None:
                        index.remove_ids(changed_ids)
                    else:
                        index.add_with_ids(added, changed_ids)
                self._index = index
                self._trained_on = len(ids)
        finally:
            with self._lock:
                self._changes_while_training = None
        log.info("Vector index now clustered into %d lists over %d images", index.nlist, len(ids))

    def search(
        self, query: np.ndarray, k: int, allowed: np.ndarray | None = None
    ) -> list[tuple[int, float]]:
        """Top-k (id, cosine) for one query; `allowed` restricts the search itself, not its output."""
        if k <= 0 or self.count == 0:
            return []
        query = np.ascontiguousarray(query, dtype=np.float32).reshape(1, self.dim)
        with self._lock, _single_threaded():
            if allowed is None:
                return self._search(query, k, None, self.probes())
            if len(allowed) == 0:
                return []
            exact = self.layout == "ivf" and len(allowed) <= EXACT_SUBSET
            if exact and len(allowed) * COPY_COST_IN_SCANS < self.count:
                return self._exact_subset(query, k, allowed)
            selector = faiss.IDSelectorBatch(_as_ids(allowed))
            if exact:
                return self._search(query, k, selector, self._index.nlist)  # every list: exact
            wanted = min(k, len(allowed))
            nprobe = self.probes()
            while True:
                hits = self._search(query, k, selector, nprobe)
                if len(hits) >= wanted or self.layout == "flat" or nprobe >= self._index.nlist:
                    return hits
                nprobe = min(self._index.nlist, nprobe * 4)

    def _search(
        self, query: np.ndarray, k: int, selector: faiss.IDSelector | None, nprobe: int
    ) -> list[tuple[int, float]]:
        if self.layout == "ivf":
            params: faiss.SearchParameters = faiss.SearchParametersIVF(nprobe=nprobe)
            if selector is not None:
                params.sel = selector
        else:
            params = faiss.SearchParameters(sel=selector) if selector is not None else None
        scores, ids = self._index.search(query, min(k, self.count), params=params)
        return [(int(i), float(s)) for i, s in zip(ids[0], scores[0]) if i >= 0]

    def _exact_subset(self, query: np.ndarray, k: int, allowed: np.ndarray) -> list[tuple[int, float]]:
        """Score exactly the allowed vectors (a narrow scope: cheaper than probing, and exact)."""
        kept: list[np.ndarray] = []
        vectors: list[np.ndarray] = []
        ids = _as_ids(allowed)
        for start in range(0, len(ids), 4096):
            chunk = ids[start : start + 4096]
            try:
                vectors.append(self._index.reconstruct_batch(chunk))
                kept.append(chunk)
            except RuntimeError:  # an id not in the index (being caught up): take them one by one
                for image_id in chunk:
                    vector = self.vector(int(image_id))
                    if vector is not None:
                        vectors.append(vector.reshape(1, -1))
                        kept.append(np.array([image_id], dtype=np.int64))
        if not vectors:
            return []
        scores = np.vstack(vectors) @ query[0]
        kept_ids = np.concatenate(kept)
        top = np.argsort(-scores)[:k]
        return [(int(kept_ids[i]), float(scores[i])) for i in top]

    # ---- persistence ------------------------------------------------------------------------

    def save(self, directory: Path) -> None:
        """Write the index then its header, each atomically: a torn save reads as stale, not wrong.

        The index is serialized under the lock (a copy in memory, quick) and written without it,
        so searches and writes wait for the copy only, not for the disk."""
        with self._lock:
            data = memoryview(faiss.serialize_index(self._index))
            header = IndexHeader(
                self.model_id, self.dim, self.generation, self.count, self.layout, self._trained_on
            )
        write_atomically(directory / INDEX_FILE, lambda handle: handle.write(data))
        text = json.dumps(asdict(header), sort_keys=True).encode()
        write_atomically(directory / HEADER_FILE, lambda handle: handle.write(text))

    @classmethod
    def load(cls, directory: Path, dim: int, model_id: str) -> "VectorIndex | None":
        """The saved index if it exists and was built for this model, else None (rebuild)."""
        try:
            header = IndexHeader(**json.loads((directory / HEADER_FILE).read_text()))
            index = faiss.read_index(str(directory / INDEX_FILE))  # straight from the file: no copy
        except (OSError, ValueError, TypeError, RuntimeError) as error:
            if (directory / INDEX_FILE).exists() or (directory / HEADER_FILE).exists():
                log.warning("Vector index unreadable (%s); rebuilding it from the catalog", error)
            return None
        expected = faiss.IndexIVF if header.layout == "ivf" else faiss.IndexIDMap2
        if header.model_id != model_id or header.dim != dim or index.d != dim or not isinstance(index, expected):
            log.info("Vector index was built for %s; rebuilding it for %s", header.model_id, model_id)
            return None
        loaded = cls(dim, model_id)
        if isinstance(index, faiss.IndexIVF) and index.direct_map.type != faiss.DirectMap.Hashtable:
            index.set_direct_map_type(faiss.DirectMap.Hashtable)
        loaded._index = index
        loaded._trained_on = header.trained_on
        loaded.generation = header.generation
        return loaded
