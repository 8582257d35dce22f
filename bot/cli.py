"""`shoebox`: the command line. Index folders, search, find look-alikes, manage the library.

Heavy imports (torch, open_clip, faiss) happen inside the commands, so `shoebox --help` is instant.
Exit codes: 0 success, 1 a problem the user can fix (message on stderr), 2 bad usage.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sqlite3
import sys
import time
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, AsyncIterator, Awaitable, Callable, Sequence

log = logging.getLogger("shoebox")


class UserError(Exception):
    """A problem the user can fix; printed as one message, exit code 1."""


def positive_int(text: str) -> int:
    """An argparse type: a whole number, at least 1 (a count of things to do)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def result_count(text: str) -> int:
    """An argparse type: how many results a search shows, 1 to the tools' own limit."""
    from tools.search import MAX_K

    count = positive_int(text)
    if count > MAX_K:
        raise argparse.ArgumentTypeError(f"at most {MAX_K}, not {count}")
    return count


def date_text(text: str) -> str:
    """An argparse type: a date (or ISO time) the search filters accept, kept as written."""
    from tools.search import ToolError, parse_date

    try:
        parse_date(text, "the date")
    except ToolError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return text


# ---- output helpers ---------------------------------------------------------------------------


def print_json(value: Any) -> None:
    json.dump(value, sys.stdout, ensure_ascii=False, indent=2)
    sys.stdout.write("\n")


class ProgressBar:
    """A one-line progress bar on stderr when it is a terminal; silent otherwise (logs, pipes)."""

    def __init__(self, label: str, enabled: bool | None = None) -> None:
        self.label = label
        self.enabled = sys.stderr.isatty() if enabled is None else enabled
        self.started = time.monotonic()
        self._last = 0.0

    def __call__(self, done: int, total: int) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if done < total and now - self._last < 0.1:
            return
        self._last = now
        width = 30
        filled = int(width * done / total) if total else width
        rate = done / max(now - self.started, 1e-6)
        sys.stderr.write(
            f"\r{self.label} [{'#' * filled}{'.' * (width - filled)}] {done}/{total} {rate:5.1f}/s"
        )
        if done >= total:
            sys.stderr.write("\n")
        sys.stderr.flush()


def format_result(result: dict[str, Any]) -> str:
    where = result.get("path") or result.get("message_url") or ""
    score = f"{result['score']:.3f}" if "score" in result else "     "
    line = f"#{result['id']:<6} {score}  {where}"
    if result.get("description"):
        line += f"\n         {result['description']}"
    if result.get("posted_text"):  # a message's words, or a file's imported description
        line += f"\n         text: {result['posted_text']}"
    return line


def print_results(results: list[dict[str, Any]], as_json: bool) -> None:
    if as_json:
        print_json(results)
    elif not results:
        print("No matching images.")
    else:
        for result in results:
            print(format_result(result))


# ---- wiring -----------------------------------------------------------------------------------


def configure_logging(verbose: int) -> None:
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def load_settings(args: argparse.Namespace) -> Any:
    from store.settings import Settings, SettingsError

    try:
        return Settings.from_env(args.data)
    except SettingsError as error:
        raise UserError(str(error)) from None


def load_model(clip_settings: Any) -> Any:
    from store.embedder import ModelUnavailable, load_embedder

    try:
        return load_embedder(clip_settings)
    except ModelUnavailable as error:
        raise UserError(str(error)) from None


@asynccontextmanager
async def open_library(
    args: argparse.Namespace, embedder: Any = None, *, allow_other_model: bool = False
) -> AsyncIterator[Any]:
    """The library the command line points at, with the configured model unless `embedder` is
    given; a library that cannot be opened becomes a one-line error."""
    settings = load_settings(args)
    if embedder is None:
        embedder = load_model(settings.clip)
    async with library_at(settings, embedder, allow_other_model=allow_other_model) as library:
        yield library


