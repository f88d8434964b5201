"""One client WebSocket on ``/v1/stream``: the spec's TTS protocol.

Three tasks per socket: the *reader* (client messages; answers errors; handles clear/extend at
once), the *producer* (plans each queued text into segments and has them synthesized through the
shared scheduler, staying ``lookahead_seconds`` ahead of playback), and the *player* (sends the
48 kHz PCM16 frames on an absolute audio clock: frame ``n`` leaves at ``t0 + (n - lead) * 20 ms``,
so there is no drift; if the engine falls behind, the clock re-anchors when audio is back instead
of bursting).

Texts play strictly in the order they were accepted; texts of another ``context_id`` are
synthesized ahead while the current one plays. ``clear`` (optionally for one ``context_id``)
drops the matching texts: the player checks before every frame, so no audio of a cleared text
leaves after ``cleared``.

Characters: a text is *reserved* against the token's limit when accepted (so a text past the limit
is refused with an error), and *used* (billed) when its synthesis starts; a cleared text that never
started is released. The counts belong to the token's session (``node.tts.usage``), not to the
socket: every socket of one session draws from one limit, and the role reports usage per session.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import time
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import soxr
from aiohttp import WSMsgType, web

from node.tts.engine import EngineError, Segment, VoiceSpec, check_speed, plan_segments
from node.tts.usage import SessionEnded, TtsSession
from common import jsonsafe
from registry.tokens import Claims, TokenError

if TYPE_CHECKING:
    from node.tts import TtsRole

log = logging.getLogger("node.tts")

OUT_RATE = 48_000
FRAME_SAMPLES = 960
FRAME_BYTES = FRAME_SAMPLES * 2
FRAME_SECONDS = FRAME_SAMPLES / OUT_RATE  # 20 ms


class ProtocolError(Exception):
    """A bad client message: answered with ``{"type": "error"}``, the socket stays open."""


class ServerFull(Exception):
    """Every stream the node advertises is in use: the socket is refused, nobody else degrades."""


@dataclass
class Voice:
    spec: VoiceSpec
    speed: float


@dataclass
class Item:
    """One accepted text."""

    seq: int
    text: str
    voice: Voice
    context_id: str | None
    chars: int
    frames: deque[bytes] = field(default_factory=deque)
    events: deque[tuple[int, dict[str, Any]]] = field(default_factory=deque)  # (frame index, msg)
    produced: int = 0          # frames appended so far
    played: int = 0            # frames sent so far
    synth_started: bool = False
    synth_done: bool = False
    started: bool = False      # `generating` sent
    cancelled: bool = False
    failed: str | None = None
    received_at: float = field(default_factory=time.perf_counter)
    first_engine_s: float | None = None  # engine time of the first segment, for the TTFA figures

    def tag(self, msg: dict[str, Any]) -> dict[str, Any]:
        if self.context_id is not None:
            msg["context_id"] = self.context_id
        return msg


class Resampler:
    """24 kHz float32 -> 48 kHz PCM16 frames of exactly 960 samples (soxr, streaming, HQ)."""

    def __init__(self, in_rate: int) -> None:
        self._rs = soxr.ResampleStream(in_rate, OUT_RATE, 1, dtype="float32", quality="HQ")
        self._rest = np.zeros(0, dtype=np.float32)

    def push(self, audio: np.ndarray, last: bool = False) -> list[bytes]:
        out = self._rs.resample_chunk(np.asarray(audio, dtype=np.float32), last=last)
        buf = np.concatenate([self._rest, out]) if self._rest.size else out
        n = len(buf) // FRAME_SAMPLES
        frames = [_pcm16(buf[i * FRAME_SAMPLES:(i + 1) * FRAME_SAMPLES]) for i in range(n)]
        self._rest = buf[n * FRAME_SAMPLES:]
        if last and self._rest.size:
            pad = np.zeros(FRAME_SAMPLES, dtype=np.float32)
            pad[: self._rest.size] = self._rest
            frames.append(_pcm16(pad))
            self._rest = np.zeros(0, dtype=np.float32)
        return frames


def _pcm16(x: np.ndarray) -> bytes:
    return (np.clip(x, -1.0, 1.0) * 32767.0).astype("<i2").tobytes()


class TtsStream:
    def __init__(self, role: TtsRole, ws: web.WebSocketResponse) -> None:
        self.role = role
        self.settings = role.settings
        self.ws = ws
        self.claims: Claims | None = None
        self.session_id = ""
        self.session: TtsSession | None = None  # shared by every socket of the token's session
        self.voice = Voice(VoiceSpec.parse(self.settings.voice, self.settings.lang_code),
                           self.settings.speed)
        self.items: deque[Item] = deque()
        self._seq = 0
        self._changed = asyncio.Event()     # new item / audio / cancel: wakes producer and player
        self._interrupt = asyncio.Event()   # clear: wakes the player's clock wait
        self._send_lock = asyncio.Lock()
        self._producer: asyncio.Task[None] | None = None
        self._producing: Item | None = None
        self._player: asyncio.Task[None] | None = None
        self.frames_sent = 0

    @property
    def expires_at(self) -> float:
        return self.session.expires_at if self.session is not None else 0.0

    # ------------------------------------------------------------------ sending

    async def send_json(self, msg: dict[str, Any]) -> None:
        if self.ws.closed:
            return
        try:
            await self.ws.send_str(json.dumps(msg, separators=(",", ":")))
        except (ConnectionError, RuntimeError):
            pass

    async def error(self, message: str, context_id: str | None = None, **extra: Any) -> None:
        msg: dict[str, Any] = {"type": "error", "message": message, **extra}
        if context_id is not None:
            msg["context_id"] = context_id
        await self.send_json(msg)

    # ------------------------------------------------------------------ lifecycle

    async def run(self) -> None:
        if not await self._authenticate():
            return
        self._producer = asyncio.create_task(self._produce())
        self._player = asyncio.create_task(self._play())
        try:
            await self._read()
        finally:
            self.role.streams.discard(self)
            for t in (self._producer, self._player):
                if t is not None:
                    t.cancel()
            for t in (self._producer, self._player):
                if t is not None:
                    try:
                        await t
                    except (asyncio.CancelledError, Exception):
                        pass
            unstarted = sum(i.chars for i in self.items if not i.synth_started and not i.cancelled)
            assert self.session is not None
            self.role.sessions.detach(self.session, unstarted)

    async def _authenticate(self) -> bool:
        try:
            msg = await self.ws.receive(timeout=self.settings.auth_timeout)
        except TimeoutError:
            await self.error("auth: the first message must be {\"session_key\": ...} "
                             f"within {self.settings.auth_timeout:g} s")
            await self.ws.close(code=4401, message=b"auth timeout")
            return False
        if msg.type != WSMsgType.TEXT:
            await self.error("auth: the first message must be a JSON text message with session_key")
            await self.ws.close(code=4401, message=b"auth required")
            return False
        try:
            data = jsonsafe.loads(msg.data)
            if not isinstance(data, dict) or not isinstance(data.get("session_key"), str):
                raise ProtocolError("auth: the first message must be {\"session_key\": \"eyJ...\"}")
            try:
                claims = await self.role.context.verify(data["session_key"])
            except TokenError as exc:
                raise ProtocolError(f"auth: {exc.code}: {exc}") from None
            if claims.service != "tts" or claims.limit is None:
                raise ProtocolError("auth: the session key carries no tts grant")
            if self.role.draining:
                raise ProtocolError("node is draining: open a new session through the gateway")
            if len(self.role.streams) >= self.role.capacity:
                raise ServerFull(f"server_full: node is at capacity ({self.role.capacity} "
                                 "streams): open a new session through the gateway")
            if "config" in data:
                self._apply_config(data["config"])
            session = self.role.sessions.attach(claims.session_id, int(claims.limit),
                                                float(claims.expires_at))
        except ServerFull as exc:
            # the spec's STT shape: {"error": "server_full"}; 1013 = try again later
            await self.error(str(exc), error="server_full")
            await self.ws.close(code=1013, message=b"server full")
            return False
        except SessionEnded as exc:
            await self.error(f"auth: session_ended: {exc}")
            await self.ws.close(code=4401, message=b"session ended")
            return False
        except (ValueError, ProtocolError, EngineError) as exc:
            bad_json = isinstance(exc, ValueError) and not isinstance(exc, EngineError)
            await self.error(f"auth: the first message is not valid JSON ({exc})" if bad_json
                             else str(exc))
            await self.ws.close(code=4401, message=b"auth failed")
            return False
        self.claims = claims
        self.session_id = claims.session_id
        self.session = session
        # counted before the next await: sockets authenticating at once cannot overfill the node
        self.role.streams.add(self)
        await self.send_json({"type": "ready", "session_id": self.session_id,
                              "limit_characters": session.limit,
                              "remaining_characters": session.remaining(),
                              "expires_in": max(0, int(self.expires_at - time.time()))})
        return True

    async def _read(self) -> None:
        while not self.ws.closed:
            timeout = self.expires_at - time.time()
            if timeout <= 0:
                await self.error("session expired: extend it with {\"type\": \"extend\", "
                                 "\"session_key\": ...}")
                await self.ws.close(code=4408, message=b"session expired")
                return
            try:
                msg = await self.ws.receive(timeout=timeout)
            except TimeoutError:
                continue
            if msg.type in (WSMsgType.CLOSE, WSMsgType.CLOSING, WSMsgType.CLOSED, WSMsgType.ERROR):
                return
            if msg.type != WSMsgType.TEXT:
                await self.error("binary messages are not accepted: send JSON text messages")
                continue
            context_id = None
            try:
                try:
                    data = jsonsafe.loads(msg.data)
                except ValueError as exc:
                    raise ProtocolError(f"message is not valid JSON: {exc}") from None
                if not isinstance(data, dict):
                    raise ProtocolError("message must be a JSON object")
                context_id = data.get("context_id")
                if context_id is not None and (not isinstance(context_id, str) or not context_id
                                               or len(context_id) > 128):
                    context_id = None
                    raise ProtocolError("context_id must be a non-empty string of at most 128 characters")
                await self._handle(data, context_id)
            except (ProtocolError, EngineError) as exc:
                await self.error(str(exc), context_id)

    # ------------------------------------------------------------------ messages

    async def _handle(self, data: dict[str, Any], context_id: str | None) -> None:
        kind = data.get("type")
        if kind == "clear":
            await self._clear(context_id)
        elif kind == "extend":
            await self._extend(data)
        elif kind == "flush" or kind == "ping":
            await self.send_json({"type": "pong"} if kind == "ping" else {"type": "flushed"})
        elif kind is not None and kind != "text":
            raise ProtocolError(f"unknown message type {kind!r}: expected text, config, clear or extend")
        elif "text" in data:
            self._accept_text(data, context_id)
        elif "config" in data:
            self._apply_config(data["config"])
            await self.send_json({"type": "config", "voice": self.voice.spec.label,
                                  "lang_code": self.voice.spec.lang_code, "speed": self.voice.speed})
        elif "session_key" in data:
            raise ProtocolError("already authenticated: to extend send {\"type\": \"extend\", \"session_key\": ...}")
        else:
            raise ProtocolError("expected {\"text\": ...}, {\"config\": ...}, {\"type\": \"clear\"} "
                                "or {\"type\": \"extend\", ...}")

    def _voice_from(self, data: dict[str, Any], base: Voice) -> Voice:
        voice = data.get("voice", None)
        lang = data.get("lang_code", None)
        if voice is not None and not isinstance(voice, str):
            raise ProtocolError("voice must be a string such as 'af_heart' or 'af_heart,af_bella'")
        if lang is not None and not isinstance(lang, str):
            raise ProtocolError("lang_code must be one of a b e f h i j p z")
        if voice is None and lang is None:
            spec = base.spec
        else:
            names = voice if voice is not None else base.spec.label
            # a new voice without lang_code speaks its own language
            spec = VoiceSpec.parse(names, lang if lang is not None
                                   else (None if voice is not None else base.spec.lang_code))
        speed = check_speed(data["speed"]) if data.get("speed") is not None else base.speed
        return Voice(spec, speed)

    def _apply_config(self, config: Any) -> None:
        if not isinstance(config, dict):
            raise ProtocolError("config must be an object such as {\"voice\": \"af_heart\", "
                                "\"lang_code\": \"a\", \"speed\": 1.0}")
        unknown = set(config) - {"voice", "lang_code", "speed"}
        if unknown:
            raise ProtocolError(f"unknown config key(s) {', '.join(sorted(unknown))}: "
                                "expected voice, lang_code, speed")
        self.voice = self._voice_from(config, self.voice)

    def _accept_text(self, data: dict[str, Any], context_id: str | None) -> None:
        text = data.get("text")
        if not isinstance(text, str):
            raise ProtocolError("text must be a string")
        text = text.strip()
        if not text:
            raise ProtocolError("text is empty")
        if len(text) > self.settings.max_text_chars:
            raise ProtocolError(f"text is too long: {len(text)} characters, at most "
                                f"{self.settings.max_text_chars} per message")
        voice = self._voice_from(data, self.voice)
        chars = len(text)
        session = self.session
        assert session is not None
        if session.reserved + chars > session.limit:
            raise ProtocolError(
                f"character limit reached: this text has {chars} characters, "
                f"{session.remaining()} of the session's {session.limit} remain (shared by "
                "every socket of the session); extend the session")
        if len(self.items) >= self.settings.max_queued_texts:
            raise ProtocolError(f"too many queued texts (at most {self.settings.max_queued_texts}): "
                                "wait for done or clear")
        if context_id is not None and context_id not in {i.context_id for i in self.items} and \
                len({i.context_id for i in self.items if i.context_id}) >= self.settings.max_contexts:
            raise ProtocolError(f"too many open contexts (at most {self.settings.max_contexts})")
        self._seq += 1
        session.reserved += chars
        self.items.append(Item(self._seq, text, voice, context_id, chars))
        self._changed.set()

    async def _clear(self, context_id: str | None) -> None:
        keep: deque[Item] = deque()
        for item in self.items:
            if context_id is None or item.context_id == context_id:
                item.cancelled = True
                item.frames.clear()
                if not item.synth_started and self.session is not None:
                    self.session.reserved -= item.chars
            else:
                keep.append(item)
        self.items = keep
        self._interrupt.set()
        self._changed.set()
        # the producer may be mid-segment for a cancelled item: restart it (an item of another
        # context it is working on is left alone, or its audio would be made twice)
        if self._producer is not None and self._producing is not None and self._producing.cancelled:
            self._producer.cancel()
            try:
                await self._producer
            except (asyncio.CancelledError, Exception):
                pass
            self._producer = asyncio.create_task(self._produce())
        msg: dict[str, Any] = {"type": "cleared"}
        if context_id is not None:
            msg["context_id"] = context_id
        await self.send_json(msg)

    async def _extend(self, data: dict[str, Any]) -> None:
        token = data.get("session_key")
        if not isinstance(token, str):
            raise ProtocolError("extend needs {\"type\": \"extend\", \"session_key\": \"eyJ...\"}")
        try:
            claims = await self.role.context.verify(token)
        except TokenError as exc:
            raise ProtocolError(f"extend: {exc.code}: {exc}") from None
        if claims.session_id != self.session_id or claims.limit is None:
            raise ProtocolError("extend: the key is for another session")
        assert self.session is not None
        self.session.extend(int(claims.limit), float(claims.expires_at))
        await self.send_json({"type": "extended",
                              "expires_in": max(0, int(self.expires_at - time.time())),
                              "limit_characters": self.session.limit})

    # ------------------------------------------------------------------ producer

    def buffered_seconds(self) -> float:
        return sum(len(i.frames) for i in self.items) * FRAME_SECONDS

    async def _produce(self) -> None:
        engine = self.role.engine
        while True:
            item = next((i for i in self.items if not i.synth_done and not i.cancelled), None)
            if item is None:
                self._changed.clear()
                await self._changed.wait()
                continue
            if not item.synth_started:
                item.synth_started = True
                assert self.session is not None
                self.session.used += item.chars
            self._producing = item
            try:
                await self._produce_item(engine, item)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the engine failed on this text: tell the client, go on
                log.exception("synthesis failed for session %s", self.session_id)
                item.failed = f"synthesis failed: {exc}"
            item.synth_done = True
            self._producing = None
            self._changed.set()

    async def _produce_item(self, engine: Any, item: Item) -> None:
        loop = asyncio.get_running_loop()
        spec, speed = item.voice.spec, item.voice.speed
        segments: list[Segment] = await loop.run_in_executor(
            None, lambda: plan_segments(item.text, spec.lang_code, engine,
                                        cut_first=self.buffered_seconds() < 1.0,
                                        first_words=self.settings.first_clause_words,
                                        speed=speed,
                                        lead_seconds=self.settings.lead_frames * FRAME_SECONDS))
        resampler = Resampler(engine.sample_rate)
        align = self.settings.alignment
        segments.reverse()  # popped from the end
        while segments:
            seg = segments.pop()
            # stay at most lookahead_seconds ahead of playback
            while self.buffered_seconds() > self.settings.lookahead_seconds:
                self._changed.clear()
                await self._changed.wait()
                if item.cancelled:
                    return
            if item.cancelled:
                return
            deadline = time.monotonic() + self.buffered_seconds()

            def job(threads: int | None, s: Segment = seg) -> tuple[np.ndarray, float, Any]:
                t0 = time.perf_counter()
                audio = engine.synthesize(s.text, spec, speed, threads=threads)
                took = time.perf_counter() - t0
                words = engine.word_weights(s.text, spec.lang_code) if align else None
                return audio, took, words

            audio, engine_s, words = await self.role.scheduler.run(job, deadline)
            if item.first_engine_s is None:
                item.first_engine_s = engine_s
            if item.cancelled:
                return
            if words:
                self._queue_alignment(item, seg, words, len(audio) / engine.sample_rate)
            if seg.pause_after:
                audio = np.concatenate([audio, np.zeros(int(seg.pause_after * engine.sample_rate),
                                                        dtype=np.float32)])
            frames = resampler.push(audio)
            item.frames.extend(frames)
            item.produced += len(frames)
            self._changed.set()
            if segments:
                # re-size the rest from the audio really buffered now and the engine's latest
                # cost: a segment slower than planned (load) shrinks the next one instead of
                # leaving a gap; a faster engine grows them sooner
                # streams synthesizing at once share the workers: each gets its share of the time
                sharing = sum(1 for st in self.role.streams if st._producing is not None)
                ahead = self.buffered_seconds() / max(1.0, sharing / self.role.scheduler.workers)
                rest = " ".join(x.text for x in reversed(segments))
                segments = await loop.run_in_executor(None, functools.partial(
                    plan_segments, rest, spec.lang_code, engine, speed=speed,
                    lead_seconds=self.settings.lead_frames * FRAME_SECONDS, ahead_seconds=ahead))
                segments.reverse()
        tail = resampler.push(np.zeros(0, dtype=np.float32), last=True)
        item.frames.extend(tail)
        item.produced += len(tail)

    def _queue_alignment(self, item: Item, seg: Segment, words: list[tuple[str, float]],
                         speech_seconds: float) -> None:
        start = item.produced * FRAME_SECONDS
        total = sum(w for _, w in words) or 1.0
        t = start
        out = []
        for word, weight in words:
            d = speech_seconds * weight / total
            out.append({"word": word, "start": round(t, 3), "end": round(t + d, 3)})
            t += d
        item.events.append((item.produced, item.tag(
            {"type": "alignment", "text": seg.text, "words": out, "approximate": True})))

    # ------------------------------------------------------------------ player

    async def _wait_changed(self, timeout: float | None = None) -> None:
        self._changed.clear()
        try:
            await asyncio.wait_for(self._changed.wait(), timeout)
        except TimeoutError:
            pass

    async def _play(self) -> None:
        lead = self.settings.lead_frames
        t0: float | None = None   # audio clock: frame n of the run is due at t0 + (n - lead) * 20 ms
        n = 0
        while True:
            item = self.items[0] if self.items else None
            if item is None:
                t0 = None
                await self._wait_changed()
                continue
            if item.cancelled:
                self.items.popleft()
                continue
            if not item.frames:
                if item.synth_done:
                    if item.failed:
                        await self.error(item.failed, item.context_id)
                    if item.started:
                        await self._flush_events(item, final=True)
                        await self.send_json(item.tag({"type": "done"}))
                    elif not item.failed:
                        await self.send_json(item.tag({"type": "generating", "text": item.text}))
                        await self.send_json(item.tag({"type": "done"}))
                    if self.items and self.items[0] is item:
                        self.items.popleft()
                    self._changed.set()
                    continue
                await self._wait_changed()
                continue
            if not item.started:
                item.started = True
                await self.send_json(item.tag({"type": "generating", "text": item.text}))
                if item.first_engine_s is not None and t0 is None:  # nothing was playing
                    self.role.first_audio.append(
                        (time.perf_counter() - item.received_at, item.first_engine_s))
            now = time.monotonic()
            if t0 is None:
                t0, n = now, 0
            due = t0 + (n - lead) * FRAME_SECONDS
            if n >= lead and due < now - 2 * FRAME_SECONDS:
                # underrun (texts are queued but the engine fell behind): re-anchor the clock
                # rather than bursting, and rebuild the lead; idle time resets t0 instead
                self.role.stats["underruns"] += 1
                self.role.stats["stall_seconds"] += now - due
                t0, n = now, 0
                due = now - lead * FRAME_SECONDS
            if due > now:
                self._interrupt.clear()
                try:
                    await asyncio.wait_for(self._interrupt.wait(), due - now)
                except TimeoutError:
                    pass
                if item.cancelled or not item.frames:
                    continue
            await self._flush_events(item)
            frame = item.frames.popleft()
            item.played += 1
            n += 1
            self.frames_sent += 1
            self._changed.set()  # the producer may be waiting for room
            try:
                await self.ws.send_bytes(frame)
            except (ConnectionError, RuntimeError):
                return

    async def _flush_events(self, item: Item, final: bool = False) -> None:
        while item.events and (final or item.events[0][0] <= item.played):
            _, msg = item.events.popleft()
            await self.send_json(msg)
