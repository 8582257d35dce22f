"""Start-up time to first answer: a fresh `shoebox ask` process, from spawn to printed answer.

It is what a person waits for in a terminal and most of what a bot restart costs before its
first reply: Python and torch imports, loading the CLIP weights from disk, opening the catalog and
the vector index, one text forward pass and the search. Offline mode (no API key), so no network
time is counted. Each model gets a library of `--images` photos first (not timed).

    python bench/bench_startup.py [--images 200] [--runs 5] [--models shoebox-tiny,ViT-B-32]

ViT-B-32 runs with randomly initialised weights saved as a local checkpoint: the same file size
and load cost as the real LAION weights, which cannot be downloaded here. The commands run in an
empty folder, so no `.env` (an API key would make the answer go online) is read. The weights and
the library are in the page cache by then (indexing has just read them): the figures are a
restart's, not a cold boot's; the first run of each model is reported beside the median.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import write_photos  # noqa: E402

SHOEBOX = [sys.executable, "-m", "bot.cli"]


def model_env(model: str, root: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SHOEBOX_", "ANTHROPIC_"))}
    env["HF_HUB_OFFLINE"] = "1"
    env["SHOEBOX_CLIP_MODEL"] = model
    if model != "shoebox-tiny":
        import open_clip
        import torch

        checkpoint = root / f"{model}-random.pt"
        if not checkpoint.exists():
            torch.manual_seed(0)
            network, _, _ = open_clip.create_model_and_transforms(model, pretrained=None)
            torch.save(network.state_dict(), checkpoint)
        env["SHOEBOX_CLIP_CHECKPOINT"] = str(checkpoint)
    return env


def timed(command: list[str], env: dict[str, str], cwd: Path) -> tuple[float, str]:
    started = time.perf_counter()
    done = subprocess.run(command, env=env, cwd=cwd, capture_output=True, text=True, timeout=600, check=True)
    return time.perf_counter() - started, done.stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--models", default="shoebox-tiny,ViT-B-32")
    args = parser.parse_args()
    report: dict[str, object] = {"images": args.images, "runs": args.runs}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        photos = root / "photos"
        write_photos(photos, args.images, size=(640, 480))
        help_seconds = [timed(SHOEBOX + ["--help"], dict(os.environ), root)[0] for _ in range(args.runs)]
        report["help_seconds_median"] = round(statistics.median(help_seconds), 3)
        for model in args.models.split(","):
            env = model_env(model, root)
            data = str(root / f"data-{model}")
            subprocess.run(SHOEBOX + ["--data", data, "index", str(photos)], env=env, cwd=root, check=True,
                           capture_output=True, timeout=1800)
            seconds = []
            for _ in range(args.runs):
                elapsed, out = timed(SHOEBOX + ["--data", data, "ask", "a photo of a red car", "--json"], env, root)
                reply = json.loads(out)
                assert reply["offline"] and reply["images"], "the answer must show images"
                seconds.append(elapsed)
            report[model] = {
                "first_answer_seconds_median": round(statistics.median(seconds), 2),
                "first_answer_seconds_first_run": round(seconds[0], 2),
                "first_answer_seconds_max": round(max(seconds), 2),
            }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
