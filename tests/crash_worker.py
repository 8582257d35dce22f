"""A fork server that runs the `shoebox` command line in child processes a test can SIGKILL.

    python tests/crash_worker.py        (started by tests/test_crash_safety.py, spoken to on stdin)

Why a fork server: importing torch and open_clip costs several seconds per process on a small
machine, and a crash test needs dozens of processes. This server imports everything once and
then forks one child per run; the child starts at `bot.cli.main(argv)` exactly as
`python -m bot.cli ARGS` would, holds its own SQLite connections, files and threads, and dies
for real when it is sent SIGKILL. The server itself never runs a model (so no OpenMP or
intra-op thread pool exists when it forks, which is what makes forking torch safe).

Each child writes a marker file the moment its CLIP model has finished loading (the CLI's own
`load_model`, wrapped), so the test can aim its kills at the part of the run that writes the
library rather than at the model load.

A run may also name a crash point, for the windows too narrow to hit with a timer: the child
then SIGKILLs itself right before or right after the N-th call of one function, e.g.
{"module": "store.thumbs", "attribute": "ThumbStore.write_with", "call": 5, "when": "after"}.

Protocol, one JSON object per line each way:

    {"op": "run", "argv": [...], "env": {...}, "marker": PATH, "log": PATH, "crash": {...}?}
                                             ->  {"pid": N}
    {"op": "poll", "pid": N}                 ->  {"pid": N, "running": bool, "exit": .., "signal": ..}
    {"op": "wait", "pid": N, "timeout": S}   ->  the same, after the child ended or S seconds passed
    {"op": "quit"}                           ->  (children still running are killed and reaped)

End of input counts as "quit", so a test that dies never leaves children behind.
"""

from __future__ import annotations

import importlib
import inspect
import json
import os
import signal
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any, Callable

# Import the checkout this file belongs to, not whatever copy of Shoebox is installed.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# Everything a child needs, imported once here. Importing starts no thread pools.
import aiosqlite  # noqa: E402,F401
import faiss  # noqa: E402,F401
import numpy  # noqa: E402,F401
import open_clip  # noqa: E402,F401
import torch  # noqa: E402,F401

import bot.captions  # noqa: E402,F401  (imported by `index` after indexing; preloaded to keep runs short)
import bot.cli  # noqa: E402
import store.embedder  # noqa: E402,F401
import store.library  # noqa: E402,F401

READY = {"ready": True}


def _reply(message: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(message) + "\n")
    sys.stdout.flush()


def _status(pid: int, raw: int | None) -> dict[str, Any]:
    """The child's state as JSON: still running, or how it ended (exit code or signal)."""
    if raw is None:
        return {"pid": pid, "running": True, "exit": None, "signal": None}
    if os.WIFSIGNALED(raw):
        return {"pid": pid, "running": False, "exit": None, "signal": os.WTERMSIG(raw)}
    return {"pid": pid, "running": False, "exit": os.WEXITSTATUS(raw), "signal": None}


def _arm_crash(point: dict[str, Any]) -> None:
    """Replace `module.attribute` with a wrapper that SIGKILLs this process at the chosen call."""
    owner: Any = importlib.import_module(str(point["module"]))
    *path, name = str(point["attribute"]).split(".")
    for part in path:
        owner = getattr(owner, part)
    real: Callable[..., Any] = getattr(owner, name)
    wanted, when = int(point["call"]), str(point["when"])
    assert when in ("before", "after"), when
    calls = 0
    counting = threading.Lock()

    def crash_here(*args: Any, **kwargs: Any) -> Any:
        # Calls may come from several threads at once (stored copies are written two at a
        # time): each call takes its number under a lock and checks its own number afterwards.
        nonlocal calls
        with counting:
            calls += 1
            number = calls
        if number == wanted and when == "before":
            os.kill(os.getpid(), signal.SIGKILL)
        result = real(*args, **kwargs)
        if number == wanted and when == "after":
            os.kill(os.getpid(), signal.SIGKILL)
        return result

    # A staticmethod looked up on its class is a plain function: wrap it back so no `self` is bound.
    static = isinstance(inspect.getattr_static(owner, name), staticmethod)
    setattr(owner, name, staticmethod(crash_here) if static else crash_here)


def _child(argv: list[str], env: dict[str, str], marker: Path, log: Path, crash: dict[str, Any] | None) -> None:
    """Runs in the forked child: become `shoebox ARGV` with its output in `log`; never returns."""
    code = 1
    try:
        out = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(out, 1)
        os.dup2(out, 2)
        os.close(out)
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, 0)
        os.close(devnull)
        os.environ.update(env)
        real_load_model = bot.cli.load_model

        def load_model_then_mark(clip_settings: Any) -> Any:
            embedder = real_load_model(clip_settings)
            pending = marker.with_name(marker.name + ".part")
            pending.write_text(f"{time.monotonic()}\n")
            os.replace(pending, marker)
            return embedder

        bot.cli.load_model = load_model_then_mark
        if crash:
            _arm_crash(crash)
        code = bot.cli.main(argv)
    except SystemExit as stop:
        code = stop.code if isinstance(stop.code, int) else 1
    except BaseException:  # report anything else like an uncaught error would, then exit 1
        traceback.print_exc()
        code = 1
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


def _wait(pid: int, timeout: float) -> int | None:
    """waitpid with a deadline; None if the child is still running when it passes."""
    deadline = time.monotonic() + max(0.0, timeout)
    while True:
        done, raw = os.waitpid(pid, os.WNOHANG)
        if done:
            return raw
        if time.monotonic() >= deadline:
            return None
        time.sleep(0.005)


def serve() -> int:
    children: dict[int, int | None] = {}  # pid -> raw status once reaped
    _reply(READY)
    try:
        for line in sys.stdin:
            if not line.strip():
                continue
            request = json.loads(line)
            op = request.get("op")
            if op == "quit":
                break
            if op == "run":
                sys.stdout.flush()
                sys.stderr.flush()
                pid = os.fork()
                if pid == 0:
                    _child(
                        [str(a) for a in request["argv"]],
                        {str(k): str(v) for k, v in request.get("env", {}).items()},
                        Path(request["marker"]),
                        Path(request["log"]),
                        request.get("crash"),
                    )
                children[pid] = None
                _reply({"pid": pid})
            elif op in ("poll", "wait"):
                pid = int(request["pid"])
                if pid not in children:
                    _reply({"error": f"unknown child {pid}"})
                    continue
                if children[pid] is None:
                    children[pid] = _wait(pid, float(request.get("timeout", 0)) if op == "wait" else 0.0)
                _reply(_status(pid, children[pid]))
            else:
                _reply({"error": f"unknown op {op!r}"})
    finally:
        for pid, raw in children.items():
            if raw is None:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                _wait(pid, 10.0)
    return 0


if __name__ == "__main__":
    sys.exit(serve())
