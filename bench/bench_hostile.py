"""Index the hostile corpus through the real library and report outcomes, time, memory, leftovers.

    python bench/bench_hostile.py [--seed 0] [--checkpoint PATH] [--keep DIR]

The corpus (bench/hostile_corpus.py: bombs, truncated and corrupt files, non-images, polyglots,
odd names...) is written by a child process, so that building its big files does not count in
this process's memory peak. Indexing then runs here, in-process, through `Library.index_paths`
with the limits the corpus labels assume (2 MB, 64 megapixels) and the small CLIP model
(shipped weights, or --checkpoint / SHOEBOX_CLIP_CHECKPOINT).

Prints one JSON object: per kind, the expected and actual outcomes; files whose outcome differs
from its label; wall time; peak RSS (ru_maxrss) before and after indexing; and every kind of
leftover a refused or duplicate file could leave (stray or missing stored copies, temp files,
catalog rows, failure rows, FAISS/SQLite disagreement, verify problems) with their total, which
must be 0. Exit status 1 when any label is missed or anything is left over.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

_GENERATE = """
import json, sys
sys.path.insert(0, sys.argv[3])
from bench.hostile_corpus import generate_corpus
files = generate_corpus(sys.argv[1], seed=int(sys.argv[2]))
print(json.dumps([[str(f.path), f.kind, f.expect] for f in files]))
"""


def peak_rss_mb() -> float:
    """This process's peak resident set so far (Linux reports ru_maxrss in KiB)."""
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def generate_in_child(out_dir: Path, seed: int) -> list[tuple[Path, str, str]]:
    """Write the corpus from a separate process and return its labels (path, kind, expect)."""
    done = subprocess.run(
        [sys.executable, "-c", _GENERATE, str(out_dir), str(seed), str(ROOT)],
        capture_output=True, text=True, timeout=600, check=True,
    )
    return [(Path(p), kind, expect) for p, kind, expect in json.loads(done.stdout)]


async def run(corpus_dir: Path, data_dir: Path, labels: list[tuple[Path, str, str]], checkpoint: Path | None) -> dict[str, Any]:
    from bench.hostile_corpus import CORPUS_MAX_FILE_BYTES, CORPUS_MAX_PIXELS, INDEXED
    from store.embedder import load_embedder
    from store.library import Library, expand_paths
    from store.settings import TINY_MODEL, ClipSettings, IngestSettings, Settings

    embedder = load_embedder(ClipSettings(model=TINY_MODEL, pretrained=None, checkpoint=checkpoint))
    settings = Settings(
        data_dir=data_dir,
        clip=embedder.settings,
        ingest=IngestSettings(max_file_bytes=CORPUS_MAX_FILE_BYTES, max_pixels=CORPUS_MAX_PIXELS),
    )
    walked = set(expand_paths([corpus_dir]))
    hidden = [path for path, _, _ in labels if path not in walked]  # dot-named: a folder walk skips them
    library = await Library.open(settings, embedder)
    try:
        rss_before = peak_rss_mb()
        started = time.perf_counter()
        outcomes = await library.index_paths([corpus_dir, *hidden])
        seconds = time.perf_counter() - started
        rss_after = peak_rss_mb()

        by_path = {str(o.source.path): o for o in outcomes}
        kinds: dict[str, Counter[str]] = defaultdict(Counter)  # kind -> files, expected_*, outcome counts
        mismatches: list[str] = []
        refused: set[str] = set()
        valid_shas: set[str] = set()
        for path, kind, expect in labels:
            outcome = by_path.get(str(path))
            status = outcome.status if outcome else "no outcome"
            kinds[kind]["files"] += 1
            kinds[kind][f"expected_{expect}"] += 1
            kinds[kind][status] += 1
            ok = status in ("indexed", "duplicate") if expect == INDEXED else status == "failed"
            if not ok:
                mismatches.append(f"{kind}/{path.name}: expected {expect}, got {status}")
            if expect == INDEXED:
                valid_shas.add(hashlib.sha256(path.read_bytes()).hexdigest())
            else:
                refused.add(str(path))

        catalog = library.catalog
        async with catalog.reader.execute("SELECT path FROM sources WHERE kind = 'file'") as cur:
            source_paths = {str(row[0]) for row in await cur.fetchall()}
        failure_keys = {key for key, _, _ in await catalog.recent_failures(1_000_000)}
        known_copies = await catalog.all_thumbs()
        on_disk = library.thumbs.all_relative()
        db_ids = set((await catalog.all_image_ids()).tolist())
        index_ids = set(library.vectors.ids().tolist())
        report = await library.verify(repair=False)
        leftovers = {
            "stray_stored_copies": len(on_disk - known_copies),
            "missing_stored_copies": len(known_copies - on_disk),
            "tmp_files": sum(1 for p in data_dir.rglob("*") if p.name.endswith(".tmp")),
            "catalog_rows_for_refused_files": len(source_paths & refused),
            "failure_rows_not_matching_refused_files": len(failure_keys ^ {f"file:{p}" for p in refused}),
            "images_beyond_distinct_valid_files": len(db_ids) - len(valid_shas),
            "faiss_sqlite_disagreements": len(db_ids ^ index_ids),
            "verify_problems": len(report.problems),
        }
        reasons = Counter(o.reason for o in outcomes if o.status == "failed")
        return {
            "model": embedder.model_id,
            "corpus_files": len(labels),
            "outcomes": dict(Counter(o.status for o in outcomes)),
            "kinds": {kind: dict(counts) for kind, counts in kinds.items()},
            "mismatches": mismatches,
            "top_reasons": dict(reasons.most_common(8)),
            "index_seconds": round(seconds, 2),
            "files_per_second": round(len(labels) / seconds, 1),
            "peak_rss_mb_before_index": rss_before,
            "peak_rss_mb_after_index": rss_after,
            "stored_copies": len(on_disk),
            "leftovers": leftovers,
            "leftovers_total": sum(leftovers.values()),
            "verify": report.as_dict(),
        }
    finally:
        await library.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seed", type=int, default=0, help="corpus seed (default 0)")
    parser.add_argument(
        "--checkpoint", type=Path, default=os.environ.get("SHOEBOX_CLIP_CHECKPOINT") or None,
        help="shoebox-tiny weights to use instead of the shipped ones",
    )
    parser.add_argument("--keep", type=Path, default=None, help="work in this folder and keep it")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        work = args.keep or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        corpus_dir = (work / "corpus").resolve()
        labels = generate_in_child(corpus_dir, args.seed)
        result = asyncio.run(run(corpus_dir, work / "data", labels, args.checkpoint))
    kinds = result.pop("kinds")
    text = json.dumps(result, indent=2, ensure_ascii=False)
    rows = ",\n".join(f"    {json.dumps(k)}: {json.dumps(v)}" for k, v in kinds.items())
    print(text[:-2] + ',\n  "kinds": {\n' + rows + "\n  }\n}")  # one line per kind
    return 0 if result["leftovers_total"] == 0 and not result["mismatches"] else 1


if __name__ == "__main__":
    sys.exit(main())
