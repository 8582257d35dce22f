"""Files that are either whole or absent: written beside their place, then renamed into it."""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import BinaryIO, Callable


def write_atomically(target: Path, fill: Callable[[BinaryIO], object]) -> None:
    """Let `fill` write into a temp file, fsync it, then rename it over `target`.

    A crash leaves the old file or the new one, never half of either; a failed `fill` leaves
    nothing. The temp file is named after this process and thread (`<name>.<pid>-<thread>.tmp`),
    so two writers of one target (two processes, or two threads) never share it, and one left
    by a killed process can be told from a live writer's.
    """
    tmp = target.with_name(f"{target.name}.{os.getpid()}-{threading.get_ident()}.tmp")
    try:
        with tmp.open("wb") as handle:
            fill(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
