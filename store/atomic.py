"""Files that are either whole or absent: written beside their place, then renamed into it."""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import BinaryIO, Callable, Iterable

TEMP_SUFFIX = ".tmp"


def write_atomically(target: Path, fill: Callable[[BinaryIO], object]) -> None:
    """Let `fill` write into a temp file, fsync it, then rename it over `target`.

    A crash leaves the old file or the new one, never half of either; a failed `fill` leaves
    nothing. The temp file is named after this process and thread (`<name>.<pid>-<thread>.tmp`),
    so two writers of one target (two processes, or two threads) never share it, and one left
    by a killed process can be told from a live writer's.
    """
    tmp = target.with_name(f"{target.name}.{os.getpid()}-{threading.get_ident()}{TEMP_SUFFIX}")
    try:
        with tmp.open("wb") as handle:
            fill(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def sweep_abandoned_temp_files(directory: Path, names: Iterable[str]) -> int:
    """Delete the temp files `write_atomically` left for these names in `directory` whose writer
    is gone; returns how many. A live writer's may be a write in progress: kept. One under this
    process's own id is live only if its thread is (a container's process is PID 1 after every
    restart)."""
    removed = 0
    for name in names:
        for tmp in directory.glob(f"{name}.*{TEMP_SUFFIX}"):
            owner, _, thread = tmp.name[len(name) + 1 : -len(TEMP_SUFFIX)].partition("-")
            if owner.isdigit() and _writer_alive(int(owner), thread):
                continue
            tmp.unlink(missing_ok=True)
            removed += 1
    return removed


def _writer_alive(pid: int, thread: str) -> bool:
    if pid == os.getpid():
        return thread.isdigit() and int(thread) in {t.ident for t in threading.enumerate()}
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # someone else's process: alive
        return True
    return True
