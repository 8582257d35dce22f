"""Crash safety: SIGKILL the indexer and the re-embedder, then hold the library to its promises
(store/library.py): a crash anywhere costs re-work at most.

The indexer is killed at 20+ seeded random moments between the end of its model load and the end
of its run (each restart resuming the previous one's work), and at exact points too narrow for a
timer (a stored copy written but its row not committed, a torn FAISS save, a `forget` between its
commit and the removal of the copy). The re-embedder is killed after its model load and after each
chunk of staged vectors. After every kill the tests check, on the state the crash left behind:

* nothing committed is lost: every image row seen committed just before the kill is still there,
  byte for byte (hash, size, stored-copy name, model, vector), with its source and stored copy;
* batches are atomic: the images present are exactly the first whole batches of the folder;
* nothing is duplicated: sha256 is unique, each file has exactly one source, no image lacks one;
* FAISS never claims to be current when it is not (a saved index whose generation matches the
  catalog's holds exactly the catalog's ids), and after a restart FAISS and SQLite agree, vector
  for vector, `verify(repair=False)` is clean and a file's look-alike search finds that file.

The child processes come from a fork server (tests/crash_worker.py) that has imported torch and
open_clip once, so each run costs a model load and the indexing only; the final runs of both
tests are real `python -m bot.cli` processes.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import json
import os
import random
import select
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pytest
from PIL import Image

from store.embedder import ClipEmbedder, load_embedder
from store.library import DB_FILE, MODEL_LANES, Library, ModelMismatch, _even_batches, expand_paths
from store.settings import IngestSettings, Settings
from store.vectors import VectorIndex
from tools.search import find_similar, search_images

REPO = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).with_name("crash_worker.py")
# Children run from here, not from the checkout, whose .env (a key, captions on) is not the tests'.
CHILD_CWD = Path(__file__).resolve().parent

IMAGES = 120  # files in the folder the indexer is killed over
BATCH = 16  # the indexer's batch size (max(8, SHOEBOX_CLIP_BATCH=16)); its batches, the unit of
# atomicity, are the job cut evenly into batches of at most this many (`_even_batches`)
KILLS_REQUIRED = 20
MID_INDEX_KILLS_REQUIRED = 5  # kills that must land with some but not all batches committed
DISTINCT_KILL_POINTS_REQUIRED = 4  # different numbers of committed images seen at the kills
MAX_INDEX_RUNS = 60
INDEX_LOOP_SECONDS = 130.0
POINT_IMAGES = 4 * BATCH  # enough batches for every exact crash point
REINDEX_CHUNK = 32  # Library.reindex commits staged vectors 32 images at a time
SEED = 1_234_567
SERVER_START_SECONDS = 120.0
MODEL_LOAD_SECONDS = 60.0
RUN_SECONDS = 60.0


# ---- the fork server ------------------------------------------------------------------------


def cli_environment() -> dict[str, str]:
    """The environment every child runs in: the small model, nothing from the developer's shell."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SHOEBOX_", "ANTHROPIC_"))}
    env["SHOEBOX_CLIP_MODEL"] = "shoebox-tiny"
    env["HF_HUB_OFFLINE"] = "1"
    env["PYTHONPATH"] = str(REPO)  # the children run from CHILD_CWD, away from the checkout's .env
    # One torch thread: on a small shared machine several spinning OpenMP threads make each model
    # load several times slower, and nothing here measures speed.
    env["SHOEBOX_CLIP_THREADS"] = "1"
    checkpoint = os.environ.get("SHOEBOX_TEST_CHECKPOINT")
    if checkpoint:
        env["SHOEBOX_CLIP_CHECKPOINT"] = checkpoint
    return env


