"""The bot's indexing queue under a burst of photos, and what it costs the event loop.

1,000 generated photo-like JPEGs go through exactly what the bot uses — `IndexQueue` persisting
jobs in `bot.sqlite3`, its worker batching them into `Library.index` — with the downloads served
from memory (no network). Meanwhile a probe task sleeps 10 ms in a loop and records how late it
wakes: that lateness is what every other coroutine of the bot (the gateway heartbeat, answering a
question) would wait. Jobs are submitted in pages of 100 through the bounded queue, the way a
backfill feeds it.

    python bench/bench_bot_queue.py [--images 1000] [--timeout 600] [--size 800x600] [--model shoebox-tiny]

The model is the shipped shoebox-tiny unless SHOEBOX_CLIP_MODEL (and SHOEBOX_CLIP_CHECKPOINT)
say otherwise, or `--model` names an open_clip architecture (run with random weights: the cost per
image is the same as with trained ones).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402

from bench.common import percentiles, photo_like  # noqa: E402
from bot.jobs import DB_FILE, IndexJob, IndexQueue, JobStore, QueueSettings  # noqa: E402
from store.embedder import load_embedder  # noqa: E402
from store.library import Library  # noqa: E402
from store.settings import ClipSettings, IngestSettings, Settings  # noqa: E402

MAX_IMAGES = 5000
PAGE = 100
PROBE_SLEEP = 0.010


def make_jpegs(count: int, size: tuple[int, int], seed: int = 7) -> list[bytes]:
    """Photo-like JPEGs, generated in a few threads before anything is timed."""
    import io

    def one(i: int) -> bytes:
        image = photo_like(np.random.default_rng([seed, i]), size)
        buffer = io.BytesIO()
        image.save(buffer, "JPEG", quality=88)
        return buffer.getvalue()

    with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:
        return list(pool.map(one, range(count)))


def clip_settings(model: str | None) -> ClipSettings:
    if model:
        return ClipSettings(model=model, pretrained=None)
    if os.environ.get("SHOEBOX_CLIP_MODEL"):
        return ClipSettings.from_env()
    return ClipSettings(model="shoebox-tiny", pretrained=None)


async def probe(lags_ms: list[float], stop: asyncio.Event) -> None:
    loop = asyncio.get_running_loop()
    while not stop.is_set():
        started = loop.time()
        await asyncio.sleep(PROBE_SLEEP)
        lags_ms.append(max(0.0, (loop.time() - started - PROBE_SLEEP) * 1000))


async def run(args: argparse.Namespace) -> dict[str, object]:
    width, height = (int(v) for v in args.size.lower().split("x"))
    count = min(args.images, MAX_IMAGES)
    print(f"Generating {count} photo-like JPEGs ({width}x{height}) ...", file=sys.stderr)
    photos = make_jpegs(count, (width, height))
    clip = clip_settings(args.model)
    embedder = load_embedder(clip)
    print(f"Model {embedder.model_id}; indexing through the bot's queue ...", file=sys.stderr)
    with tempfile.TemporaryDirectory(prefix="shoebox-bench-queue-") as folder:
        settings = Settings(data_dir=Path(folder), clip=clip, ingest=IngestSettings())
        library = await Library.open(settings, embedder)
        store = await JobStore.open(Path(folder) / DB_FILE)
        by_url = {f"mem://{i}": data for i, data in enumerate(photos)}

        async def download(job: IndexJob) -> bytes:
            await asyncio.sleep(0)  # a real download yields to the loop too
            return by_url[job.url]

        queue_settings = QueueSettings(max_pending=args.max_pending, batch_size=args.queue_batch)
        queue = IndexQueue(store, library, download, queue_settings)
        jobs = [
            IndexJob(attachment_id=10_000 + i, guild_id=1, channel_id=2, message_id=20_000 + i,
                     filename=f"photo{i}.jpg", url=f"mem://{i}", posted_at="2024-06-01T12:00:00+00:00",
                     author_id=3, author_name="bench", channel_name="photos", size=len(photos[i]))
            for i in range(count)
        ]
        lags: list[float] = []
        stop = asyncio.Event()
        prober = asyncio.create_task(probe(lags, stop))
        await asyncio.sleep(0.2)
        idle_lags = list(lags)
        started = time.perf_counter()
        queue.start()
        deadline = started + args.timeout
        timed_out = False
        try:
            for start in range(0, count, PAGE):
                await queue.submit(jobs[start : start + PAGE])  # waits whenever the queue is full
                if time.perf_counter() > deadline:
                    timed_out = True
                    break
            while not timed_out and await queue.pending():
                if time.perf_counter() > deadline:
                    timed_out = True
                    break
                await asyncio.sleep(0.05)
        finally:
            elapsed = time.perf_counter() - started
            stop.set()
            await prober
            await queue.stop()
            stats = await library.stats()
            await store.close()
            await library.close()
    busy = lags[len(idle_lags):]
    counters = queue.counters
    done = counters.indexed + counters.duplicates + counters.unchanged
    return {
        "images": count,
        "indexed": counters.indexed,
        "rejected": counters.rejected,
        "gave_up": counters.gave_up,
        "in_library": stats["images"],
        "seconds": round(elapsed, 2),
        "images_per_second": round(done / elapsed, 1) if elapsed else None,
        "timed_out": timed_out,
        "loop_lag_ms": {**percentiles(busy or [0.0]), "samples": len(busy)},
        "idle_loop_lag_ms": percentiles(idle_lags or [0.0]),
        "model": embedder.model_id,
        "batch_size": queue_settings.batch_size,
        "max_pending": queue_settings.max_pending,
        "cpus": os.cpu_count(),
        "image_size": f"{width}x{height}",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=1000, help=f"photos to index (at most {MAX_IMAGES})")
    parser.add_argument("--timeout", type=float, default=600.0, help="stop after this many seconds")
    parser.add_argument("--size", default="800x600", help="photo size, WIDTHxHEIGHT (default 800x600)")
    parser.add_argument("--max-pending", type=int, default=256, help="queue bound (default 256)")
    parser.add_argument("--model", default=None, help="an open_clip architecture, random weights")
    parser.add_argument("--queue-batch", type=int, default=QueueSettings().batch_size,
                        help=f"jobs the worker takes at a time (default {QueueSettings().batch_size})")
    args = parser.parse_args()
    result = asyncio.run(run(args))
    lag = result["loop_lag_ms"]
    print(json.dumps(result, indent=2))
    print(
        f"\n{result['indexed']} images in {result['seconds']}s = {result['images_per_second']} images/s; "
        f"event-loop lag max {lag['max']} ms, p99 {lag['p99']} ms"  # type: ignore[index]
        + (" (TIMED OUT)" if result["timed_out"] else ""),
        file=sys.stderr,
    )


if __name__ == "__main__":
    main()
