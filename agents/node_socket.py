"""What the STT and TTS providers share about a node's WebSocket: its URL, its JSON messages, the
provider's part (``NodeProvider``: the node, the session key, and ``Reconnect``: how a stream
keeps its socket) and a stream's life (``NodeStream``: connect, a reader and a keepalive task,
reconnect with the same session key after a drop, close)."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any

import aiohttp

from agents.queues import end_queue
from common import jsonsafe
from common.tasks import stop_tasks

log = logging.getLogger("agents.node_socket")


def stream_url(server_url: str) -> str:
    """The node's ``/v1/stream`` WebSocket URL from the ``server_url`` the gateway returned
    (``http(s)://host:port``; a URL that already names a stream path is kept)."""
    url = server_url.rstrip("/")
    if url.startswith("https://"):
        url = "wss://" + url[len("https://") :]
    elif url.startswith("http://"):
        url = "ws://" + url[len("http://") :]
    elif not url.startswith(("ws://", "wss://")):
        raise ValueError(
            f"server_url {server_url!r} is not an http(s) or ws(s) URL: pass the "
            "server_url of the gateway's STT/TTS session"
        )
    if not url.endswith(("/v1/stream", "/stream")):
        url += "/v1/stream"
    return url


def parse_message(text: str, node: str) -> dict[str, Any] | None:
    """A node's text message as a JSON object, or None (logged and skipped) when it is not one:
    a malformed message must not end a conversation."""
    try:
        data = jsonsafe.loads(text)
    except ValueError as exc:
        log.warning(
            "%s node sent a message that is not JSON (%s), skipped: %.200s", node, exc, text
        )
        return None
    if not isinstance(data, dict):
        log.warning(
            "%s node sent a JSON message that is not an object, skipped: %.200s", node, text
        )
        return None
    return data


@dataclass(frozen=True)
class Reconnect:
    """How a stream keeps its socket to a node: after a drop it reconnects with the same session
    key up to ``tries`` times, waiting ``backoff_seconds`` before the first try and twice as long
    before each next one (at most 5 s); it pings every ``ping_interval`` seconds so that a dead
    socket is noticed."""

    tries: int = 4
    backoff_seconds: float = 0.5
    ping_interval: float = 15.0

    def __post_init__(self) -> None:
        if self.tries < 0 or self.backoff_seconds < 0 or self.ping_interval <= 0:
            raise ValueError(
                f"{self!r}: tries and backoff_seconds must be 0 or more, ping_interval above 0"
            )


class NodeProvider:
    """A provider of streams to one node: where the node is, the session key that new streams
    and reconnects present, and how a stream keeps its socket. The STT and TTS providers add
    what their streams ask the node for."""

    def __init__(self, server_url: str, session_key: str, reconnect: Reconnect) -> None:
        self.url = stream_url(server_url)
        self.session_key = session_key
        self.reconnect = reconnect

    async def extend(self, session_key: str) -> None:
        """The key new streams (and reconnects of this provider's streams) use from now on."""
        self.session_key = session_key


class NodeStream:
    """One stream's socket to a node. Subclasses say how to connect (``_connect``: the config
    and the node's ``ready``), how to read (``_read_socket``: until the socket ends; True when
    the node ended the session for good), which refusals end the stream (``_fatal``) and what to
    do once reconnected or given up (``_reconnected``, ``_unreachable``, ``_finished``)."""

    kind = "node"  # "STT" or "TTS", in logs and task names
    connect_error: type[Exception] = Exception  # what ``_connect`` raises when refused

    def __init__(self, owner: NodeProvider, queue_size: int) -> None:
        self.owner = owner
        # what the stream's reader takes (events, audio), ending with END (``_end``)
        self._output: asyncio.Queue[Any] = asyncio.Queue(queue_size)
        self._ended = False
        self.session_key = owner.session_key
        self.session_id: str | None = None
        self.reconnects = 0
        self._http = aiohttp.ClientSession()
        self._ws: aiohttp.ClientWebSocketResponse | None = None
        self._send_lock = asyncio.Lock()
        self._closing = False
        self._reader: asyncio.Task[None] | None = None
        self._pinger: asyncio.Task[None] | None = None
        self.log = logging.getLogger(f"agents.{self.kind.lower()}")  # the provider's logger

    # ------------------------------------------------------------ for subclasses

    async def _connect(self) -> aiohttp.ClientWebSocketResponse:
        raise NotImplementedError

    async def _read_socket(self) -> bool:
        raise NotImplementedError

    async def _fatal(self, exc: Exception) -> bool:
        """True when a failed reconnect must not be tried again (the key itself is refused)."""
        return False

    async def _reconnected(self) -> None:
        """Send what waited for the new socket."""

    async def _unreachable(self) -> None:
        """Every reconnect failed: tell the consumer."""

    def _finished(self) -> None:
        """The stream ended (not by ``aclose``): nothing more will come."""

    # ------------------------------------------------------------ life

    def _end(self) -> None:
        """Tell the reader there is nothing more (never blocks: drops the oldest if full)."""
        if self._ended:
            return
        self._ended = True
        end_queue(self._output)

    async def start(self) -> None:
        try:
            self._ws = await self._connect()
        except BaseException:
            await self._http.close()
            raise
        name = self.kind.lower()
        self._reader = asyncio.create_task(self._read_loop(), name=f"{name}-reader")
        self._pinger = asyncio.create_task(self._ping_loop(), name=f"{name}-ping")

    async def _close_socket(self) -> None:
        """Stop the tasks and close the socket (``aclose`` of a subclass starts here)."""
        self._closing = True
        await stop_tasks(self._pinger, self._reader)
        if self._ws is not None:
            await self._ws.close()
        await self._http.close()

    async def _send(self, message: dict[str, Any]) -> bool:
        """Send a JSON message; False when there is no open socket (a reconnect resends)."""
        ws = self._ws
        if ws is None or ws.closed:
            return False
        try:
            async with self._send_lock:
                await ws.send_json(message)
            return True
        except (ConnectionError, RuntimeError):
            return False

    async def _ping_loop(self) -> None:
        while True:
            await asyncio.sleep(self.owner.reconnect.ping_interval)
            await self._send({"type": "ping"})

    async def _read_loop(self) -> None:
        try:
            while True:
                fatal = await self._read_socket()
                if fatal or self._closing or not await self._reconnect():
                    break
        except asyncio.CancelledError:
            raise
        except Exception:  # a bug here must not leave the consumer waiting forever
            self.log.exception("%s stream reader failed; ending the stream", self.kind)
            await self._unreachable()
        finally:
            if not self._closing:
                self._finished()

    async def _reconnect(self) -> bool:
        tries, backoff = self.owner.reconnect.tries, self.owner.reconnect.backoff_seconds
        for attempt in range(1, tries + 1):
            self.log.warning(
                "%s socket to %s dropped; reconnecting with the same session key "
                "(try %d of %d, in %.1f s)",
                self.kind,
                self.owner.url,
                attempt,
                tries,
                backoff,
            )
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 5.0)
            try:
                self._ws = await self._connect()
            except self.connect_error as exc:
                if await self._fatal(exc):
                    self.log.warning("%s reconnect refused (%s); giving up", self.kind, exc)
                    return False
                self.log.warning("%s reconnect try %d failed: %s", self.kind, attempt, exc)
                continue
            self.reconnects += 1
            self.log.info(
                "%s stream reconnected to %s (session %s)",
                self.kind,
                self.owner.url,
                self.session_id,
            )
            await self._reconnected()
            return True
        self.log.error(
            "%s node %s unreachable after %d tries; ending the stream",
            self.kind,
            self.owner.url,
            tries,
        )
        await self._unreachable()
        return False
