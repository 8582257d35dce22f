"""Background tasks the bot owns and must stop cleanly on shutdown."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any


async def cancel_and_wait(task: "asyncio.Task[Any] | None") -> None:
    """Cancel a task and wait until it has really finished, so nothing it owns (a database, a
    client) is closed under it; a task that already ended is left as it is."""
    if task is None:
        return
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