@asynccontextmanager
async def library_at(
    settings: Any, embedder: Any, *, allow_other_model: bool = False, advice: str = ""
) -> AsyncIterator[Any]:
    """The library in `settings`' folder, closed afterwards; one that cannot be opened (another
    model's, or a damaged database) becomes a one-line error, `advice` appended."""
    from store.db import DatabaseUnavailable
    from store.library import Library, ModelMismatch

    try:
        library = await Library.open(settings, embedder, allow_other_model=allow_other_model)
    except (ModelMismatch, DatabaseUnavailable) as error:
        raise UserError(f"{error}{advice}") from None
    try:
        yield library
    finally:
        await library.close()


# ---- commands ---------------------------------------------------------------------------------


MAX_FAILURES_LISTED = 50  # lines of failures `index` prints; --json lists every one


def _exists(path: Path) -> bool:
    """Whether `path` exists, where a folder on the way that may not be entered counts as yes:
    the file is then reported as unreadable, which is what is wrong with it."""
    try:
        return path.exists()
    except PermissionError:
        return True


async def cmd_index(args: argparse.Namespace) -> int:
    from store.library import expand_paths, path_check

    missing = [p for p in args.paths if not _exists(Path(p))]
    if missing:
        raise UserError(f"no such file or folder: {', '.join(map(str, missing))}")
    async with open_library(args) as library:
        unreadable: list[tuple[Path, str]] = []
        files = expand_paths((Path(p) for p in args.paths), unreadable)
        from store.library import IncomingImage, file_source

        items = [IncomingImage(file_source(path)) for path in files]
        started = time.monotonic()
        outcomes = await library.index(items, ProgressBar("Indexing", None if not args.json else False))
        gone = [
            source
            for folder in args.paths
            if path_check(Path(folder).is_dir, failing=False)  # a folder: its gone files go too
            for source in await library.forget_missing_files(Path(folder))
        ]
        elapsed = time.monotonic() - started
        from bot.captions import caption_after_index  # does nothing unless SHOEBOX_CAPTIONS=on

        captions = await caption_after_index(library, sum(o.status == "indexed" for o in outcomes))
    summary = {
        "indexed": sum(o.status == "indexed" for o in outcomes),
        "duplicates": sum(o.status == "duplicate" for o in outcomes),
        "unchanged": sum(o.status == "unchanged" for o in outcomes),
        "forgotten": [source.path for source in gone],
        "failed": [{"path": str(folder), "error": reason} for folder, reason in unreadable]
        + [{"path": o.source.path, "error": o.reason} for o in outcomes if o.status == "failed"],
        "seconds": round(elapsed, 2),
    }
    if captions is not None:
        summary["captioned"], summary["captions_note"] = captions
    if args.json:
        print_json(summary)
    else:
        print(
            f"Indexed {summary['indexed']} new image(s), {summary['duplicates']} duplicate(s), "
            f"{summary['unchanged']} already indexed, {len(summary['failed'])} failed "
            f"({elapsed:.1f}s)."
        )
        if gone:
            print(f"Forgot {len(gone)} file(s) no longer in {'those folders' if len(args.paths) > 1 else 'that folder'}.")
        for failure in summary["failed"][:MAX_FAILURES_LISTED]:
            print(f"  failed: {failure['path']}: {failure['error']}")
        if len(summary["failed"]) > MAX_FAILURES_LISTED:
            print(f"  ... and {len(summary['failed']) - MAX_FAILURES_LISTED} more (all of them with --json)")
        if captions is not None:
            print(f"Captioned {captions[0]} image(s) with Claude." + (f" {captions[1]}" if captions[1] else ""))
    return 0


def _filters(args: argparse.Namespace) -> Any:
    from tools.search import Filters

    return Filters(
        author=args.author, channel=args.channel, after=args.after, before=args.before, sort=args.sort
    )


async def _run_tool(call: Callable[[], Awaitable[Any]]) -> Any:
    from tools.search import ToolError

    try:
        return await call()
    except ToolError as error:
        raise UserError(str(error)) from None


