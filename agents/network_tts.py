"""``NetworkTTS``: the agent's voice from one of the network's TTS nodes, over its WebSocket.

The node's protocol (``node/tts/README.md``): ``{"session_key", "config"}`` then ``ready``;
each ``{"text"}`` plays in order as ``generating``, ``alignment`` (word timings) and 20 ms binary
frames of 48 kHz PCM16, then ``done``; ``clear`` answers ``cleared``. Frames carry no ids, so:

* every piece is sent with ``context_id`` ``piece-<n>``: ``generating``/``alignment``/``done``/
  ``error`` name it, and the frames between a piece's ``generating`` and ``done`` are that piece's;
  at most ``max_in_flight`` pieces wait at the node (it caps open contexts), the rest wait here;
* after ``clear()`` every frame until ``cleared`` is stale and dropped.

A dropped socket reconnects with the same key (a few tries); pieces that were in flight are not
sent again (they were billed once already) and are reported as ended.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
from collections import deque
from collections.abc import AsyncIterator
from typing import Any

import aiohttp

from agents.node_socket import NodeProvider, NodeStream, Reconnect, parse_message
from agents.plugins import SpeechAudio, WordTiming
from agents.queues import drop_until_end, until_end

log = logging.getLogger("agents.tts")

# 4 tries: 0.5 + 1 + 2 + 4 s, about 7 s before a reply is given up
TTS_RECONNECT = Reconnect(tries=4)


class TTSConnectError(Exception):
    """The node refused the stream or could not be reached; the message is the node's."""


def token_character_limit(session_key: str) -> int | None:
    """``tts.limit_characters`` from the key's claims, read without verifying (the node does)."""
    try:
        payload = session_key.split(".")[1]
        claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
        return int(claims["tts"]["limit_characters"])
    except (IndexError, KeyError, TypeError, ValueError):
        return None


# The interface speaks ISO 639-1 languages (what the STT side and the agent session use); the
# node's Kokoro voices take their own one-letter codes, which pass through unchanged.
KOKORO_LANG_CODES = {
    "en": "a",
    "en-us": "a",
    "en-gb": "b",
    "es": "e",
    "fr": "f",
    "hi": "h",
    "it": "i",
    "ja": "j",
    "pt": "p",
    "pt-br": "p",
    "zh": "z",
}


def kokoro_lang_code(language: str) -> str:
    """The node's ``lang_code`` for ``language`` (``en`` -> ``a``).

    ValueError naming the choices.
    """
    code = language.strip().lower()
    if len(code) == 1 and code in KOKORO_LANG_CODES.values():
        return code
    if code in KOKORO_LANG_CODES:
        return KOKORO_LANG_CODES[code]
    raise ValueError(
        f"language {language!r} has no voice on our TTS nodes: use one of "
        f"{', '.join(sorted(KOKORO_LANG_CODES))}"
    )


class NetworkTTS(NodeProvider):
    """TTS provider for our nodes."""

    def __init__(
        self,
        server_url: str,
        session_key: str,
        *,
        voice: str = "af_heart",
        lang_code: str | None = None,
        speed: float | None = None,
        max_in_flight: int = 6,
        reconnect: Reconnect = TTS_RECONNECT,
        audio_queue_frames: int = 500,
    ) -> None:
        if not 1 <= max_in_flight <= 7:
            raise ValueError(
                f"max_in_flight={max_in_flight}: the node holds at most 8 open contexts; use 1-7"
            )
        super().__init__(server_url, session_key, reconnect)
        self.voice, self.lang_code, self.speed = voice, lang_code, speed
        self.max_in_flight = max_in_flight
        self.audio_queue_frames = audio_queue_frames

    async def stream(
        self, voice: str | None = None, language: str | None = None
    ) -> NetworkTTSStream:
        config: dict[str, Any] = {"voice": voice or self.voice}
        if language or self.lang_code:
            config["lang_code"] = kokoro_lang_code(language or self.lang_code or "")
        if self.speed is not None:
            config["speed"] = self.speed
        stream = NetworkTTSStream(self, config)
        await stream.start()
        return stream


