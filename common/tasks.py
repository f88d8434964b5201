"""Background tasks at shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
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


def repeat(
    seconds: float, job: Callable[[], Awaitable[object]], name: str, log: logging.Logger
) -> asyncio.Task[None]:
    """A task running ``job`` every ``seconds`` until it is stopped (``stop_tasks``). A run that
    fails is logged and the next one comes on time: a refresh outlives a blip of what it reads."""

    async def loop() -> None:
        while True:
            await asyncio.sleep(seconds)
            try:
                await job()
            except Exception as exc:  # noqa: BLE001 - logged; the loop goes on
                log.warning("%s failed: %s", name, exc)

    return asyncio.create_task(loop(), name=name)