async def cmd_search(args: argparse.Namespace) -> int:
    from tools.search import search_images

    async with open_library(args) as library:
        results = await _run_tool(
            lambda: search_images(library, " ".join(args.text), k=args.k, filters=_filters(args))
        )
    print_results(results, args.json)
    return 0


async def cmd_similar(args: argparse.Namespace) -> int:
    from tools.search import find_similar

    target: Path | int
    if args.image.isdigit() and not Path(args.image).exists():
        target = int(args.image)
        no_such_id_unless_in_range(target)
    else:
        target = Path(args.image)
        if not target.is_file():
            raise UserError(f"{args.image} is neither an image file nor an image id")
    async with open_library(args) as library:
        results = await _run_tool(
            lambda: find_similar(library, target, k=args.k, filters=_filters(args))
        )
    print_results(results, args.json)
    return 0


def no_such_id_unless_in_range(image_id: int) -> None:
    """Ids past what SQLite stores cannot name an image: say so, as for any unknown id, before
    SQLite refuses to even look them up."""
    from tools.registry import MAX_IMAGE_ID

    if not 1 <= image_id <= MAX_IMAGE_ID:
        raise UserError(f"there is no image with id {image_id}")


async def cmd_describe(args: argparse.Namespace) -> int:
    from tools.search import get_description

    no_such_id_unless_in_range(args.id)
    async with open_library(args) as library:
        info = await _run_tool(lambda: get_description(library, args.id))
    if args.json:
        print_json(info)
    else:
        print(format_result(info))
        print(f"  size: {info['width']}x{info['height']}  stored copy: {info['stored_copy']}")
        print(f"  description: {info['description'] or '(none yet)'}")
        for post in info["posts"]:
            print(f"  seen at: {post.get('path') or post.get('message_url')}")
            if post.get("posted_text"):
                print(f"    text: {post['posted_text']}")
    return 0


async def cmd_forget(args: argparse.Namespace) -> int:
    no_such_id_unless_in_range(args.id)
    async with open_library(args) as library:
        removed = await library.forget_image(args.id)
    if not removed:
        raise UserError(f"there is no image with id {args.id}")
    if args.json:
        print_json({"forgotten": args.id})
    else:
        print(f"Forgot image {args.id}: it no longer appears in search.")
    return 0


async def cmd_stats(args: argparse.Namespace) -> int:
    async with open_library(args) as library:
        stats = await library.stats()
        failures = await library.catalog.recent_failures(5)
    stats["recent_failures"] = [{"source": s, "reason": r, "at": a} for s, r, a in failures]
    if args.json:
        print_json(stats)
    else:
        print(f"{stats['images']} image(s) from {stats['sources']} source(s), "
              f"{stats['described']} with a description")
        print(f"model: {stats['model']} ({stats['dim']}-d)   data: {stats['data_dir']}")
        for failure in stats["recent_failures"]:
            print(f"  recent failure: {failure['source']}: {failure['reason']}")
    return 0


async def cmd_verify(args: argparse.Namespace) -> int:
    async with open_library(args) as library:
        report = await library.verify(repair=not args.check_only)
    if args.json:
        print_json(report.as_dict())
    else:
        for line in report.repaired:
            print(f"repaired: {line}")
        for line in report.problems:
            print(f"problem: {line}")
        if report.ok:
            print("Library is consistent.")
    return 0 if report.ok else 1


