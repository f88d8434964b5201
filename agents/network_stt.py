"""``NetworkSTT``: speech to text on one of the network's STT nodes, over its WebSocket protocol.

The node's protocol (``node/stt/README.md``): a ``config`` with the session key, ``ready``, then
16 kHz PCM16 binary frames in; ``vad_event``, ``transcription``, ``session_expiring`` and
``error`` out. A dropped socket is not the end of a session: the node's clock pauses while no
socket is connected and the same ``session_key`` resumes it, so the stream reconnects (a few tries,
with backoff) and carries on. Refusals that a retry cannot fix (a bad or foreign key, an expired
session, a draining node) end the stream with an ``error`` event instead.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import AsyncIterator
from typing import Any

import aiohttp

from agents.node_socket import NodeProvider, NodeStream, Reconnect, parse_message
from agents.plugins import SpeechEvent
from agents.queues import until_end

log = logging.getLogger("agents.stt")

# 6 tries: 0.5 + 1 + 2 + 4 + 5 + 5 s, about 17 s for a listener to find its node again
STT_RECONNECT = Reconnect(tries=6)

# Errors after which the node closes the socket and reconnecting with the same key cannot help.
FATAL_CODES = frozenset(
    {
        "invalid_token",
        "wrong_node",
        "session_expired",
        "session_taken_over",
        "draining",
        "server_full",
        "config_timeout",
    }
)


class STTConnectError(Exception):
    """The node refused the stream or could not be reached; ``code`` is the node's error code."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code


class NetworkSTT(NodeProvider):
    """STT provider for our nodes: one ``stream()`` per remote participant."""

    def __init__(
        self,
        server_url: str,
        session_key: str,
        *,
        language: str = "en",
        end_of_utterance: float | None = None,
        reconnect: Reconnect = STT_RECONNECT,
        event_queue_size: int = 256,
    ) -> None:
        """``end_of_utterance``: the silence (seconds) after which the node says ``speech_end``,
        asked in the stream's config; None leaves the node's own (500 ms by default)."""
        if end_of_utterance is not None and not 0.1 <= end_of_utterance <= 5.0:
            raise ValueError(
                f"end_of_utterance {end_of_utterance!r}: give seconds from 0.1 to "
                "5.0, or None for the node's own"
            )
        super().__init__(server_url, session_key, reconnect)
        self.language = language
        self.end_of_utterance = end_of_utterance
        self.event_queue_size = event_queue_size

    async def stream(self, language: str | None = None) -> NetworkSTTStream:
        stream = NetworkSTTStream(self, language or self.language)
        await stream.start()
        return stream


