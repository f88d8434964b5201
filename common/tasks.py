"""Background tasks at shutdown."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any


async def stop_tasks(*tasks: asyncio.Task[Any] | None) -> None:
    """Cancel background tasks and wait until they are gone. Their errors are dropped: a loop
    reports its own failures while it runs, and a shutdown must not stop halfway for one."""
    running = [t for t in tasks if t is not None]
    for task in running:
        task.cancel()
    for task in running:
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