async def cmd_reindex(args: argparse.Namespace) -> int:
    from dataclasses import replace

    settings = load_settings(args)
    clip = settings.clip
    if args.model:
        clip = replace(clip, model=args.model, pretrained=args.pretrained, checkpoint=None)
    elif args.pretrained:
        clip = replace(clip, pretrained=args.pretrained, checkpoint=None)
    new_embedder = load_model(clip)
    from store.library import ReindexIncomplete

    async with open_library(args, new_embedder, allow_other_model=True) as library:
        try:
            total = await library.reindex(new_embedder, ProgressBar("Re-embedding"))
        except ReindexIncomplete as error:
            raise UserError(str(error)) from None
    message = f"Re-embedded {total} image(s) with {new_embedder.model_id}."
    if args.model or args.pretrained:
        message += " Set SHOEBOX_CLIP_MODEL/SHOEBOX_CLIP_PRETRAINED to match before the next run."
    if args.json:
        print_json({"reindexed": total, "model": new_embedder.model_id})
    else:
        print(message)
    return 0


def _description_entry(line: str) -> tuple[str, str] | None:
    """(path, description) from one JSONL line, or None unless both are non-empty strings: a
    number or a list is a mistake to point out, and an empty description would count an image
    as described when nothing was said about it."""
    try:
        entry = json.loads(line)
    except ValueError:
        return None
    if not isinstance(entry, dict):
        return None
    path, text = entry.get("path"), entry.get("description")
    if not isinstance(path, str) or not isinstance(text, str) or not path.strip() or not text.strip():
        return None
    return path, text.strip()


async def cmd_import_descriptions(args: argparse.Namespace) -> int:
    path = Path(args.file)
    if not path.is_file():
        raise UserError(f"no such file: {path}")
    updated, unknown, bad = 0, [], []
    async with open_library(args) as library:
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            entry = _description_entry(line)
            if entry is None:
                bad.append(number)
                continue
            image_path, text = entry
            candidate = Path(image_path)
            if not candidate.is_absolute() and not candidate.exists():
                candidate = path.parent / candidate
            if await library.set_file_text(candidate, text):
                updated += 1
            else:
                unknown.append(image_path)
    summary = {"updated": updated, "unknown_paths": unknown, "bad_lines": bad}
    if args.json:
        print_json(summary)
    else:
        print(f"Imported {updated} description(s).")
        if unknown:
            print(f"  {len(unknown)} path(s) are not indexed (index them first): {', '.join(unknown[:5])}")
        if bad:
            print(f"  skipped malformed line(s): {', '.join(map(str, bad[:10]))}")
    return 0


# ---- parser -----------------------------------------------------------------------------------


def _add_filters(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--k", type=result_count, default=5, help="how many results (1-25, default 5)")
    parser.add_argument("--author", help="only images posted by this user (name or id)")
    parser.add_argument("--channel", help="only images from this channel (name or id)")
    parser.add_argument("--after", type=date_text, help="only images from this date on (YYYY-MM-DD)")
    parser.add_argument("--before", type=date_text, help="only images up to this date (YYYY-MM-DD, inclusive)")
    parser.add_argument(
        "--sort", choices=("relevance", "newest", "oldest"), default="relevance",
        help="order of the results (default: relevance)",
    )
    parser.add_argument("--json", action="store_true", help="print JSON")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="shoebox",
        description="Remembers every photo and finds it again by what is in it.",
        epilog="Settings come from the environment or a .env file; see .env.example.",
    )
    parser.add_argument(
        "--data", metavar="DIR", default=None,
        help="data folder (default: $SHOEBOX_DATA or ./shoebox-data)",
    )
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv: debug)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    p = sub.add_parser("index", help="index image files and folders (recursively; files gone from a folder are forgotten)")
    p.add_argument("paths", nargs="+", metavar="PATH")
    p.add_argument("--json", action="store_true", help="print a JSON summary")
    p.set_defaults(func=cmd_index)

    p = sub.add_parser("search", help="find images by a text description")
    p.add_argument("text", nargs="+", metavar="TEXT")
    _add_filters(p)
    p.set_defaults(func=cmd_search)

    p = sub.add_parser("similar", help="find images that look like an image file or an indexed id")
    p.add_argument("image", metavar="IMAGE_PATH|ID")
    _add_filters(p)
    p.set_defaults(func=cmd_similar)

    p = sub.add_parser("describe", help="show what is stored about one image")
    p.add_argument("id", type=int)
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_describe)

    p = sub.add_parser("forget", help="remove an image from the library")
    p.add_argument("id", type=int)
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_forget)

    p = sub.add_parser("stats", help="how many images, which model, recent failures")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_stats)

    p = sub.add_parser("verify", help="check (and repair) that the catalog and the index agree")
    p.add_argument("--check-only", action="store_true", help="report problems without repairing")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser("reindex", help="re-embed every image (e.g. with another CLIP model)")
    p.add_argument("--model", help="open_clip model name (default: the configured one)")
    p.add_argument("--pretrained", help="open_clip pretrained tag for --model")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_reindex)

    p = sub.add_parser(
        "import-descriptions", help='import descriptions of indexed files, JSON lines {"path": ..., "description": ...}'
    )
    p.add_argument("file", metavar="FILE.jsonl")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_import_descriptions)

    for extra in _EXTRA_COMMANDS:
        extra(sub)
    return parser


