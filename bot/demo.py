"""`shoebox demo`: a two-minute tour that needs no network, no API key and no Discord.

It draws a small gallery of coloured-shape scenes, indexes it with the shoebox-tiny model shipped
in the package, and runs a few searches and a look-alike query, so a newcomer sees the whole path —
decode, embed, store, search — work on their own machine.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

# Things the default gallery (80 scenes, seed 2024) really contains, so the first hit of each
# search can be checked against its file name.
DEMO_QUERIES = (
    "a red circle",
    "an orange star",
    "a yellow heart",
    "a green circle and a blue star",
)


MAX_DEMO_IMAGES = 2000  # a tour, not a load generator: enough to see search at work


def demo_size(text: str) -> int:
    """An argparse type: how many scenes the demo draws, from 1 to MAX_DEMO_IMAGES."""
    from bot.cli import positive_int

    count = positive_int(text)
    if count > MAX_DEMO_IMAGES:
        raise argparse.ArgumentTypeError(
            f"at most {MAX_DEMO_IMAGES}, not {count} (to index your own photos: shoebox index FOLDER)"
        )
    return count


def add_command(sub: Any) -> None:
    parser = sub.add_parser("demo", help="index a generated gallery and search it (offline, ~1 min)")
    parser.add_argument(
        "--images", type=demo_size, default=80, help=f"how many scenes to draw (default 80, at most {MAX_DEMO_IMAGES})"
    )
    parser.add_argument("--seed", type=int, default=2024, help="seed of the gallery")
    parser.set_defaults(func=run_demo)


async def run_demo(args: argparse.Namespace) -> int:
    from bot.cli import ProgressBar, UserError, format_result, library_at, load_model, load_settings
    from store.library import IncomingImage, expand_paths, file_source
    from store.tinyclip import MODEL_NAME
    from store.tinyclip.scenes import generate_gallery
    from tools.search import find_similar, search_images

    settings = load_settings(args)
    if args.data is None:
        settings = replace(settings, data_dir=Path("shoebox-demo"))
    clip = replace(settings.clip, model=MODEL_NAME, pretrained=None, checkpoint=None)
    settings = replace(settings, clip=clip)
    gallery = settings.data_dir / "gallery"
    started = time.monotonic()
    print(f"1. Drawing {args.images} scenes into {gallery} ...")
    try:
        generate_gallery(gallery, args.images, seed=args.seed)
    except OSError as error:
        raise UserError(f"cannot draw the gallery into {gallery} ({error.strerror or error}): choose another folder with --data") from None
    print(f"2. Loading the {MODEL_NAME} CLIP model shipped with Shoebox ...")
    embedder = load_model(clip)
    advice = f" (or delete {settings.data_dir} to start the demo afresh)"
    async with library_at(settings, embedder, advice=advice) as library:
        items = [IncomingImage(file_source(p)) for p in expand_paths([gallery])]
        outcomes = await library.index(items, ProgressBar("   indexing"))
        new = sum(o.status == "indexed" for o in outcomes)
        print(f"   {new} new, {len(outcomes) - new} already indexed.")
        print("\n3. Searching by text:")
        for query in DEMO_QUERIES:
            print(f"\n   search: {query!r}")
            for result in await search_images(library, query, k=3):
                print("   " + format_result(result).replace("\n", "\n   "))
        first = next(o for o in outcomes if o.image_id is not None)
        print(f"\n4. look-alikes of {Path(str(first.source.path)).name} (image #{first.image_id}):")
        for result in await find_similar(library, first.image_id, k=3):
            print("   " + format_result(result).replace("\n", "\n   "))
    print(
        f"\nDone in {time.monotonic() - started:.0f}s. The file names tell what each scene shows; "
        f"try `SHOEBOX_CLIP_MODEL={MODEL_NAME} {_program()} --data {settings.data_dir} search \"a white cross\"` "
        "yourself."
    )
    return 0


def _program() -> str:
    """How the user ran Shoebox (`.venv/bin/shoebox` after `make run`), for a command to copy."""
    ran = sys.argv[0] if sys.argv else ""
    return ran if Path(ran).name == "shoebox" else "shoebox"