class CrashServer:
    """Client of tests/crash_worker.py; every read from it is bounded by a timeout."""

    def __init__(self, env: dict[str, str]) -> None:
        self.env = env
        self.proc = subprocess.Popen(
            [sys.executable, str(WORKER)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=None,
            text=True,
            cwd=CHILD_CWD,
            env=env,
        )
        hello = self._read(SERVER_START_SECONDS)
        assert hello == {"ready": True}, hello

    def _read(self, timeout: float) -> dict[str, Any]:
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        assert ready, f"the crash worker did not answer within {timeout:.0f}s"
        line = self.proc.stdout.readline()
        assert line, f"the crash worker exited (code {self.proc.poll()})"
        return json.loads(line)

    def _ask(self, message: dict[str, Any], timeout: float = 10.0) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(message) + "\n")
        self.proc.stdin.flush()
        answer = self._read(timeout)
        assert "error" not in answer, answer
        return answer

    def start(
        self,
        argv: list[str],
        marker: Path,
        log: Path,
        env: dict[str, str] | None = None,
        crash: dict[str, Any] | None = None,
    ) -> int:
        marker.unlink(missing_ok=True)
        request = {"op": "run", "argv": argv, "env": env or {}, "marker": str(marker), "log": str(log)}
        if crash:
            request["crash"] = crash
        return int(self._ask(request)["pid"])

    def poll(self, pid: int) -> dict[str, Any]:
        return self._ask({"op": "poll", "pid": pid})

    def wait(self, pid: int, timeout: float) -> dict[str, Any]:
        return self._ask({"op": "wait", "pid": pid, "timeout": timeout}, timeout + 10.0)

    def close(self) -> None:
        try:
            if self.proc.stdin is not None:
                self.proc.stdin.close()
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=30)


@pytest.fixture(scope="module")
def crash_server() -> Iterator[CrashServer]:
    server = CrashServer(cli_environment())
    try:
        yield server
    finally:
        server.close()


@dataclass
class Run:
    """One child run: whether the kill landed (or the run had already finished), and its output."""

    killed: bool
    log: str


def wait_for_model(server: CrashServer, pid: int, marker: Path, log: Path) -> float:
    """Block until the child's model is loaded; returns that moment. Fails if the child dies first."""
    deadline = time.monotonic() + MODEL_LOAD_SECONDS
    polls = 0
    while not marker.exists():
        polls += 1
        if polls % 20 == 0 and not server.poll(pid)["running"]:
            if marker.exists():
                break
            pytest.fail(f"child ended before its model loaded:\n{tail(log)}")
        assert time.monotonic() < deadline, f"model load took over {MODEL_LOAD_SECONDS}s"
        time.sleep(0.005)
    return time.monotonic()


def finish(server: CrashServer, pid: int, log: Path) -> Run:
    """SIGKILL the child (a no-op on one that already exited: it stays a zombie until reaped)."""
    os.kill(pid, signal.SIGKILL)
    status = server.wait(pid, RUN_SECONDS)
    assert not status["running"], f"child {pid} survived SIGKILL"
    if status["signal"] == signal.SIGKILL:
        return Run(True, tail(log))
    assert status["exit"] == 0, f"child exited with {status}:\n{tail(log)}"
    return Run(False, tail(log))


def tail(path: Path, chars: int = 3000) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError:
        return "(no log)"


# ---- reading what the crash left behind -----------------------------------------------------


@dataclass(frozen=True)
class ImageRow:
    """An image row as committed; equality means "intact" (the vector is compared by its hash)."""

    sha256: str
    size_bytes: int
    width: int
    height: int
    format: str
    thumb: str
    model_id: str
    vector_digest: str


@dataclass
class CatalogState:
    """What a data folder's catalog holds at one moment, read without any Shoebox code."""

    images: dict[int, ImageRow] = field(default_factory=dict)
    sources: list[tuple[str, int]] = field(default_factory=list)  # (path, image_id)
    generation: int = 0
    model_id: str | None = None
    staged: dict[int, str] = field(default_factory=dict)  # image_id -> model_id of staged vector
    vectors: dict[int, np.ndarray] = field(default_factory=dict)

    @property
    def source_of_path(self) -> dict[str, int]:
        return dict(self.sources)