class NetworkTTSStream(NodeStream):
    """One TTS WebSocket: pieces of text in, ``SpeechAudio`` out in order."""

    kind = "TTS"
    connect_error = TTSConnectError

    def __init__(self, owner: NetworkTTS, config: dict[str, Any]) -> None:
        super().__init__(owner, owner.audio_queue_frames)
        self.owner: NetworkTTS = owner
        self.config = config
        self.limit_characters: int | None = token_character_limit(self.session_key)
        self._left: int | None = self.limit_characters
        self._next_piece = 0
        self._backlog: deque[tuple[int, str]] = deque()  # said, not yet sent to the node
        self._in_flight: dict[int, str] = {}  # sent, not yet done
        self._done: dict[int, asyncio.Event] = {}
        self._failed: dict[int, str] = {}
        self._current: int | None = None  # the piece whose frames arrive now
        self._words: list[WordTiming] = []  # timings for the next frame
        self._epoch = 0  # bumped by clear: older audio is stale
        self._clearing: asyncio.Event | None = None
        self._extended: asyncio.Future[dict[str, Any]] | None = None

    # ------------------------------------------------------------ life

    async def _connect(self) -> aiohttp.ClientWebSocketResponse:
        try:
            ws = await self._http.ws_connect(self.owner.url, max_msg_size=1 << 20)
        except (aiohttp.ClientError, OSError) as exc:
            raise TTSConnectError(f"unreachable: {self.owner.url}: {exc}") from None
        try:
            await ws.send_json({"session_key": self.session_key, "config": self.config})
            msg = await ws.receive(timeout=30.0)
            data = parse_message(msg.data, "TTS") if msg.type == aiohttp.WSMsgType.TEXT else None
            if data is None or data.get("type") != "ready":
                detail = data.get("message") if data else f"{msg.type.name} {msg.data!r}"
                raise TTSConnectError(f"the TTS node refused the stream: {detail}")
        except TimeoutError:
            await ws.close()
            raise TTSConnectError("no ready from the TTS node within 30 s") from None
        except BaseException:
            await ws.close()
            raise
        self.session_id = data.get("session_id") or self.session_id
        if isinstance(data.get("limit_characters"), int):
            self.limit_characters = data["limit_characters"]
        if isinstance(data.get("remaining_characters"), int):
            self._left = data["remaining_characters"]
        return ws

    async def aclose(self) -> None:
        await self._close_socket()
        for piece in list(self._in_flight) + [p for p, _ in self._backlog]:
            self._finish(piece, "the stream was closed")
        self._end()

    def _finished(self) -> None:
        for piece in list(self._in_flight) + [p for p, _ in self._backlog]:
            self._finish(piece, "the TTS stream ended")
        self._end()

    # ------------------------------------------------------------ the TTSStream interface

    @property
    def characters_left(self) -> int | None:
        return self._left

    async def say(self, text: str) -> int:
        text = text.strip()
        if not text:
            raise ValueError("say() needs text to speak; got an empty or blank string")
        if self._ended:
            raise RuntimeError("the TTS stream has ended: open a new one")
        piece = self._next_piece
        self._next_piece += 1
        self._done[piece] = asyncio.Event()
        if self._left is not None:
            self._left -= len(text)  # what the node reserves for it
        self._backlog.append((piece, text))
        await self._send_backlog()
        return piece

    async def audio(self) -> AsyncIterator[SpeechAudio]:
        async for epoch, chunk in until_end(self._output):
            if epoch == self._epoch:
                yield chunk

    async def clear(self) -> None:
        self._epoch += 1
        clearing = self._clearing = asyncio.Event()
        for piece in list(self._in_flight) + [p for p, _ in self._backlog]:
            self._finish(piece, "cleared")
        self._backlog.clear()
        self._current, self._words = None, []
        drop_until_end(self._output)
        if not await self._send({"type": "clear"}):
            self._clearing = None
            return
        try:
            await asyncio.wait_for(clearing.wait(), 5.0)
        except TimeoutError:
            log.warning(
                "TTS node sent no 'cleared' within 5 s of clear; audio from now on is taken as new"
            )
        if self._clearing is clearing:
            self._clearing = None

    async def extend(self, session_key: str) -> None:
        """Send the new key; returns once the node confirmed (``characters_left`` updated)."""
        self.session_key = session_key
        self.owner.session_key = session_key
        self._extended = asyncio.get_running_loop().create_future()
        try:
            if not await self._send({"type": "extend", "session_key": session_key}):
                return
            answer = await asyncio.wait_for(self._extended, 10.0)
        except TimeoutError:
            log.warning("TTS node did not confirm the extension within 10 s")
            return
        finally:
            self._extended = None
        if answer.get("type") == "error":
            raise TTSConnectError(f"the TTS node refused the extension: {answer.get('message')}")

    # ------------------------------------------------------------ beyond the interface

    def is_done(self, piece: int) -> bool:
        """The piece's audio has all arrived (or it was cleared, refused or lost)."""
        event = self._done.get(piece)
        return event is not None and event.is_set()

    async def wait_done(self, piece: int) -> str | None:
        """Wait until ``piece`` ended; None when it played whole, else why it did not."""
        await self._done[piece].wait()
        return self._failed.get(piece)

    # ------------------------------------------------------------ sending

    async def _send_backlog(self) -> None:
        while self._backlog and len(self._in_flight) < self.owner.max_in_flight:
            ws = self._ws
            if ws is None or ws.closed:
                return  # sent once reconnected
            piece, text = self._backlog.popleft()
            self._in_flight[piece] = text
            if not await self._send({"text": text, "context_id": f"piece-{piece}"}):
                self._finish(piece, "the TTS socket dropped before the text was sent")

    def _finish(self, piece: int, why: str | None) -> None:
        self._in_flight.pop(piece, None)
        if why is not None:
            self._failed.setdefault(piece, why)
        if piece in self._done:
            self._done[piece].set()
        if self._current == piece:
            self._current, self._words = None, []

    # ------------------------------------------------------------ reading

    async def _read_socket(self) -> bool:
        assert self._ws is not None
        async for msg in self._ws:
            if msg.type == aiohttp.WSMsgType.BINARY:
                await self._frame(msg.data)
            elif msg.type == aiohttp.WSMsgType.TEXT:
                await self._message(msg.data)
        return False  # the node ends a session by refusing the reconnect

    async def _frame(self, frame: bytes) -> None:
        if self._clearing is not None:
            return  # stale: sent before the node saw our clear
        if self._current is None or len(frame) % 2:
            log.warning("TTS node sent a %d-byte frame outside any piece, dropped", len(frame))
            return
        chunk = SpeechAudio(frame, self._current, tuple(self._words))
        self._words = []
        await self._output.put((self._epoch, chunk))

    async def _message(self, text: str) -> None:
        data = parse_message(text, "TTS")
        if data is None:
            return
        kind = data.get("type")
        if kind == "cleared":
            self._cleared()
            return
        if kind == "extended" or (
            kind == "error"
            and str(data.get("message", "")).startswith("extend")
            and self._extended is not None
        ):
            self._on_extended(data)
            return
        piece = _piece_of(data.get("context_id"))
        if self._clearing is not None and kind in ("generating", "alignment", "done"):
            return  # about a piece the clear dropped
        try:
            if kind == "generating":
                if piece not in self._in_flight:
                    raise ValueError(f"names no piece in flight ({data.get('context_id')!r})")
                self._current, self._words = piece, []
            elif kind == "alignment":
                if piece != self._current:
                    raise ValueError(f"is for {data.get('context_id')!r}, not the piece playing")
                self._words.extend(
                    WordTiming(str(w["word"]), float(w["start"]), float(w["end"]))
                    for w in data["words"]
                )
            elif kind == "done":
                if piece in self._in_flight:
                    self._finish(piece, None)
                    # in order after the piece's audio: the reader knows it heard all of it
                    await self._output.put((self._epoch, SpeechAudio(b"", piece)))
                    await self._send_backlog()
            elif kind == "error":
                self._on_error(piece, str(data.get("message", "")))
                await self._send_backlog()
            elif kind in ("pong", "config", "flushed", "ready"):
                pass
            else:
                raise ValueError("is of an unknown type")
        except (KeyError, TypeError, ValueError) as exc:
            log.warning(
                "TTS node sent a malformed %r message (%s), skipped: %.200s", kind, exc, text
            )

    def _cleared(self) -> None:
        """From here on the node sends only audio of pieces said after the clear."""
        clearing, self._clearing = self._clearing, None
        if clearing is not None:
            clearing.set()

    def _on_error(self, piece: int | None, message: str) -> None:
        if piece is not None and piece in self._in_flight:
            log.warning("TTS node refused or failed piece %d: %s", piece, message)
            if (
                piece != self._current
                and not message.startswith("synthesis failed")
                and self._left is not None
            ):
                self._left += len(self._in_flight[piece])  # refused: the node reserved nothing
            self._finish(piece, message)
        else:
            log.warning("TTS node error: %s", message)

    def _on_extended(self, data: dict[str, Any]) -> None:
        limit = data.get("limit_characters")
        if data.get("type") == "extended" and isinstance(limit, int):
            if self._left is not None and self.limit_characters is not None:
                self._left += limit - self.limit_characters
            self.limit_characters = limit
            log.info("TTS session extended: %d characters in all, %s left", limit, self._left)
        if self._extended is not None and not self._extended.done():
            self._extended.set_result(data)

    async def _reconnect(self) -> bool:
        lost = list(self._in_flight)
        for piece in lost:  # billed already: not sent again
            self._finish(piece, "the TTS socket dropped while it played")
        if lost:
            log.warning("TTS pieces %s were cut short by the drop", lost)
        return await super()._reconnect()

    async def _fatal(self, exc: Exception) -> bool:
        return "auth:" in str(exc)  # the key itself is refused: retrying cannot help

    async def _reconnected(self) -> None:
        self._cleared()  # nothing stale can follow on a new socket
        log.info("TTS stream has %s characters left", self._left)
        await self._send_backlog()


def _piece_of(context_id: Any) -> int | None:
    if isinstance(context_id, str) and context_id.startswith("piece-"):
        with contextlib.suppress(ValueError):
            return int(context_id[len("piece-") :])
    return None
