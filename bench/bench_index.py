"""Indexing throughput against the bare model forward pass: same model, same machine, one run.

The ratio says how much the pipeline (read, decode, downscale, stored copy, preprocess, SQLite,
FAISS) costs on top of the unavoidable model work. The bare pass gets its inputs preprocessed in
advance and is timed alone, in the same precision the indexer uses.

    python bench/bench_index.py [--images 480] [--rounds 3] [--model ViT-B-32] [--precision auto|fp32|bf16]

A shared 2-core machine drifts by 10-20% from one minute to the next, more than most changes to
the pipeline are worth, so the two are measured in alternation: bare, index, bare, index, ...,
bare. Each round's ratio is its indexing rate over the mean of the bare passes either side of
it, and the figure reported is the median round. Then where the CPU goes: the model's passes per
photo alone and while indexing (timed on the threads that run them), each thread pool's CPU per
photo while indexing, and a profile of each step outside the model on one quiet thread.

The default job, 480 photos (30 batches), is long enough to measure the pipeline's steady rate,
the one a backfill sees. Filling the pipeline costs nothing (both cores decode the first batches),
but at the end one lane finishes its last batch while the other still runs, leaving a core idle
for 0.1-0.3 s: about 2% of a 160-photo job, about 1% of this one. A shorter `--images` shows it.

Both sides run in the precision the product would pick (`auto`: bf16 where the CPU has it and
it agrees with fp32). Each bare measurement runs the model both ways the machine allows, one
batch at a time on all its threads and batches side by side in the indexer's lanes, and counts
the faster, so the bare pass is the fastest faithful one.

Weights cannot always be downloaded; the default runs the architecture with random weights, which
costs exactly the same per image.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable, TypeVar

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from bench.common import Stopwatch, write_photos  # noqa: E402
from store import resample  # noqa: E402
from store.embedder import ClipEmbedder  # noqa: E402
from store.ingest import decode_image, save_thumbnail, thumbnail_of  # noqa: E402
from store.library import MODEL_LANES, IncomingImage, Library, _even_batches, file_source, sha256_of  # noqa: E402
from store.settings import ClipSettings, IngestSettings, Settings  # noqa: E402

T = TypeVar("T")


def model_inputs(embedder: ClipEmbedder, paths: list[Path], batch: int) -> list[torch.Tensor]:
    """The photos as the model's input batches, cut the way the indexer cuts a job, made before
    any timing starts."""
    inputs = []
    for path in paths:
        with Image.open(path) as im:
            inputs.append(embedder.preprocess(im.convert("RGB")))
    return [embedder.batch_tensor(group) for group in _even_batches(inputs, batch, MODEL_LANES)]


def bare_one_pass(embedder: ClipEmbedder, batches: list[torch.Tensor]) -> float:
    """Images/s with one batch at a time on all the model's threads."""
    embedder.embed_tensors(batches[0])  # warm-up
    with Stopwatch() as watch:
        for tensor in batches:
            embedder.embed_tensors(tensor)
    return sum(len(t) for t in batches) / watch.seconds


def bare_in_lanes(embedder: ClipEmbedder, batches: list[torch.Tensor], lanes: int) -> float:
    """Images/s with `lanes` batches side by side, each with its share of the threads (the
    way the indexer runs the model)."""
    queue = list(reversed(batches))
    lock = threading.Lock()

    def lane() -> None:
        embedder.embed_tensors_in_lane(batches[0][:2], lanes)  # warm-up of this thread
        ready.wait()
        while True:
            with lock:
                if not queue:
                    return
                tensor = queue.pop()
            embedder.embed_tensors_in_lane(tensor, lanes)

    ready = threading.Barrier(lanes + 1)
    threads = [threading.Thread(target=lane) for _ in range(lanes)]
    for thread in threads:
        thread.start()
    ready.wait()
    with Stopwatch() as watch:
        for thread in threads:
            thread.join()
    return sum(len(t) for t in batches) / watch.seconds


def bare_forward(
    embedder: ClipEmbedder, batches: list[torch.Tensor], ways: dict[str, list[float]], clock: ModelClock
) -> tuple[float, float]:
    """The bare pass in its fastest setting here: one batch on all threads, or batches in lanes
    as the indexer runs them, whichever is faster (both are recorded in `ways`); and the CPU
    milliseconds per image of the passes in lanes, whose one thread each the clock sees whole."""
    one = bare_one_pass(embedder, batches)
    clock.take_ms_per_image()  # that pass's other OpenMP thread is not on the clock: left out
    lanes = bare_in_lanes(embedder, batches, MODEL_LANES)
    model_ms = clock.take_ms_per_image()
    ways.setdefault("one_batch_all_threads", []).append(round(one, 2))
    ways.setdefault(f"{MODEL_LANES}_lanes", []).append(round(lanes, 2))
    return max(one, lanes), model_ms