def read_catalog(db: Path) -> CatalogState:
    """Everything committed in the catalog, read with plain sqlite3 (no Shoebox code involved)."""
    state = CatalogState()
    if not db.exists():
        return state
    conn = sqlite3.connect(db, timeout=30)
    try:
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        if "images" not in tables:
            return state
        for row in conn.execute(
            "SELECT id, sha256, size_bytes, width, height, format, thumb, model_id, vector FROM images"
        ):
            blob = bytes(row[8])
            state.images[int(row[0])] = ImageRow(
                str(row[1]), int(row[2]), int(row[3]), int(row[4]), str(row[5]), str(row[6]),
                str(row[7]), hashlib.sha256(blob).hexdigest(),
            )
            state.vectors[int(row[0])] = np.frombuffer(blob, dtype=np.float32)
        state.sources = [
            (str(r[0]), int(r[1]))
            for r in conn.execute("SELECT path, image_id FROM sources WHERE kind = 'file'")
        ]
        meta = dict(conn.execute("SELECT key, value FROM meta").fetchall())
        state.generation = int(meta.get("generation", 0))
        state.model_id = meta.get("model_id")
        state.staged = {int(r[0]): str(r[1]) for r in conn.execute("SELECT image_id, model_id FROM staged_vectors")}
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        assert conn.execute("PRAGMA foreign_key_check").fetchall() == []
    finally:
        conn.close()
    return state


def staged_count(db: Path) -> int:
    """Rows staged by a running reindex (cheap enough to poll every few milliseconds)."""
    try:
        conn = sqlite3.connect(db, timeout=30)
        try:
            return int(conn.execute("SELECT COUNT(*) FROM staged_vectors").fetchone()[0])
        finally:
            conn.close()
    except sqlite3.OperationalError:
        return 0


def check_catalog(
    state: CatalogState,
    data: Path,
    ordered_files: list[Path],
    committed: dict[int, ImageRow],
    committed_sources: dict[str, int],
    whole_batches: bool = True,
) -> None:
    """The promises that can be read off the files alone, before anything reopens the library."""
    lost = {i: row for i, row in committed.items() if state.images.get(i) != row}
    assert not lost, f"committed image rows lost or changed by the crash: {sorted(lost)}"
    moved = {p: i for p, i in committed_sources.items() if state.source_of_path.get(p) != i}
    assert not moved, f"committed sources lost or re-pointed: {moved}"

    shas = [row.sha256 for row in state.images.values()]
    assert len(shas) == len(set(shas)), "duplicate sha256 in images"
    paths = [p for p, _ in state.sources]
    assert len(paths) == len(set(paths)), "a file has more than one source"
    known = {str(p) for p in ordered_files}
    assert set(paths) <= known, f"sources for files outside the folder: {set(paths) - known}"
    per_image: dict[int, int] = {}
    for _, image_id in state.sources:
        assert image_id in state.images, f"source points at missing image {image_id}"
        per_image[image_id] = per_image.get(image_id, 0) + 1
    assert set(per_image) == set(state.images), "an image has no source"
    assert all(n == 1 for n in per_image.values()), "distinct files share an image"

    if whole_batches:
        count = len(state.sources)
        ends = set(itertools.accumulate(len(batch) for batch in _even_batches(ordered_files, BATCH, MODEL_LANES)))
        assert count == 0 or count in ends, f"{count} sources: a batch was split (batches end at {sorted(ends)})"
        assert set(paths) == {str(p) for p in ordered_files[:count]}, "committed files are not whole leading batches"

    for row in state.images.values():
        assert (data / row.thumb).is_file(), f"stored copy {row.thumb} missing"

    saved = VectorIndex.load(data, next(iter(state.vectors.values())).shape[0], state.model_id or "") if state.vectors else None
    if saved is not None:
        assert saved.generation <= state.generation, "saved FAISS index is ahead of the catalog"
        if saved.generation == state.generation:
            assert np.array_equal(np.sort(saved.ids()), np.array(sorted(state.images), dtype=np.int64)), (
                "saved FAISS index claims the catalog's generation but holds other ids"
            )


