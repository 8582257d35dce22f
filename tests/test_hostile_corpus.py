"""The hostile corpus (bench/hostile_corpus.py) through the real indexer, not just the decoder.

tests/test_ingest.py proves that `decode_image` judges every corpus file right. This file proves
the promise one level up, where the files meet the catalog, the stored copies and FAISS: every file
gets exactly one outcome, the outcome is the labelled one, a refused file leaves nothing behind but
its one-line reason in `failures`, odd names are recorded exactly as they are on disk, and the
library is still consistent and searchable afterwards. The same corpus also goes through the
`shoebox index --json` command, whose counts must match.
"""

from __future__ import annotations

import hashlib
import json
import re
import sqlite3
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from bench import hostile_corpus as hostile
from bot.cli import main
from store.db import SourceFilter
from store.embedder import ClipEmbedder
from store.library import DB_FILE, IndexOutcome, Library, expand_paths
from store.settings import IngestSettings, Settings
from store.thumbs import THUMB_DIR
from tools.search import find_similar, search_images



LIMITS = IngestSettings(max_file_bytes=hostile.CORPUS_MAX_FILE_BYTES, max_pixels=hostile.CORPUS_MAX_PIXELS)
SENTENCE_END = re.compile(r"[.!?](\s|$)")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Any]]:
    out = tmp_path_factory.mktemp("hostile").resolve()
    files = hostile.generate_corpus(out, seed=0)
    assert len(files) >= 200
    return out, files


def dot_named(root: Path, files: list[Any]) -> list[Path]:
    """Files a folder walk skips because their names start with a dot (hidden files, by design).

    The path-traversal look-alikes ("..%2f..%2fetc%2fpasswd.jpg") are among them, so they are
    handed to the indexer by name, as a user naming a file explicitly would.
    """
    walked = set(expand_paths([root]))
    return [f.path for f in files if f.path not in walked]


def expected_counts(files: list[Any]) -> tuple[int, int, int]:
    """(new images, duplicates, refused): byte-identical valid files become one image."""
    valid = [f for f in files if f.expect == hostile.INDEXED]
    distinct = len({hashlib.sha256(f.path.read_bytes()).hexdigest() for f in valid})
    return distinct, len(valid) - distinct, len(files) - len(valid)


def one_sentence(reason: str | None) -> bool:
    """A reason people can read: short, one line, one sentence, no Python in it."""
    if not reason or "\n" in reason or len(reason) > 120:
        return False
    if "Traceback" in reason or "Error" in reason or "PIL" in reason:
        return False
    return len(SENTENCE_END.findall(reason.strip())) <= 1


def test_dot_named_files_are_exactly_the_ones_a_folder_walk_skips(corpus: tuple[Path, list[Any]]) -> None:
    root, files = corpus
    skipped = {p.name for p in dot_named(root, files)}
    assert skipped == {f.path.name for f in files if f.path.name.startswith(".")}
    assert "..%2f..%2fetc%2fpasswd.jpg" in skipped and ".hidden.jpg" in skipped