def cpu_seconds() -> float:
    times = os.times()
    return times.user + times.system


class ModelClock:
    """CPU time of the model's forward passes, on whichever thread runs them: whether a pass
    costs more beside the pipeline's other work (caches, memory bandwidth) than alone. Whole
    only where each lane runs one thread (two lanes on two cores); with more, the OpenMP
    workers' share is not on the clock."""

    def __init__(self, embedder: ClipEmbedder) -> None:
        self.seconds = 0.0
        self.images = 0
        self._lock = threading.Lock()
        forward = embedder._embed_batch

        def timed(batch: torch.Tensor) -> np.ndarray:
            started = time.thread_time()
            vectors = forward(batch)
            with self._lock:
                self.seconds += time.thread_time() - started
                self.images += len(batch)
            return vectors

        embedder._embed_batch = timed  # type: ignore[method-assign]

    def take_ms_per_image(self) -> float:
        """Milliseconds per image since the last call."""
        with self._lock:
            result = 1000 * self.seconds / max(1, self.images)
            self.seconds, self.images = 0.0, 0
        return round(result, 2)


def threads_cpu() -> dict[str, float]:
    """CPU seconds so far of this process's threads, summed per pool (the name before `_n`);
    empty where /proc is not there."""
    names = {thread.native_id: thread.name for thread in threading.enumerate()}
    ticks = os.sysconf("SC_CLK_TCK")
    totals: dict[str, float] = {}
    try:
        tasks = os.listdir("/proc/self/task")
    except OSError:
        return totals
    for tid in tasks:
        try:
            with open(f"/proc/self/task/{tid}/stat") as handle:
                fields = handle.read().rsplit(")", 1)[1].split()
        except OSError:
            continue  # the thread ended meanwhile
        name = names.get(int(tid), "other").rsplit("_", 1)[0]
        name = "sqlite" if "_connection_worker" in name else name
        totals[name] = totals.get(name, 0.0) + (int(fields[11]) + int(fields[12])) / ticks
    return totals


async def pipeline(
    settings: Settings, embedder: ClipEmbedder, paths: list[Path], by_thread: dict[str, float], clock: ModelClock
) -> tuple[float, float, float]:
    """Images per second indexing `paths[1:]` into a new library (`paths[0]` warms it up), how
    many cores the process kept busy meanwhile, and the model's CPU milliseconds per image in
    its lanes; `by_thread` gets each thread pool's CPU milliseconds per photo."""
    library = await Library.open(settings, embedder)
    try:
        await library.index([IncomingImage(file_source(paths[0]))])  # warm-up, not counted
        clock.take_ms_per_image()
        items = [IncomingImage(file_source(p)) for p in paths[1:]]
        threads_before = threads_cpu()
        cpu_before = cpu_seconds()
        with Stopwatch() as watch:
            outcomes = await library.index(items)
        busy = (cpu_seconds() - cpu_before) / watch.seconds
        for name, seconds in threads_cpu().items():
            spent = seconds - threads_before.get(name, 0.0)
            if spent > 0:
                by_thread[name] = round(1000 * spent / len(items), 2)
        assert sum(o.status == "indexed" for o in outcomes) == len(items), "every photo must index"
        return len(items) / watch.seconds, busy, clock.take_ms_per_image()
    finally:
        await library.close()