async def check_library(data: Path, embedder: ClipEmbedder, state: CatalogState, rng: random.Random) -> None:
    """Reopen (the restart), then: FAISS == SQLite, verify is clean, a file finds itself."""
    library = await Library.open(Settings(data_dir=data, clip=embedder.settings, ingest=IngestSettings()), embedder)
    try:
        db_ids = await library.catalog.all_image_ids()
        assert np.array_equal(np.sort(library.vectors.ids()), db_ids)
        assert list(db_ids) == sorted(state.images)
        for image_id, stored in state.vectors.items():
            in_index = library.vectors.vector(image_id)
            assert in_index is not None and np.allclose(in_index, stored, atol=1e-6), image_id
        report = await library.verify(repair=False)
        assert report.ok, report.problems
        if state.sources:
            path, image_id = rng.choice(sorted(state.sources))
            assert_finds_itself(await find_similar(library, Path(path), k=10), image_id)
            assert len(await search_images(library, "a red square", k=3)) == min(3, len(state.images))
    finally:
        await library.close()


def assert_finds_itself(hits: list[dict[str, Any]], image_id: int) -> None:
    """The file's own image is found with a cosine above 0.99, and nothing scores above it.

    "Nothing above it" rather than "first" because an exact tie (two different files with the
    same pixels, or a model that maps both to one vector) may order either way.
    """
    own = next((hit for hit in hits if hit["id"] == image_id), None)
    assert own is not None and own["score"] > 0.99, (image_id, hits)
    assert hits[0]["score"] - own["score"] < 1e-5, (image_id, hits)


def check_after_restart(data: Path, embedder: ClipEmbedder, state: CatalogState, rng: random.Random) -> None:
    """Run `check_library` on a copy, so the next child resumes from exactly what the crash left."""
    copy = data.with_name(data.name + "-restarted")
    shutil.rmtree(copy, ignore_errors=True)
    shutil.copytree(data, copy)
    try:
        asyncio.run(check_library(copy, embedder, state, rng))
    finally:
        shutil.rmtree(copy, ignore_errors=True)


# ---- images ---------------------------------------------------------------------------------