# Front ends that live in their own modules add their sub-commands here.
_EXTRA_COMMANDS: list[Callable[[Any], None]] = []


def _add_bot_command(sub: Any) -> None:
    parser = sub.add_parser("bot", help="run the Discord bot (needs DISCORD_TOKEN)")
    parser.set_defaults(func=_cmd_bot)


async def _cmd_bot(args: argparse.Namespace) -> int:
    from bot.discord_app import cmd_bot  # discord.py loads only when the bot runs

    return await cmd_bot(args)


def _register_extras() -> None:
    from bot import demo

    _EXTRA_COMMANDS.append(demo.add_command)
    _EXTRA_COMMANDS.append(_add_bot_command)
    try:
        from bot import terminal
    except ImportError:
        return
    _EXTRA_COMMANDS.append(terminal.add_commands)


def unreadable_catalog(args: argparse.Namespace, error: sqlite3.DatabaseError) -> str | None:
    """One line for a catalog that failed while in use, busy for too long or damaged inside;
    None for any other error, and under `shoebox bot`, which has a database of its own too."""
    from store.library import DB_FILE
    from store.settings import Settings, SettingsError

    locked = isinstance(error, sqlite3.OperationalError) and "locked" in str(error)
    if getattr(args, "command", None) == "bot" or not (locked or type(error) is sqlite3.DatabaseError):
        return None
    try:
        path: Path | str = Settings.from_env(args.data).data_dir / DB_FILE
    except SettingsError:
        path = DB_FILE
    if locked:
        return f"{path} stayed locked by another Shoebox process for too long; try again when it has finished."
    return (
        f"{path} cannot be read ({error}). If it was damaged, restore it from a backup; moving it "
        "aside makes Shoebox start a new, empty one."
    )


def main(argv: Sequence[str] | None = None) -> int:
    from store.settings import load_dotenv

    load_dotenv()
    if not _EXTRA_COMMANDS:
        _register_extras()
    parser = build_parser()
    args = parser.parse_args(argv)
    configure_logging(args.verbose)
    try:
        code = asyncio.run(args.func(args))
        sys.stdout.flush()  # a reader that went away is noticed here, not in a traceback at exit
        return code
    except UserError as error:
        print(f"shoebox: {error}", file=sys.stderr)
        return 1
    except sqlite3.DatabaseError as error:
        # Damage inside a catalog whose header is intact shows only when a page is read. Other
        # SQLite errors are bugs, and the bot's own file is not the catalog: those go on up.
        line = unreadable_catalog(args, error)
        if line is None:
            raise
        print(f"shoebox: {line}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("shoebox: interrupted; everything committed so far is kept.", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader went away (`shoebox search ... --json | head`): nothing more to say to it.
        # What is still buffered for stdout would fail again at exit, so stdout goes nowhere.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141


if __name__ == "__main__":
    sys.exit(main())


__all__ = ["main", "build_parser", "UserError"]