def cpu_per_photo(settings: IngestSettings, embedder: ClipEmbedder, paths: list[Path], folder: Path) -> dict[str, float]:
    """Milliseconds of one thread per photo for each step of indexing outside the model, done
    the way the library does them, photo by photo (a profile of where the pipeline's CPU goes on
    a quiet machine; the ratio above is what counts)."""
    side = settings.thumb_max_side
    totals: dict[str, float] = {}

    def step(name: str, work: Callable[[], T]) -> T:
        started = time.perf_counter()
        out = work()
        totals[name] = totals.get(name, 0.0) + time.perf_counter() - started
        return out

    def one(path: Path) -> None:
        data = step("read_and_hash", path.read_bytes)
        step("read_and_hash", lambda: sha256_of(data))
        decoded = step("decode", lambda: decode_image(data, settings, min_side=side).image)
        pixels = step("to_tensor", lambda: resample.as_tensor(decoded))
        shrunk = step("shrink_to_copy", lambda: resample.shrink_to_fit(pixels, side))
        copy = step("copy_to_image", lambda: decoded if shrunk is pixels else resample.to_image(shrunk))
        with open(folder / "copy.jpg", "wb") as handle:
            step("encode_copy", lambda: save_thumbnail(thumbnail_of(copy, side), handle))
        step("model_crop", lambda: embedder.preprocess_pixels(pixels))

    one(paths[0])  # warm-up
    totals.clear()
    for path in paths:
        one(path)
    result = {name: round(1000 * seconds / len(paths), 2) for name, seconds in totals.items()}
    result["total"] = round(sum(result.values()), 2)
    return result


def bf16_agreement(model: str, pretrained: str | None, paths: list[Path]) -> float:
    """Lowest cosine between fp32 and bf16 image vectors, to show bf16 is a faithful setting."""
    torch.manual_seed(0)
    fp32 = ClipEmbedder(ClipSettings(model=model, pretrained=pretrained, precision="fp32"))
    torch.manual_seed(0)
    bf16 = ClipEmbedder(ClipSettings(model=model, pretrained=pretrained, precision="bf16"))
    images = [Image.open(p).convert("RGB") for p in paths[:16]]
    return float(np.min(np.sum(fp32.embed_images(images) * bf16.embed_images(images), axis=1)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=480, help="photos per indexing job (and bare pass)")
    parser.add_argument("--model", default="ViT-B-32")
    parser.add_argument("--pretrained", default=None)
    parser.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3, help="alternating index/bare rounds (median reported)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        paths = write_photos(root / "photos", args.images + 1, size=(1024, 768))
        clip = ClipSettings(
            model=args.model, pretrained=args.pretrained, precision=args.precision, batch_size=args.batch
        )
        torch.manual_seed(0)
        embedder = ClipEmbedder(clip)
        batches = model_inputs(embedder, paths[1:], args.batch)
        ways: dict[str, list[float]] = {}
        clock = ModelClock(embedder)
        rate, model_ms = bare_forward(embedder, batches, ways, clock)
        bare, model_alone = [rate], [model_ms]
        model_indexing: list[float] = []
        by_thread: list[dict[str, float]] = []
        indexed: list[float] = []
        cores_busy: list[float] = []
        for number in range(max(1, args.rounds)):
            settings = Settings(data_dir=root / f"data{number}", clip=clip, ingest=IngestSettings())
            by_thread.append({})
            rate, busy, model_ms = asyncio.run(pipeline(settings, embedder, paths, by_thread[-1], clock))
            indexed.append(rate)
            cores_busy.append(round(busy, 2))
            model_indexing.append(model_ms)
            rate, model_ms = bare_forward(embedder, batches, ways, clock)
            bare.append(rate)
            model_alone.append(model_ms)
        ratios = [rate / ((before + after) / 2) for rate, before, after in zip(indexed, bare, bare[1:])]
        middle = sorted(range(len(ratios)), key=ratios.__getitem__)[len(ratios) // 2]
        result = {
            "model": embedder.model_id,
            "precision": embedder.precision,
            "threads": torch.get_num_threads(),
            "images": args.images,
            "photo_size": "1024x768 JPEG",
            "rounds": len(ratios),
            "bare_forward_images_per_s": round((bare[middle] + bare[middle + 1]) / 2, 2),
            "index_images_per_s": round(indexed[middle], 2),
            "ratio": round(ratios[middle], 3),
            "ratio_per_round": [round(r, 3) for r in ratios],
            "bare_per_pass": [round(b, 2) for b in bare],
            "bare_per_pass_by_setting": ways,
            "cores_busy_while_indexing": cores_busy,
            # Where a photo's CPU goes while indexing (the median round): the model's passes,
            # measured on the threads that run them, and each thread pool in all.
            "model_cpu_ms_per_photo_alone": model_alone,
            "model_cpu_ms_per_photo_while_indexing": model_indexing,
            "cpu_ms_per_photo_by_thread_while_indexing": by_thread[middle],
        }
        result["cpu_ms_per_photo_one_thread"] = cpu_per_photo(IngestSettings(), embedder, paths[1:41], root)
        if embedder.precision == "bf16":
            result["min_cosine_bf16_vs_fp32"] = round(bf16_agreement(args.model, args.pretrained, paths), 5)
        print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
