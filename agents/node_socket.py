"""What the STT and TTS providers share about a node's WebSocket: its URL, its JSON messages, and
closing a stream's tasks and queue."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from common import jsonsafe

log = logging.getLogger("agents.node_socket")

END = object()  # the last item of a stream's queue: nothing more will come


def stream_url(server_url: str) -> str:
    """The node's ``/v1/stream`` WebSocket URL from the ``server_url`` the gateway returned
    (``http(s)://host:port``; a URL that already names a stream path is kept)."""
    url = server_url.rstrip("/")
    if url.startswith("https://"):
        url = "wss://" + url[len("https://"):]
    elif url.startswith("http://"):
        url = "ws://" + url[len("http://"):]
    elif not url.startswith(("ws://", "wss://")):
        raise ValueError(f"server_url {server_url!r} is not an http(s) or ws(s) URL: pass the "
                         "server_url of the gateway's STT/TTS session")
    if not url.endswith(("/v1/stream", "/stream")):
        url += "/v1/stream"
    return url


def parse_message(text: str, node: str) -> dict[str, Any] | None:
    """A node's text message as a JSON object, or None (logged and skipped) when it is not one:
    a malformed message must not end a conversation."""
    try:
        data = jsonsafe.loads(text)
    except ValueError as exc:
        log.warning("%s node sent a message that is not JSON (%s), skipped: %.200s", node, exc,
                    text)
        return None
    if not isinstance(data, dict):
        log.warning("%s node sent a JSON message that is not an object, skipped: %.200s", node,
                    text)
        return None
    return data


async def stop_tasks(*tasks: asyncio.Task[Any] | None) -> None:
    """Cancel a stream's background tasks and wait until they are gone (their errors included)."""
    running = [t for t in tasks if t is not None]
    for task in running:
        task.cancel()
    for task in running:
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task


def end_queue(queue: asyncio.Queue[Any]) -> None:
    """Put ``END`` on a stream's queue without blocking (the oldest item goes if it is full)."""
    if queue.full():
        queue.get_nowait()
    queue.put_nowait(END)
