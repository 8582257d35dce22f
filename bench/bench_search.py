"""Text-search latency, recall and memory through the real store at 10k, 100k and 1M images.

Each size gets a real data folder: synthetic, clustered unit vectors (real photo collections are
clustered; i.i.d. random vectors are not like them) written as catalog rows with Discord sources
(a third with posted text, which the full-text half of each search ranks), then opened the normal way (which builds the FAISS index from SQLite) and queried with
`tools.search.search_images` — one text forward pass of the model, FAISS, the full-text match, the
SQLite lookups of the results. Latency is per query, end to end, p50/p99 over many queries.
Each query runs unscoped (the terminal), scoped to every channel (a Discord member who can read
them all, the common case) and scoped to 5 of 50 channels.

    python bench/bench_search.py [--sizes 10000,100000,1000000] [--queries 100] [--model ViT-B-32]

Recall@10 is measured against an exact scan for 200 queries drawn like the photos but not among
them, and for 200 just off an indexed photo. Memory is what the opened library holds once open,
in a fresh process; loading the index file and saving it hold a copy more for a moment.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from bench.common import percentiles  # noqa: E402
from store.db import Catalog  # noqa: E402
from store.embedder import ClipEmbedder  # noqa: E402
from store.library import DB_FILE, Library  # noqa: E402
from store.settings import ClipSettings, IngestSettings, Settings  # noqa: E402
from tools.search import Scope, search_images  # noqa: E402

RECALL_QUERIES = 200  # of each kind: 2,000 neighbours, a standard error of about 0.004
QUERIES = [
    "a dog on a beach", "birthday cake with candles", "a whiteboard full of notes", "snowy mountains",
    "two people hugging", "a red car", "a cat sleeping on a sofa", "city at night", "a plate of pasta",
    "a group photo in an office",
]


def cluster_centres(dim: int, rng: np.random.Generator, clusters: int = 1000) -> np.ndarray:
    centres = rng.normal(size=(clusters, dim)).astype(np.float32)
    return centres / np.linalg.norm(centres, axis=1, keepdims=True)


def clustered_vectors(count: int, centres: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Unit vectors around the centres: each a centre plus noise 2.4 times its length, so that
    two photos of one cluster have cosine ~0.15 and of two clusters ~0 (weak structure, which
    makes an approximate index work for its recall)."""
    dim = centres.shape[1]
    labels = rng.integers(0, len(centres), size=count)
    vectors = centres[labels] + rng.normal(scale=0.6 / np.sqrt(dim), size=(count, dim)).astype(np.float32) * 4
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors.astype(np.float32)


async def create_catalog(path: Path, model_id: str, dim: int) -> None:
    catalog = Catalog(path)
    await catalog.open()
    async with catalog.transaction() as conn:
        await catalog.set_meta(conn, "model_id", model_id)
        await catalog.set_meta(conn, "dim", str(dim))
    await catalog.close()


def posted_texts(count: int, rng: np.random.Generator) -> list[str]:
    """What people wrote with their photos: one post in three has 3-10 words, mostly from a wide
    vocabulary, one word in twenty from the queries' own (so the full-text half of every search
    has matches to rank, as it would in a real server)."""
    query_words = sorted({w for q in QUERIES for w in q.split() if len(w) > 2})
    texts = []
    for n in range(count):
        if n % 3:
            texts.append("")
            continue
        words = [
            query_words[rng.integers(len(query_words))] if rng.random() < 0.05 else f"w{rng.zipf(1.3) % 20_000}"
            for _ in range(rng.integers(3, 11))
        ]
        texts.append(" ".join(words))
    return texts


def fill_catalog(path: Path, vectors: np.ndarray, model_id: str, channels: int = 50) -> None:
    """Bulk rows the way indexing would leave them (one image, one Discord source each, with
    posted text on some)."""
    texts = posted_texts(len(vectors), np.random.default_rng(len(vectors) + 1))
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA synchronous = OFF")
    now = "2024-01-01T00:00:00+00:00"
    with conn:
        for start in range(0, len(vectors), 20_000):
            chunk = vectors[start : start + 20_000]
            ids = range(start + 1, start + 1 + len(chunk))
            conn.executemany(
                "INSERT INTO images (id, sha256, size_bytes, width, height, format, thumb, model_id, vector, created_at) "
                "VALUES (?, ?, 100000, 1024, 768, 'JPEG', ?, ?, ?, ?)",
                ((i, f"{i:064x}", f"thumbs/00/{i}.jpg", model_id, v.tobytes(), now) for i, v in zip(ids, chunk)),
            )
            conn.executemany(
                "INSERT INTO sources (image_id, kind, guild_id, channel_id, message_id, attachment_id, author_id, "
                "author_name, channel_name, filename, posted_text, posted_at, added_at) "
                "VALUES (?, 'discord', 1, ?, ?, ?, 7, 'someone', 'general', 'p.jpg', ?, ?, ?)",
                ((i, 1000 + i % channels, i, i, texts[i - 1], now, now) for i in ids),
            )
        conn.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('generation', '1')")
    conn.close()