class NetworkSTTStream(NodeStream):
    """One STT WebSocket: audio in, ``SpeechEvent``s out (``events()``), reconnecting on drops."""

    kind = "STT"
    connect_error = STTConnectError

    def __init__(self, owner: NetworkSTT, language: str) -> None:
        super().__init__(owner, owner.event_queue_size)
        self.owner: NetworkSTT = owner
        self.language = language
        self.remaining_seconds: float | None = None
        self._pending: deque[bytes] = deque()  # audio pushed while reconnecting (at most 1 s)
        self._pending_bytes = 0

    # ------------------------------------------------------------ life

    async def _connect(self) -> aiohttp.ClientWebSocketResponse:
        """Open the socket, send the config, wait for ``ready``.

        Raise STTConnectError if refused.
        """
        try:
            ws = await self._http.ws_connect(
                self.owner.url, timeout=aiohttp.ClientWSTimeout(ws_close=5.0), max_msg_size=1 << 20
            )
        except (aiohttp.ClientError, OSError) as exc:
            raise STTConnectError("unreachable", f"{self.owner.url}: {exc}") from None
        config: dict[str, Any] = {
            "type": "config",
            "session_key": self.session_key,
            "language": self.language,
        }
        if self.owner.end_of_utterance is not None:
            config["end_of_utterance_ms"] = round(self.owner.end_of_utterance * 1000)
        await ws.send_json(config)
        try:
            while True:
                msg = await ws.receive(timeout=15.0)
                if msg.type != aiohttp.WSMsgType.TEXT:
                    raise STTConnectError(
                        "closed",
                        f"the node closed the socket before ready ({msg.type.name} {msg.data!r})",
                    )
                data = parse_message(msg.data, "STT")
                if data is None:
                    continue
                if data.get("type") == "ready":
                    self.session_id = data.get("session_id") or self.session_id
                    self.remaining_seconds = _number(data.get("remaining_seconds"))
                    return ws
                if data.get("type") == "error":
                    raise STTConnectError(str(data.get("error")), str(data.get("message", "")))
        except TimeoutError:
            await ws.close()
            raise STTConnectError("timeout", "no ready from the node within 15 s") from None
        except BaseException:
            await ws.close()
            raise

    async def aclose(self) -> None:
        await self._close_socket()
        self._end()

    def _finished(self) -> None:
        self._end()

    # ------------------------------------------------------------ the STTStream interface

    async def push(self, pcm16: bytes) -> None:
        if len(pcm16) % 2:
            raise ValueError(f"PCM16 audio has 2 bytes per sample; got {len(pcm16)} bytes")
        if len(pcm16) > 32_000:
            raise ValueError(
                f"a frame holds at most 1 s (32000 bytes) of 16 kHz PCM16; got "
                f"{len(pcm16)}: split it"
            )
        if self._ended or not pcm16:
            return
        ws = self._ws
        if ws is None or ws.closed:
            self._hold(pcm16)
            return
        try:
            await ws.send_bytes(pcm16)
        except (ConnectionError, RuntimeError):
            self._hold(pcm16)

    def _hold(self, pcm16: bytes) -> None:
        """Keep the last second of audio while reconnecting, so a short drop loses no words."""
        self._pending.append(pcm16)
        self._pending_bytes += len(pcm16)
        while self._pending_bytes > 32_000:
            self._pending_bytes -= len(self._pending.popleft())

    async def events(self) -> AsyncIterator[SpeechEvent]:
        async for event in until_end(self._output):
            yield event

    async def extend(self, session_key: str) -> None:
        self.session_key = session_key
        self.owner.session_key = session_key
        await self._send({"type": "extend", "session_key": session_key})

    # ------------------------------------------------------------ reading

    async def _read_socket(self) -> bool:
        """Read until the socket ends; True when the node ended the session for good."""
        assert self._ws is not None
        async for msg in self._ws:
            if msg.type == aiohttp.WSMsgType.TEXT:
                event = self._event(msg.data)
                if event is not None:
                    await self._emit(event)
                    if event.type == "error" and event.code in FATAL_CODES:
                        log.warning(
                            "STT node ended the session (%s: %s); not reconnecting",
                            event.code,
                            event.text,
                        )
                        return True
            elif msg.type == aiohttp.WSMsgType.BINARY:
                log.warning(
                    "STT node sent a %d-byte binary message; the protocol has none, skipped",
                    len(msg.data),
                )
        return False

    async def _fatal(self, exc: Exception) -> bool:
        if isinstance(exc, STTConnectError) and exc.code in FATAL_CODES:
            await self._emit(SpeechEvent("error", text=str(exc), code=exc.code))
            return True
        return False

    async def _reconnected(self) -> None:
        log.info("STT session %s has %.0f s left", self.session_id, self.remaining_seconds or 0)
        held, self._pending, self._pending_bytes = list(self._pending), deque(), 0
        for chunk in held:
            await self.push(chunk)

    async def _unreachable(self) -> None:
        await self._emit(
            SpeechEvent("error", text=f"STT node {self.owner.url} unreachable", code="disconnected")
        )

    async def _emit(self, event: SpeechEvent) -> None:
        await self._output.put(event)

    def _event(self, text: str) -> SpeechEvent | None:
        """A node message as a SpeechEvent; None for messages the agent has no use for and for
        malformed ones (logged)."""
        data = parse_message(text, "STT")
        if data is None:
            return None
        kind = data.get("type")
        try:
            if kind == "vad_event":
                event = data["event"]
                if event not in ("speech_start", "speech_end"):
                    raise ValueError(f"unknown vad event {event!r}")
                return SpeechEvent(event, at=_number(data.get("timestamp")))
            if kind == "transcription":
                if not isinstance(data["text"], str) or not isinstance(data["is_final"], bool):
                    raise ValueError("text must be a string and is_final a boolean")
                return SpeechEvent(
                    "final" if data["is_final"] else "interim",
                    text=data["text"],
                    latency_ms=_number(data.get("latency_ms")),
                )
            if kind == "session_expiring":
                remaining = _number(data["remaining_seconds"])
                if remaining is None:
                    raise ValueError("remaining_seconds must be a number")
                self.remaining_seconds = remaining
                return SpeechEvent("expiring", remaining_seconds=remaining)
            if kind == "session_expired":
                return SpeechEvent("error", text="the STT session ran out", code="session_expired")
            if kind == "error":
                return SpeechEvent(
                    "error", text=str(data.get("message", "")), code=str(data["error"])
                )
            if kind == "session_extended":
                self.remaining_seconds = _number(data.get("remaining_seconds"))
                log.info("STT session extended: %.0f s left", self.remaining_seconds or 0)
                return None
            if kind in ("pong", "ready"):
                return None
        except (KeyError, TypeError, ValueError) as exc:
            log.warning(
                "STT node sent a malformed %r message (%s), skipped: %.200s", kind, exc, text
            )
            return None
        log.warning("STT node sent an unknown message type %r, skipped: %.200s", kind, text)
        return None


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)
