"""`shoebox ask`, `shoebox chat` and `shoebox caption`: the agent in a terminal.

The terminal sees the whole library (`Scope.everything()`): it runs on the machine that holds the
data. Without ANTHROPIC_API_KEY the same commands answer offline with a direct search, so they are
useful — and testable — on a machine with no key and no network.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import stat
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence, TextIO

if TYPE_CHECKING:  # the agent pulls in anthropic, numpy and faiss: not needed for `--help`
    from bot.agent import Attachment, Reply, ShownImage

EXIT_WORDS = frozenset({"exit", "quit", ":q", "/exit", "/quit"})


def add_commands(sub: Any) -> None:
    from bot.cli import positive_int

    p = sub.add_parser("ask", help="ask Claude about the library (offline without ANTHROPIC_API_KEY)")
    p.add_argument("question", nargs="+", metavar="QUESTION")
    p.add_argument(
        "--image", action="append", default=[], metavar="PATH",
        help="attach an image (e.g. to find look-alikes); may be repeated",
    )
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_ask)

    p = sub.add_parser("chat", help="a conversation with Claude about the library (exit or Ctrl-D ends it)")
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("caption", help="describe images that have no description yet with Claude")
    p.add_argument("--limit", type=positive_int, default=100, help="at most this many images (default 100)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_caption)


# ---- output -----------------------------------------------------------------------------------


def image_json(image: "ShownImage") -> dict[str, Any]:
    out: dict[str, Any] = {"id": image.id, "score": image.score, "source": image.source}
    if image.path is not None:
        out["path"] = image.path
    if image.message_url is not None:
        out["message_url"] = image.message_url
    out["description"] = image.description
    out["stored_copy"] = str(image.stored_copy)
    return out


def reply_json(reply: "Reply") -> dict[str, Any]:
    out: dict[str, Any] = {
        "answer": reply.answer,
        "images": [image_json(i) for i in reply.images],
        "offline": reply.offline,
    }
    if reply.error is not None:
        out["error"] = reply.error
    return out


def print_reply(reply: "Reply", out: TextIO) -> None:
    out.write(reply.answer.rstrip() + "\n")
    for image in reply.images:
        score = f"{image.score:.3f}" if image.score is not None else "     "
        where = image.path or image.message_url or str(image.stored_copy)
        out.write(f"  [#{image.id}] {score}  {where}\n")
        if image.description:
            text = " ".join(image.description.split())
            out.write(f"           {text[:160] + ('…' if len(text) > 160 else '')}\n")
    out.flush()


# ---- wiring -----------------------------------------------------------------------------------


def _agent_settings() -> Any:
    from bot.cli import UserError
    from bot.llm import AgentSettings
    from store.settings import SettingsError

    try:
        return AgentSettings.from_env()
    except SettingsError as error:
        raise UserError(str(error)) from None


def _attachments(paths: Sequence[str], max_bytes: int) -> "list[Attachment]":
    """The files given with --image, each read only if it is a regular file within the size
    limit: a device, a pipe or a huge file is refused before anything is read."""
    from bot.agent import Attachment
    from bot.cli import UserError
    from store.ingest import RejectedImage, read_limited

    found = []
    for raw in paths:
        path = Path(raw).expanduser()
        try:
            found.append(Attachment(read_limited(path, max_bytes), path.name))
        except RejectedImage as error:
            raise UserError(f"cannot use {raw}: {error}") from None
    return found


async def cmd_ask(args: argparse.Namespace) -> int:
    from bot.agent import Agent
    from bot.cli import load_settings, open_library, print_json
    from bot.llm import make_client
    from tools.search import Scope

    settings = _agent_settings()
    attachments = _attachments(args.image, load_settings(args).ingest.max_file_bytes)
    client = make_client(settings)
    try:
        async with open_library(args) as library:
            reply = await Agent(library, settings, client).answer(
                " ".join(args.question), Scope.everything(), attachments
            )
    finally:
        if client is not None:
            await client.close()
    if args.json:
        print_json(reply_json(reply))
    else:
        print_reply(reply, sys.stdout)
    return 1 if reply.error else 0


async def cmd_chat(args: argparse.Namespace) -> int:
    from bot.agent import Agent, Turn
    from bot.cli import open_library
    from bot.llm import make_client
    from tools.search import Scope

    settings = _agent_settings()
    client = make_client(settings)
    history: list[Turn] = []
    try:
        async with open_library(args) as library:
            agent = Agent(library, settings, client)
            mode = "" if agent.online else " (offline: no ANTHROPIC_API_KEY, answers are direct searches)"
            print(f"Ask about your photos{mode}. Type exit or press Ctrl-D to leave.", file=sys.stderr)
            lines = _PipedLines.for_stdin()
            while True:
                question = await lines.readline("you> ") if lines else _read_line("you> ")
                if question is None or question.strip().lower() in EXIT_WORDS:
                    break
                if not question.strip():
                    continue
                reply = await agent.answer(question, Scope.everything(), history=history)
                print_reply(reply, sys.stdout)
                history.append(Turn(question, reply.answer))
    finally:
        if client is not None:
            await client.close()
    return 0


def _read_line(prompt: str) -> str | None:
    """One line from the user; None at end of input. The prompt goes to stderr when not a terminal.

    While it waits at a terminal's prompt, Ctrl-C interrupts at once: asyncio's own handler would
    only cancel the chat, which cannot happen while `input()` blocks the loop, so the first Ctrl-C
    did nothing until Enter. A pipe is read by `_PipedLines` instead; what is left (a file, which
    never keeps a reader waiting) is read here.
    """
    if sys.stdin.isatty():
        previous = signal.signal(signal.SIGINT, signal.default_int_handler)
        try:
            return input(prompt)
        except EOFError:
            print(file=sys.stderr)
            return None
        finally:
            signal.signal(signal.SIGINT, previous)
    sys.stderr.write(prompt)
    sys.stderr.flush()
    line = sys.stdin.readline()
    return line.rstrip("\n") if line else None


class _PipedLines:
    """Lines from a pipe or socket on stdin, read only once the event loop says bytes are there.

    A blocking read from a pipe that stays open (a script feeding questions) would hold the loop,
    and with it asyncio's Ctrl-C handler, until the next line came; waiting in the loop instead
    lets Ctrl-C end the chat at once. The descriptor stays blocking (it is shared with whoever
    gave it), so each read is made only when the loop has seen it readable.
    """

    def __init__(self, fd: int, encoding: str) -> None:
        self._fd = fd
        self._encoding = encoding
        self._buffer = b""
        self._ended = False

    @classmethod
    def for_stdin(cls) -> "_PipedLines | None":
        """A reader for stdin when it is a pipe or socket; None otherwise (a terminal, a file,
        or a stand-in without a descriptor)."""
        try:
            fd = sys.stdin.fileno()
            mode = os.fstat(fd).st_mode
        except (AttributeError, OSError, ValueError):
            return None
        if not (stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode)):
            return None
        return cls(fd, sys.stdin.encoding or "utf-8")

    async def readline(self, prompt: str) -> str | None:
        """The next line without its newline; None at end of input. The prompt goes to stderr."""
        sys.stderr.write(prompt)
        sys.stderr.flush()
        while b"\n" not in self._buffer and not self._ended:
            await self._readable()
            chunk = os.read(self._fd, 65536)
            self._ended = not chunk
            self._buffer += chunk
        if not self._buffer:
            return None
        line, _, self._buffer = self._buffer.partition(b"\n")
        return line.removesuffix(b"\r").decode(self._encoding, errors="replace")  # a Windows line end too

    async def _readable(self) -> None:
        loop = asyncio.get_running_loop()
        ready: asyncio.Future[None] = loop.create_future()

        def wake() -> None:
            if not ready.done():
                ready.set_result(None)

        loop.add_reader(self._fd, wake)
        try:
            await ready
        finally:
            loop.remove_reader(self._fd)


async def cmd_caption(args: argparse.Namespace) -> int:
    from bot.captions import Captioner
    from bot.cli import UserError, open_library, print_json
    from bot.llm import make_client

    settings = _agent_settings()
    client = make_client(settings)
    if client is None:
        raise UserError("captions are written by Claude: set ANTHROPIC_API_KEY first")
    try:
        async with open_library(args) as library:
            captioner = Captioner(library, client, settings)
            done = await captioner.run_pending(args.limit)
            counts = await library.catalog.counts()
            left = counts["images"] - counts["described"]
    finally:
        await client.close()
    stopped = str(captioner.stopped_by) if captioner.stopped_by else None
    if args.json:
        print_json({"captioned": done, "without_description": left, "stopped_by": stopped})
    else:
        print(f"Captioned {done} image(s); {left} image(s) have no description.")
        if stopped:
            print(f"  stopped early: {stopped}")
    return 1 if stopped else 0


__all__ = ["add_commands", "print_reply", "reply_json"]