def make_photos(folder: Path, count: int, seed: int) -> list[Path]:
    """Small JPEGs of random colour blocks: cheap, all different, and far apart for any CLIP."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    paths = []
    for i in range(count):
        blocks = rng.integers(0, 256, size=(3, 4, 3), dtype=np.uint8)
        image = Image.fromarray(blocks).resize((96, 72), Image.Resampling.NEAREST)
        path = folder / f"photo_{i:03d}.jpg"
        image.save(path, quality=90)
        paths.append(path.resolve())
    return paths


def save_random_tiny_weights(path: Path, seed: int) -> Path:
    """Another set of shoebox-tiny weights (random, seeded): "a different model" for reindex."""
    import open_clip
    import torch

    from store import tinyclip

    tinyclip.register()
    generator_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        model = open_clip.create_model(tinyclip.MODEL_NAME, pretrained=None, device="cpu")
        torch.save(model.state_dict(), path)
    finally:
        torch.random.set_rng_state(generator_state)
    return path


def run_real_cli(args: list[str], env: dict[str, str], timeout: float = 180.0) -> tuple[int, Any, str]:
    """`python -m bot.cli ARGS --json` as a user runs it; returns (exit code, JSON, stderr)."""
    done = subprocess.run(
        [sys.executable, "-m", "bot.cli", *args, "--json"],
        cwd=CHILD_CWD, env=env, capture_output=True, text=True, timeout=timeout,
    )
    output = json.loads(done.stdout) if done.stdout.strip() else None
    return done.returncode, output, done.stderr


# ---- the tests ------------------------------------------------------------------------------


def test_sigkill_during_index_at_random_moments_loses_and_duplicates_nothing(
    tmp_path: Path, crash_server: CrashServer, embedder: ClipEmbedder
) -> None:
    folder = tmp_path / "photos"
    make_photos(folder, IMAGES, seed=SEED)
    ordered = [p.resolve() for p in expand_paths([folder])]
    assert len(ordered) == IMAGES
    rng = random.Random(SEED)
    argv = lambda data: ["--data", str(data), "index", str(folder)]  # noqa: E731
    marker, log = tmp_path / "loaded", tmp_path / "child.log"

    # One undisturbed run measures how long indexing takes after the model load on this machine;
    # kills are then spread uniformly over that span. A resumed run takes about as long (it reads
    # and decodes every file before it can tell which are already indexed), so the same span fits.
    calibration = tmp_path / "calibration"
    pid = crash_server.start(argv(calibration), marker, log)
    loaded = wait_for_model(crash_server, pid, marker, log)
    status = crash_server.wait(pid, RUN_SECONDS)
    assert status["exit"] == 0, tail(log)
    span = time.monotonic() - loaded
    assert len(read_catalog(calibration / DB_FILE).images) == IMAGES

    kills = mid_index_kills = runs = completed = 0
    kill_points: list[int] = []  # images committed when each kill landed
    epoch = 0
    data = tmp_path / f"data{epoch}"
    committed: dict[int, ImageRow] = {}
    committed_sources: dict[str, int] = {}
    started = time.monotonic()
    while kills < KILLS_REQUIRED:
        assert runs < MAX_INDEX_RUNS, f"only {kills} kills landed in {runs} runs"
        assert time.monotonic() - started < INDEX_LOOP_SECONDS, f"only {kills} kills in {INDEX_LOOP_SECONDS}s"
        runs += 1
        delay = rng.random() * span * 1.1
        pid = crash_server.start(argv(data), marker, log)
        wait_for_model(crash_server, pid, marker, log)
        time.sleep(delay)
        before_kill = read_catalog(data / DB_FILE)  # all of this is committed: it must survive
        run = finish(crash_server, pid, log)
        for image_id, row in before_kill.images.items():
            committed.setdefault(image_id, row)
        committed_sources.update(before_kill.source_of_path)

        state = read_catalog(data / DB_FILE)
        check_catalog(state, data, ordered, committed, committed_sources)
        check_after_restart(data, embedder, state, rng)
        committed = dict(state.images)
        committed_sources = state.source_of_path
        if run.killed:
            kills += 1
            kill_points.append(len(state.images))
            mid_index_kills += 0 < len(state.images) < IMAGES
        else:
            completed += 1
            assert len(state.images) == IMAGES, f"a finished run left {len(state.images)} images"
            epoch += 1
            data = tmp_path / f"data{epoch}"
            committed, committed_sources = {}, {}

    assert mid_index_kills >= MID_INDEX_KILLS_REQUIRED, kill_points
    assert len(set(kill_points)) >= DISTINCT_KILL_POINTS_REQUIRED, f"kills bunched up: {kill_points}"
    print(f"\n{runs} runs, {kills} killed ({mid_index_kills} mid-index), {completed} finished; "
          f"images committed at each kill: {kill_points}")

    # The last data folder was left by a kill: a real `python -m bot.cli` run finishes the job.
    code, summary, stderr = run_real_cli(["--data", str(data), "index", str(folder)], crash_server.env)
    assert code == 0, stderr
    assert summary["failed"] == [] and summary["duplicates"] == 0
    assert summary["indexed"] + summary["unchanged"] == IMAGES
    assert summary["unchanged"] == len(committed)
    state = read_catalog(data / DB_FILE)
    check_catalog(state, data, ordered, committed, committed_sources)
    assert len(state.images) == IMAGES and len(state.sources) == IMAGES
    check_after_restart(data, embedder, state, rng)


# Windows too narrow for a timer to hit reliably; the child kills itself exactly there.
# Each point: (what is already indexed before the crashing run, the crashing command, where).
# The folder holds two halves, a/ and b/, of 2 batches each.
CRASH_POINTS: dict[str, tuple[str, str, dict[str, Any]]] = {
    # batch 2 is being committed: 4 of its stored copies are written, its rows are not committed
    "copies-written-rows-not-committed": (
        "nothing", "index", {"module": "store.thumbs", "attribute": "ThumbStore.write_with", "call": 20, "when": "after"}
    ),
    # batch 2's rows are all inserted, its transaction is one statement away from COMMIT
    "rows-inserted-not-committed": (
        "nothing", "index", {"module": "store.db", "attribute": "Catalog.bump_generation", "call": 2, "when": "before"}
    ),
    # batch 3 is committed to SQLite but not yet added to FAISS
    "committed-not-in-faiss": (
        "nothing", "index", {"module": "store.library", "attribute": "Library._after_commit", "call": 3, "when": "before"}
    ),
    # a/ was indexed and saved; indexing b/ then saved the new FAISS file but not its header:
    # a torn save, new vectors under the old header
    "faiss-saved-header-not": (
        "half", "index", {"module": "store.vectors", "attribute": "write_atomically", "call": 1, "when": "after"}
    ),
    # `shoebox forget` committed the deletion but had not yet removed the stored copy
    "forgotten-copy-not-removed": (
        "all", "forget", {"module": "store.thumbs", "attribute": "ThumbStore.delete", "call": 1, "when": "before"}
    ),
}


@pytest.mark.parametrize("point", sorted(CRASH_POINTS))
def test_sigkill_at_exact_crash_points_then_restart(
    point: str, tmp_path: Path, crash_server: CrashServer, embedder: ClipEmbedder
) -> None:
    already, command, crash = CRASH_POINTS[point]
    folder = tmp_path / "photos"
    make_photos(folder / "a", POINT_IMAGES // 2, seed=SEED + 4)
    make_photos(folder / "b", POINT_IMAGES // 2, seed=SEED + 5)
    ordered = [p.resolve() for p in expand_paths([folder])]
    data = tmp_path / "data"
    marker, log = tmp_path / "loaded", tmp_path / "child.log"
    index_argv = ["--data", str(data), "index", str(folder)]
    rng = random.Random(SEED + 6)

    if already != "nothing":
        first = index_argv if already == "all" else ["--data", str(data), "index", str(folder / "a")]
        pid = crash_server.start(first, marker, log)
        assert crash_server.wait(pid, RUN_SECONDS)["exit"] == 0, tail(log)
    committed = read_catalog(data / DB_FILE).images
    argv = index_argv
    if command == "forget":
        forgotten = rng.choice(sorted(committed))
        argv = ["--data", str(data), "forget", str(forgotten)]

    pid = crash_server.start(argv, marker, log, crash=crash)
    status = crash_server.wait(pid, RUN_SECONDS)
    assert status["signal"] == signal.SIGKILL, f"the crash point was never reached: {status}\n{tail(log)}"
    state = read_catalog(data / DB_FILE)
    if command == "forget":
        assert set(state.images) == set(committed) - {forgotten}
        committed = {i: row for i, row in committed.items() if i != forgotten}
    check_catalog(state, data, ordered, committed, state.source_of_path, whole_batches=command == "index")
    if point == "committed-not-in-faiss":
        assert len(state.images) == 3 * BATCH
    if point == "faiss-saved-header-not":
        assert len(state.images) == POINT_IMAGES
        saved = VectorIndex.load(data, embedder.dim, embedder.model_id)
        assert saved is not None and saved.count == POINT_IMAGES and saved.generation < state.generation
    check_after_restart(data, embedder, state, rng)

    pid = crash_server.start(index_argv, marker, log)
    assert crash_server.wait(pid, RUN_SECONDS)["exit"] == 0, tail(log)
    final = read_catalog(data / DB_FILE)
    check_catalog(final, data, ordered, state.images, state.source_of_path)
    assert len(final.images) == POINT_IMAGES
    check_after_restart(data, embedder, final, rng)


def test_sigkill_during_reindex_keeps_the_old_index_serving_then_resumes(
    tmp_path: Path, crash_server: CrashServer, embedder: ClipEmbedder
) -> None:
    folder = tmp_path / "photos"
    files = make_photos(folder, IMAGES, seed=SEED + 1)
    data = tmp_path / "data"
    db = data / DB_FILE
    old_settings = Settings(data_dir=data, clip=embedder.settings, ingest=IngestSettings())

    async def build() -> None:
        async with await Library.open(old_settings, embedder) as library:
            outcomes = await library.index_paths([folder])
        assert [o.status for o in outcomes] == ["indexed"] * IMAGES

    asyncio.run(build())
    before = read_catalog(db)
    paths_to_ids = before.source_of_path
    old_model = embedder.model_id
    assert before.model_id == old_model and len(before.images) == IMAGES

    checkpoint = save_random_tiny_weights(tmp_path / "other-tiny.pt", seed=SEED + 2)
    new_embedder = load_embedder(replace(embedder.settings, checkpoint=checkpoint))
    new_model = new_embedder.model_id
    assert new_model != old_model
    new_settings = Settings(data_dir=data, clip=new_embedder.settings, ingest=IngestSettings())
    new_env = {"SHOEBOX_CLIP_CHECKPOINT": str(checkpoint)}
    marker, log = tmp_path / "loaded", tmp_path / "child.log"
    rng = random.Random(SEED + 3)

    # Four kills, each run resuming the previous one's staging: a random moment just after the
    # model load, then as soon as 1, 2 and 3 of the 4 chunks of staged vectors are committed.
    targets = [0, REINDEX_CHUNK, 2 * REINDEX_CHUNK, 3 * REINDEX_CHUNK]
    kills: list[int] = []
    for target in targets:
        pid = crash_server.start(["--data", str(data), "reindex"], marker, log, env=new_env)
        wait_for_model(crash_server, pid, marker, log)
        deadline = time.monotonic() + RUN_SECONDS
        if target == 0:
            time.sleep(rng.random() * 0.02)
        else:
            while staged_count(db) < target and time.monotonic() < deadline:
                if not crash_server.poll(pid)["running"]:
                    break
                time.sleep(0.002)
        run = finish(crash_server, pid, log)
        assert run.killed, f"reindex finished before the kill at {target} staged images:\n{run.log}"
        state = read_catalog(db)
        kills.append(len(state.staged))
        assert len(state.staged) >= target

        # The old model still owns the library: nothing about the served vectors changed.
        assert state.model_id == old_model
        assert state.images == before.images, "a killed reindex changed live image rows"
        assert set(state.staged.values()) <= {new_model}

        async def old_model_serves() -> None:
            library = await Library.open(old_settings, embedder)
            try:
                assert library.vectors.count == IMAGES
                report = await library.verify(repair=False)
                assert report.ok, report.problems
                probe = rng.choice(files)
                assert_finds_itself(await find_similar(library, probe, k=10), paths_to_ids[str(probe)])
                assert len(await search_images(library, "a blue circle", k=5)) == 5
            finally:
                await library.close()
            with pytest.raises(ModelMismatch):
                await Library.open(new_settings, new_embedder)

        asyncio.run(old_model_serves())

    assert kills[-1] >= 3 * REINDEX_CHUNK and kills[0] <= kills[-1], kills
    print(f"\nreindex killed with {kills} of {IMAGES} images staged")

    # A real `python -m bot.cli reindex` resumes and completes; then the new model owns the library.
    code, summary, stderr = run_real_cli(["--data", str(data), "reindex"], {**crash_server.env, **new_env})
    assert code == 0, stderr
    assert summary == {"reindexed": IMAGES, "model": new_model}
    after = read_catalog(db)
    assert after.model_id == new_model and after.staged == {}
    assert set(after.images) == set(before.images)
    for image_id, row in after.images.items():
        old = before.images[image_id]
        assert row.model_id == new_model and row.vector_digest != old.vector_digest
        assert replace(row, model_id=old.model_id, vector_digest=old.vector_digest) == old
    assert sorted(after.sources) == sorted(before.sources)

    async def new_model_serves() -> None:
        library = await Library.open(new_settings, new_embedder)
        try:
            assert np.array_equal(np.sort(library.vectors.ids()), np.array(sorted(after.images)))
            report = await library.verify(repair=False)
            assert report.ok, report.problems
            probe = rng.choice(files)
            assert_finds_itself(await find_similar(library, probe, k=10), paths_to_ids[str(probe)])
        finally:
            await library.close()
        with pytest.raises(ModelMismatch):
            await Library.open(old_settings, embedder)

    asyncio.run(new_model_serves())