async def measure(size: int, embedder: ClipEmbedder, queries: int, root: Path) -> dict[str, object]:
    settings = Settings(data_dir=root / f"n{size}", clip=embedder.settings, ingest=IngestSettings())
    settings.data_dir.mkdir(parents=True)
    rng = np.random.default_rng(size)
    await create_catalog(settings.data_dir / DB_FILE, embedder.model_id, embedder.dim)
    centres = cluster_centres(embedder.dim, rng)
    vectors = clustered_vectors(size, centres, rng)
    fill_catalog(settings.data_dir / DB_FILE, vectors, embedder.model_id)
    started = time.perf_counter()
    library = await Library.open(settings, embedder)
    open_seconds = time.perf_counter() - started
    try:
        scopes = {
            "search_ms": Scope.everything(),  # the terminal's view: no scope at all
            # From Discord every search is scoped to the channels the asker can read: all of
            # them for most members, a few for someone new.
            "every_channel_search_ms": Scope.channels({1000 + c for c in range(50)}),
            "scoped_search_ms": Scope.channels({1000 + c for c in range(5)}),  # 5 of 50 channels
        }
        for query in QUERIES[:3]:
            await search_images(library, query, k=10)  # warm-up
        samples: dict[str, list[float]] = {name: [] for name in scopes}
        for i in range(queries):
            query = QUERIES[i % len(QUERIES)] + ("" if i < len(QUERIES) else f" {i}")
            for name, scope in scopes.items():
                t0 = time.perf_counter()
                results = await search_images(library, query, k=10, scope=scope)
                samples[name].append((time.perf_counter() - t0) * 1000)
                assert len(results) == 10
        recall = recall_at_10(library, vectors, clustered_vectors(RECALL_QUERIES, centres, rng))
        near = vectors[rng.choice(len(vectors), size=RECALL_QUERIES, replace=False)]
        near = near + rng.normal(scale=0.02, size=near.shape).astype(np.float32)
        recall_near = recall_at_10(library, vectors, near / np.linalg.norm(near, axis=1, keepdims=True))
    finally:
        await library.close()
    del vectors
    command = [sys.executable, __file__, "--measure-open", str(settings.data_dir), "--model", embedder.settings.model]
    if embedder.settings.pretrained:
        command += ["--pretrained", embedder.settings.pretrained]
    reopen = json.loads(subprocess.run(command, check=True, capture_output=True, text=True).stdout)
    return {
        "images": size,
        "open_seconds": round(open_seconds, 2),
        "layout": library.vectors.layout,
        # Queries drawn like the photos but not among them (the headline), and queries a little
        # off an indexed photo (a near-duplicate looked for): against an exact scan.
        "recall_at_10_vs_exact": recall,
        "recall_at_10_near_an_indexed_photo": recall_near,
        "reopen_seconds": reopen["seconds"],
        "resident_bytes_per_image": round(reopen["resident_bytes"] / size),
        **{name: percentiles(ms) for name, ms in samples.items()},
    }


def recall_at_10(library: Library, vectors: np.ndarray, probes: np.ndarray) -> float:
    """Recall@10 of the index in use against an exact scan of the same vectors."""
    found = 0
    for probe in probes:
        exact = set((np.argpartition(-(vectors @ probe), 10)[:10] + 1).tolist())  # ids start at 1
        found += len(exact & {i for i, _ in library.vectors.search(probe, 10)})
    return round(found / (10 * len(probes)), 4)


def resident_bytes() -> int:
    """Current resident set size (not the peak), from /proc."""
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * resource.getpagesize()


def text_forward_ms(embedder: ClipEmbedder, repeats: int = 30) -> dict[str, float]:
    embedder.embed_texts(["warm up"])
    samples = []
    for i in range(repeats):
        t0 = time.perf_counter()
        embedder.embed_texts([QUERIES[i % len(QUERIES)]])
        samples.append((time.perf_counter() - t0) * 1000)
    return percentiles(samples)


async def measure_open(data_dir: Path, embedder: ClipEmbedder) -> dict[str, float]:
    """Resident memory an opened library adds, in a fresh process (nothing freed to reuse)."""
    settings = Settings(data_dir=data_dir, clip=embedder.settings, ingest=IngestSettings())
    before = resident_bytes()
    started = time.perf_counter()
    library = await Library.open(settings, embedder)
    seconds = time.perf_counter() - started
    grown = resident_bytes() - before
    await library.close()
    return {"seconds": round(seconds, 2), "resident_bytes": grown}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--measure-open", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--sizes", default="10000,100000,1000000")
    parser.add_argument("--queries", type=int, default=100)
    parser.add_argument("--model", default="ViT-B-32")
    parser.add_argument("--pretrained", default=None)
    args = parser.parse_args()
    torch.manual_seed(0)
    embedder = ClipEmbedder(ClipSettings(model=args.model, pretrained=args.pretrained))
    if args.measure_open:
        print(json.dumps(asyncio.run(measure_open(args.measure_open, embedder))))
        return
    report: dict[str, object] = {
        "model": embedder.model_id,
        "dim": embedder.dim,
        "threads": torch.get_num_threads(),
        "text_forward_ms": text_forward_ms(embedder),
        "sizes": [],
    }
    with tempfile.TemporaryDirectory() as tmp:
        for size in (int(s) for s in args.sizes.split(",")):
            report["sizes"].append(asyncio.run(measure(size, embedder, args.queries, Path(tmp))))  # type: ignore[union-attr]
    report["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
