"""The FAISS vector index: a derived, disposable copy of the vectors held in SQLite.

It is saved beside the database with a small JSON header naming the model and the catalog
generation it reflects. On open, a missing, foreign or stale file is rebuilt or caught up from
SQLite, so a crash between the two writes can only ever cost a little re-work, never a wrong answer.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np

log = logging.getLogger(__name__)

INDEX_FILE = "vectors.faiss"
HEADER_FILE = "vectors.json"


@dataclass(frozen=True)
class IndexHeader:
    model_id: str
    dim: int
    generation: int
    count: int

    def to_json(self) -> str:
        return json.dumps(self.__dict__, sort_keys=True)


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


class VectorIndex:
    """Exact inner-product search over L2-normalised vectors keyed by image id.

    Inner product of unit vectors is cosine similarity, which is the score people see. Thread-safe:
    FAISS searches run in executor threads while the event loop adds vectors.
    """

    def __init__(self, dim: int, model_id: str) -> None:
        self.dim = dim
        self.model_id = model_id
        self.generation = 0
        self._index = faiss.IndexIDMap2(faiss.IndexFlatIP(dim))
        self._lock = threading.RLock()

    @property
    def count(self) -> int:
        return int(self._index.ntotal)

    def ids(self) -> np.ndarray:
        with self._lock:
            return faiss.vector_to_array(self._index.id_map).astype(np.int64)

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        if len(ids) == 0:
            return
        vectors = np.ascontiguousarray(vectors, dtype=np.float32).reshape(len(ids), self.dim)
        with self._lock:
            self._index.add_with_ids(vectors, np.ascontiguousarray(ids, dtype=np.int64))

    def remove(self, ids: np.ndarray) -> int:
        if len(ids) == 0:
            return 0
        with self._lock:
            return int(self._index.remove_ids(np.ascontiguousarray(ids, dtype=np.int64)))

    def vector(self, image_id: int) -> np.ndarray | None:
        with self._lock:
            try:
                return self._index.reconstruct(int(image_id))
            except RuntimeError:
                return None

    def search(
        self, query: np.ndarray, k: int, allowed: np.ndarray | None = None
    ) -> list[tuple[int, float]]:
        """Top-k (id, cosine) for one query; `allowed` restricts the search itself, not its output.

        Restricting inside FAISS (an id selector) rather than filtering afterwards means a narrow
        scope still gets k results whenever k visible images exist.
        """
        if k <= 0 or self.count == 0:
            return []
        query = np.ascontiguousarray(query, dtype=np.float32).reshape(1, self.dim)
        params = None
        if allowed is not None:
            if len(allowed) == 0:
                return []
            params = faiss.SearchParameters(
                sel=faiss.IDSelectorBatch(np.ascontiguousarray(allowed, dtype=np.int64))
            )
        with self._lock:
            scores, ids = self._index.search(query, min(k, self.count), params=params)
        return [(int(i), float(s)) for i, s in zip(ids[0], scores[0]) if i >= 0]

    # ---- persistence ------------------------------------------------------------------------

    def save(self, directory: Path) -> None:
        """Write the index then its header, each atomically: a torn save reads as stale, not wrong."""
        with self._lock:
            data = faiss.serialize_index(self._index).tobytes()
            header = IndexHeader(self.model_id, self.dim, self.generation, self.count)
        _atomic_write(directory / INDEX_FILE, data)
        _atomic_write(directory / HEADER_FILE, header.to_json().encode())

    @classmethod
    def load(cls, directory: Path, dim: int, model_id: str) -> "VectorIndex | None":
        """The saved index if it exists and was built for this model, else None (rebuild)."""
        try:
            header = IndexHeader(**json.loads((directory / HEADER_FILE).read_text()))
            raw = np.fromfile(directory / INDEX_FILE, dtype=np.uint8)
            index = faiss.deserialize_index(raw)
        except (OSError, ValueError, TypeError, RuntimeError) as error:
            if (directory / INDEX_FILE).exists() or (directory / HEADER_FILE).exists():
                log.warning("Vector index unreadable (%s); rebuilding it from the catalog", error)
            return None
        if header.model_id != model_id or header.dim != dim or index.d != dim:
            log.info(
                "Vector index was built with %s; rebuilding it for %s", header.model_id, model_id
            )
            return None
        loaded = cls(dim, model_id)
        loaded._index = faiss.IndexIDMap2(index) if not isinstance(index, faiss.IndexIDMap2) else index
        loaded.generation = header.generation
        return loaded