async def test_every_hostile_file_gets_its_outcome_and_a_refusal_leaves_nothing_behind(
    corpus: tuple[Path, list[Any]], tmp_path: Path, embedder: ClipEmbedder
) -> None:
    root, files = corpus
    data = tmp_path / "data"
    settings = Settings(data_dir=data, clip=embedder.settings, ingest=LIMITS)
    library = await Library.open(settings, embedder)
    try:
        outcomes = await library.index_paths([root, *dot_named(root, files)])

        # Every file exactly one outcome, and it is the labelled one.
        by_path: dict[str, list[IndexOutcome]] = {}
        for outcome in outcomes:
            by_path.setdefault(str(outcome.source.path), []).append(outcome)
        assert len(outcomes) == len(files)
        wrong: list[str] = []
        for item in files:
            got = by_path.get(str(item.path), [])
            assert len(got) == 1, f"{item.kind}/{item.path.name!r}: {len(got)} outcomes"
            outcome = got[0]
            if item.expect == hostile.INDEXED:
                if outcome.status not in ("indexed", "duplicate") or outcome.image_id is None:
                    wrong.append(f"{item.kind}/{item.path.name!r}: {outcome.status} {outcome.reason!r}")
            elif outcome.status != "failed":
                wrong.append(f"{item.kind}/{item.path.name!r}: {outcome.status}, expected a refusal")
            else:
                assert one_sentence(outcome.reason), (item.path.name, outcome.reason)
                assert outcome.image_id is None
        assert wrong == []

        # Same bytes, same image: the first file (in indexing order) is new, the rest duplicates.
        first_of_sha: dict[str, int] = {}
        for outcome in outcomes:
            if outcome.status == "failed":
                continue
            sha = hashlib.sha256(Path(str(outcome.source.path)).read_bytes()).hexdigest()
            expected_status = "duplicate" if sha in first_of_sha else "indexed"
            assert outcome.status == expected_status, (outcome.source.filename, outcome.status)
            assert first_of_sha.setdefault(sha, int(outcome.image_id or 0)) == outcome.image_id

        # Names are recorded exactly as on disk, inside the corpus folder, whatever they contain.
        sources = file_sources(data)
        for item in files:
            if item.expect != hostile.INDEXED:
                continue
            source = sources[str(item.path)]
            assert source["filename"] == item.path.name
            assert Path(source["path"]).parent == root / item.kind
            assert root in Path(source["path"]).resolve().parents

        # Nothing stays behind for a refused file, and exactly one stored copy per image.
        refused = {str(f.path) for f in files if f.expect == hostile.REJECTED}
        assert not refused & set(sources), "a refused file has a catalog row"
        new_images, duplicates, refused_count = expected_counts(files)
        counts = await library.catalog.counts()
        assert counts["images"] == new_images == len(first_of_sha)
        assert counts["sources"] == new_images + duplicates
        assert counts["failures"] == refused_count
        failure_keys = {key for key, _, _ in await library.catalog.recent_failures(10_000)}
        assert failure_keys == {f"file:{path}" for path in refused}
        on_disk = {str(p.relative_to(data)) for p in (data / THUMB_DIR).rglob("*") if p.is_file()}
        assert on_disk == await library.catalog.all_thumbs()
        assert len(on_disk) == new_images
        assert [p for p in data.rglob("*") if p.name.endswith(".tmp")] == []

        # Still fine afterwards: searches answer, FAISS and SQLite agree, verify finds nothing.
        assert len(await search_images(library, "a red circle", k=5)) == 5
        probe = root / "size_limit" / "noise_800x800.png"
        hits = await find_similar(library, probe, k=10)
        own = [h for h in hits if h["id"] == by_path[str(probe)][0].image_id]
        assert own and own[0]["score"] > 0.99 and hits[0]["score"] - own[0]["score"] < 1e-5, hits
        vector = await library.vector_of(first_of_sha[hashlib.sha256(probe.read_bytes()).hexdigest()])
        assert vector is not None
        assert len(await library.search_vector(vector, 3, SourceFilter())) == 3
        assert sorted(library.vectors.ids().tolist()) == (await library.catalog.all_image_ids()).tolist()
        report = await library.verify(repair=False)
        assert report.as_dict() == {"ok": True, "problems": [], "repaired": []}
    finally:
        await library.close()
    assert {p.name for p in data.iterdir()} <= {
        DB_FILE, f"{DB_FILE}-wal", f"{DB_FILE}-shm", "vectors.faiss", "vectors.json", THUMB_DIR
    }


def file_sources(data: Path) -> dict[str, dict[str, Any]]:
    """Every file source row, by path, read straight from SQLite."""
    conn = sqlite3.connect(data / DB_FILE, timeout=30)
    try:
        conn.row_factory = sqlite3.Row
        return {row["path"]: dict(row) for row in conn.execute("SELECT * FROM sources WHERE kind = 'file'")}
    finally:
        conn.close()


@pytest.mark.usefixtures("cli_env")
def test_the_index_command_reports_the_same_counts_and_is_idempotent(
    corpus: tuple[Path, list[Any]], tmp_path: Path, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    root, files = corpus
    monkeypatch.setenv("SHOEBOX_MAX_FILE_MB", str(hostile.CORPUS_MAX_FILE_BYTES // (1024 * 1024)))
    argv = ["--data", str(tmp_path / "data"), "index", str(root), *map(str, dot_named(root, files)), "--json"]
    new_images, duplicates, refused_count = expected_counts(files)
    refused = {str(f.path) for f in files if f.expect == hostile.REJECTED}

    assert main(argv) == 0
    summary = json.loads(capsys.readouterr().out)
    assert (summary["indexed"], summary["duplicates"], summary["unchanged"]) == (new_images, duplicates, 0)
    assert len(summary["failed"]) == refused_count
    assert {f["path"] for f in summary["failed"]} == refused
    assert all(one_sentence(f["error"]) for f in summary["failed"])
    reasons = Counter(f["error"].split(" (")[0] for f in summary["failed"])
    assert reasons["image data is truncated or corrupt"] > 0 and reasons["file is empty"] == 5

    assert main(argv) == 0
    again = json.loads(capsys.readouterr().out)
    assert (again["indexed"], again["duplicates"], again["unchanged"]) == (0, 0, new_images + duplicates)
    assert {f["path"] for f in again["failed"]} == refused
