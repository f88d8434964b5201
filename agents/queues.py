"""The queues a stream's readers take from: items in order, then ``END`` for every reader.

The STT events, the TTS audio and the room's events each end this way, so a reader that comes
after the end (a second ``async for``, a task started late) ends at once instead of waiting.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

END = object()  # the last item of a stream's queue: nothing more will come


def end_queue(queue: asyncio.Queue[Any]) -> None:
    """Put ``END`` on a stream's queue without blocking (the oldest item goes if it is full)."""
    if queue.full():
        queue.get_nowait()
    queue.put_nowait(END)


async def until_end(queue: asyncio.Queue[Any]) -> AsyncIterator[Any]:
    """The queue's items until ``END``, which stays on the queue for the next reader."""
    while True:
        item = await queue.get()
        if item is END:
            queue.put_nowait(END)
            return
        yield item


def drop_until_end(queue: asyncio.Queue[Any]) -> None:
    """Drop what is queued now, but not ``END``: a reader after this still ends."""
    while not queue.empty():
        if queue.get_nowait() is END:
            queue.put_nowait(END)
            return
