"""The vector index on its own: exact and clustered layouts, scopes that never come back short."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from store import vectors as vectors_module
from store.vectors import VectorIndex


def clustered(count: int, dim: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(64, dim))
    data = centres[rng.integers(0, 64, count)] + rng.normal(scale=0.5, size=(count, dim))
    data /= np.linalg.norm(data, axis=1, keepdims=True)
    return data.astype(np.float32)


@pytest.fixture
def small_threshold(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(vectors_module, "APPROXIMATE_FROM", 2_000)
    monkeypatch.setattr(vectors_module, "EXACT_SUBSET", 300)


def build(count: int, dim: int = 32) -> tuple[VectorIndex, np.ndarray, np.ndarray]:
    data = clustered(count, dim)
    ids = np.arange(1, count + 1, dtype=np.int64) * 3
    index = VectorIndex(dim, "m")
    index.add(ids, data)
    return index, ids, data


def test_flat_search_is_exact_and_scoped() -> None:
    index, ids, data = build(500)
    hits = index.search(data[10], 5)
    assert hits[0][0] == ids[10] and hits[0][1] == pytest.approx(1.0, abs=1e-5)
    allowed = ids[::50]
    scoped = index.search(data[10], 5, allowed)
    assert len(scoped) == 5 and {i for i, _ in scoped} <= set(allowed.tolist())
    assert index.layout == "flat" and not index.wants_relayout()


def test_large_collections_switch_to_clusters_with_good_recall(small_threshold: None, tmp_path: Path) -> None:
    index, ids, data = build(6_000)
    assert index.wants_relayout()
    index.relayout()
    assert index.layout == "ivf" and index.count == 6_000
    assert sorted(index.ids().tolist()) == sorted(ids.tolist())
    # So few vectors per list that the scan budget covers every list; search the rest as a big
    # collection would, probing a fraction of them.
    assert index.probes() == index._index.nlist
    index.nprobe = 32
    queries = data[:100] + np.random.default_rng(1).normal(scale=0.05, size=data[:100].shape).astype(np.float32)
    exact = data @ queries.T
    recall = []
    for q in range(len(queries)):
        truth = set(ids[np.argsort(-exact[:, q])[:10]].tolist())
        found = {i for i, _ in index.search(queries[q], 10)}
        recall.append(len(truth & found) / 10)
    assert np.mean(recall) >= 0.95
    # Narrow scopes are scored exactly: by copying their vectors out (60 of 6,000) or, once that
    # costs more, by scanning every list with the scope's filter (240); wide scopes probe more
    # lists until k are found.
    for step in (100, 25):
        scope = ids[::step]
        truth = scope[np.argsort(-(data[::step] @ queries[0]))[:10]].tolist()
        assert [i for i, _ in index.search(queries[0], 10, scope)] == truth, step
    wide = ids[::7]
    hits = index.search(queries[0], 25, wide)
    assert len(hits) == 25 and {i for i, _ in hits} <= set(wide.tolist())
    # It survives a save/load round trip, removals and additions.
    index.generation = 4
    index.save(tmp_path)
    loaded = VectorIndex.load(tmp_path, 32, "m")
    assert loaded is not None and loaded.layout == "ivf" and loaded.generation == 4
    assert loaded.remove(ids[:10]) == 10 and loaded.count == 5_990
    loaded.add(np.array([1], dtype=np.int64), data[:1])
    assert loaded.search(data[0], 1)[0][0] == 1
    assert VectorIndex.load(tmp_path, 32, "another-model") is None


def test_faiss_builds_on_a_passing_thread_and_everything_else_single_threaded(
    small_threshold: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """OpenMP keeps a worker team alive for each thread that ran a parallel region, and those
    workers slow the model's own team; so the index never leaves one behind on a lasting thread."""
    import threading

    import faiss

    builders: list[threading.Thread] = []
    train = vectors_module._train_ivf

    def recording_train(*args: object) -> object:
        builders.append(threading.current_thread())
        return train(*args)

    monkeypatch.setattr(vectors_module, "_train_ivf", recording_train)
    index, ids, data = build(3_000)
    index.relayout()
    assert len(builders) == 1 and builders[0] is not threading.current_thread()
    assert not builders[0].is_alive()

    class Spy:
        """The real index, noting how many OpenMP threads each call could use."""

        def __init__(self, real: object) -> None:
            self.real, self.threads = real, []

        def __getattr__(self, name: str) -> object:
            value = getattr(self.real, name)
            if callable(value):
                self.threads.append(faiss.omp_get_max_threads())
            return value

    spy = Spy(index._index)
    index._index = spy  # type: ignore[assignment]
    monkeypatch.setattr(vectors_module.VectorIndex, "layout", property(lambda self: "ivf"))
    index.add(np.array([1], dtype=np.int64), data[:1])
    index.remove(np.array([1], dtype=np.int64))
    index.search(data[0], 5)
    index.search(data[0], 5, ids[::10])
    index.vector(int(ids[0]))
    assert spy.threads and set(spy.threads) == {1}, spy.threads


def test_clustered_search_probes_enough_lists_to_scan_its_budget(
    small_threshold: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    index, _, data = build(6_000)
    index.relayout()
    per_list = 6_000 / index._index.nlist
    monkeypatch.setattr(vectors_module, "PROBED_VECTORS", 3_000)
    assert index.probes() == int(np.ceil(3_000 / per_list)) > vectors_module.MIN_NPROBE
    monkeypatch.setattr(vectors_module, "PROBED_VECTORS", 100)
    assert index.probes() == vectors_module.MIN_NPROBE
    index.nprobe = 5
    assert index.probes() == 5
    assert VectorIndex(32, "m").probes() == vectors_module.MIN_NPROBE  # flat: probes mean nothing
