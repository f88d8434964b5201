"""One client WebSocket on ``/v1/stream`` (a :class:`Connection`): the spec's TTS protocol.

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
started is released. The counts belong to the token's session, not to the
socket: every socket of one session draws from one limit (``node.tts.characters``), and the node's
session plumbing (``node.session``) reports usage per session and settles it.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
from aiohttp import WSMsgType, web

from node.protocol import BadMessage, json_object
from node.roles import RoleContext
from node.session import SessionRefused, Sessions, verify_session_key
from node.tts.characters import CharacterCount
from node.tts.engine import Engine
from node.tts.frames import FRAME_SECONDS, FrameClock, Resampler
from node.tts.scheduler import Run, Scheduler
from node.tts.segments import Segment, plan_segments, synthesis_cost
from node.tts.settings import TtsSettings
from node.tts.voices import EngineError, VoiceSpec, check_speed
from registry.tokens import Claims

log = logging.getLogger("node.tts")


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
    produced: int = 0  # frames appended so far
    played: int = 0  # frames sent so far
    synth_started: bool = False
    synth_done: bool = False
    started: bool = False  # `generating` sent
    cancelled: bool = False
    failed: str | None = None
    received_at: float = field(default_factory=time.perf_counter)
    first_engine_s: float | None = None  # engine time of the first segment, for the TTFA figures

    def tag(self, msg: dict[str, Any]) -> dict[str, Any]:
        if self.context_id is not None:
            msg["context_id"] = self.context_id
        return msg


class RoleView(Protocol):
    """What a connection uses of its role (``node.tts.role.TtsRole``): the engine and its
    scheduler, the live streams, the token sessions and the figures it keeps."""

    context: RoleContext
    settings: TtsSettings
    scheduler: Scheduler
    streams: set[Connection]
    sessions: Sessions[CharacterCount]
    draining: bool
    stats: dict[str, float]
    first_audio: deque[tuple[float, float]]

    @property
    def engine(self) -> Engine: ...

    @property
    def capacity(self) -> int: ...


class Connection:
    def __init__(self, role: RoleView, ws: web.WebSocketResponse) -> None:
        self.role = role
        self.settings = role.settings
        self.ws = ws
        self.claims: Claims | None = None
        self.session_id = ""
        self.session: CharacterCount | None = None  # shared by every socket of the token's session
        self.voice = Voice(
            VoiceSpec.parse(self.settings.voice, self.settings.lang_code), self.settings.speed
        )
        self.items: deque[Item] = deque()
        self._seq = 0
        self._changed = asyncio.Event()  # new item / audio / cancel: wakes producer and player
        self._interrupt = asyncio.Event()  # clear: wakes the player's clock wait
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
            assert self.session is not None
            self.session.release(
                sum(i.chars for i in self.items if not i.synth_started and not i.cancelled)
            )
            self.role.sessions.detach(self.session)

    async def _authenticate(self) -> bool:
        """The first message carries the session key (and optionally a config): the socket is
        admitted and told ``ready``, or refused with an error and a close code that says why."""
        data = await self._first_message()
        if data is None:
            return False
        try:
            session = await self._admit(data)
        except ServerFull as exc:
            # the spec's STT shape: {"error": "server_full"}; 1013 = try again later
            await self.error(str(exc), error="server_full")
            await self.ws.close(code=1013, message=b"server full")
            return False
        except SessionRefused as exc:  # settled: SessionEnded
            await self.error(f"auth: {exc.code}: {exc}")
            await self.ws.close(code=4401, message=b"session ended")
            return False
        except (ProtocolError, EngineError) as exc:
            await self.error(str(exc))
            await self.ws.close(code=4401, message=b"auth failed")
            return False
        await self.send_json(
            {
                "type": "ready",
                "session_id": self.session_id,
                "limit_characters": session.limit,
                "remaining_characters": session.remaining(),
                "expires_in": max(0, int(self.expires_at - time.time())),
            }
        )
        return True

    async def _first_message(self) -> dict[str, Any] | None:
        """The first message as a JSON object within ``auth_timeout``; None (answered, closed)
        when none came or it was not one."""
        try:
            msg = await self.ws.receive(timeout=self.settings.auth_timeout)
        except TimeoutError:
            await self.error(
                'auth: the first message must be {"session_key": ...} '
                f"within {self.settings.auth_timeout:g} s"
            )
            await self.ws.close(code=4401, message=b"auth timeout")
            return None
        if msg.type != WSMsgType.TEXT:
            await self.error("auth: the first message must be a JSON text message with session_key")
            await self.ws.close(code=4401, message=b"auth required")
            return None
        try:
            return json_object(msg.data, "the first message")
        except BadMessage as exc:
            await self.error(f"auth: {exc}")
            await self.ws.close(code=4401, message=b"auth failed")
            return None

    async def _admit(self, data: dict[str, Any]) -> CharacterCount:
        """Verify the key, check the node has room, apply the config, join the session."""
        if not isinstance(data.get("session_key"), str):
            raise ProtocolError('auth: the first message must be {"session_key": "eyJ..."}')
        try:
            claims = await verify_session_key(self.role.context, data["session_key"])
        except SessionRefused as exc:
            raise ProtocolError(f"auth: {exc}") from None
        if self.role.draining:
            raise ProtocolError("node is draining: open a new session through the gateway")
        if len(self.role.streams) >= self.role.capacity:
            raise ServerFull(
                f"server_full: node is at capacity ({self.role.capacity} "
                "streams): open a new session through the gateway"
            )
        if "config" in data:
            self._apply_config(data["config"])
        session = self.role.sessions.attach(claims)
        self.claims, self.session_id, self.session = claims, claims.session_id, session
        # counted before the next await: sockets authenticating at once cannot overfill the node
        self.role.streams.add(self)
        return session

    async def _read(self) -> None:
        while not self.ws.closed:
            timeout = self.expires_at - time.time()
            if timeout <= 0:
                await self.error(
                    'session expired: extend it with {"type": "extend", "session_key": ...}'
                )
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
                data = json_object(msg.data)
                context_id = data.get("context_id")
                if context_id is not None and (
                    not isinstance(context_id, str) or not context_id or len(context_id) > 128
                ):
                    context_id = None
                    raise ProtocolError(
                        "context_id must be a non-empty string of at most 128 characters"
                    )
                await self._handle(data, context_id)
            except (BadMessage, ProtocolError, EngineError) as exc:
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
            raise ProtocolError(
                f"unknown message type {kind!r}: expected text, config, clear or extend"
            )
        elif "text" in data:
            self._accept_text(data, context_id)
        elif "config" in data:
            self._apply_config(data["config"])
            await self.send_json(
                {
                    "type": "config",
                    "voice": self.voice.spec.label,
                    "lang_code": self.voice.spec.lang_code,
                    "speed": self.voice.speed,
                }
            )
        elif "session_key" in data:
            raise ProtocolError(
                'already authenticated: to extend send {"type": "extend", "session_key": ...}'
            )
        else:
            raise ProtocolError(
                'expected {"text": ...}, {"config": ...}, {"type": "clear"} '
                'or {"type": "extend", ...}'
            )

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
            spec = VoiceSpec.parse(
                names,
                lang if lang is not None else (None if voice is not None else base.spec.lang_code),
            )
        speed = check_speed(data["speed"]) if data.get("speed") is not None else base.speed
        return Voice(spec, speed)

    def _apply_config(self, config: Any) -> None:
        if not isinstance(config, dict):
            raise ProtocolError(
                'config must be an object such as {"voice": "af_heart", '
                '"lang_code": "a", "speed": 1.0}'
            )
        unknown = set(config) - {"voice", "lang_code", "speed"}
        if unknown:
            raise ProtocolError(
                f"unknown config key(s) {', '.join(sorted(unknown))}: "
                "expected voice, lang_code, speed"
            )
        self.voice = self._voice_from(config, self.voice)

    def _accept_text(self, data: dict[str, Any], context_id: str | None) -> None:
        text = data.get("text")
        if not isinstance(text, str):
            raise ProtocolError("text must be a string")
        text = text.strip()
        if not text:
            raise ProtocolError("text is empty")
        if len(text) > self.settings.max_text_chars:
            raise ProtocolError(
                f"text is too long: {len(text)} characters, at most "
                f"{self.settings.max_text_chars} per message"
            )
        voice = self._voice_from(data, self.voice)
        chars = len(text)
        session = self.session
        assert session is not None
        if session.reserved + chars > session.limit:
            raise ProtocolError(
                f"character limit reached: this text has {chars} characters, "
                f"{session.remaining()} of the session's {session.limit} remain (shared by "
                "every socket of the session); extend the session"
            )
        if len(self.items) >= self.settings.max_queued_texts:
            raise ProtocolError(
                f"too many queued texts (at most {self.settings.max_queued_texts}): "
                "wait for done or clear"
            )
        if (
            context_id is not None
            and context_id not in {i.context_id for i in self.items}
            and len({i.context_id for i in self.items if i.context_id})
            >= self.settings.max_contexts
        ):
            raise ProtocolError(f"too many open contexts (at most {self.settings.max_contexts})")
        self._seq += 1
        session.reserve(chars)
        self.items.append(Item(self._seq, text, voice, context_id, chars))
        self._changed.set()

    async def _clear(self, context_id: str | None) -> None:
        keep: deque[Item] = deque()
        for item in self.items:
            if context_id is None or item.context_id == context_id:
                item.cancelled = True
                item.frames.clear()
                if not item.synth_started and self.session is not None:
                    self.session.release(item.chars)
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
            raise ProtocolError('extend needs {"type": "extend", "session_key": "eyJ..."}')
        assert self.session is not None
        try:
            claims = await verify_session_key(self.role.context, token)
            self.role.sessions.extend(self.session, claims)
        except SessionRefused as exc:
            raise ProtocolError(f"extend: {exc}") from None
        await self.send_json(
            {
                "type": "extended",
                "expires_in": max(0, int(self.expires_at - time.time())),
                "limit_characters": self.session.limit,
            }
        )

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
                self.session.bill(item.chars)
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

    async def _produce_item(self, engine: Engine, item: Item) -> None:
        """Synthesize ``item`` segment by segment, each only once the buffer has room, re-planning
        the rest of the text after each from the audio really buffered then."""
        segments = await self._plan(
            engine,
            item,
            item.text,
            cut_first=self.buffered_seconds() < 1.0,
            first_words=self.settings.first_clause_words,
            narrow=self._one_thread(),
        )
        resampler = Resampler(engine.sample_rate)
        while segments:
            seg = segments.pop(0)
            if not await self._room_for(item):
                return
            audio, words = await self._synthesize(engine, item, seg)
            if item.cancelled:
                return
            self._append(item, seg, audio, words, resampler, engine.sample_rate)
            if segments:
                segments = await self._plan(
                    engine,
                    item,
                    " ".join(x.text for x in segments),
                    ahead_seconds=self._ahead_seconds(),
                    narrow=self._one_thread(),
                )
        tail = resampler.push(np.zeros(0, dtype=np.float32), last=True)
        item.frames.extend(tail)
        item.produced += len(tail)

    async def _plan(self, engine: Engine, item: Item, text: str, **options: Any) -> list[Segment]:
        """``plan_segments`` off the loop (English phonemizes)."""
        return await asyncio.get_running_loop().run_in_executor(
            None,
            functools.partial(
                plan_segments,
                text,
                item.voice.spec.lang_code,
                engine,
                speed=item.voice.speed,
                lead_seconds=self.settings.lead_frames * FRAME_SECONDS,
                **options,
            ),
        )

    async def _room_for(self, item: Item) -> bool:
        """Wait until the buffer is at most ``lookahead_seconds`` ahead of playback; False when
        the item was cleared meanwhile."""
        while self.buffered_seconds() > self.settings.lookahead_seconds and not item.cancelled:
            self._changed.clear()
            await self._changed.wait()
        return not item.cancelled

    async def _synthesize(
        self, engine: Engine, item: Item, seg: Segment
    ) -> tuple[np.ndarray, list[tuple[str, float]] | None]:
        """One segment through the shared scheduler, due when the buffered audio runs out: its
        audio and its word weights for alignment."""
        spec, speed, align = item.voice.spec, item.voice.speed, self.settings.alignment

        def job(run: Run) -> tuple[np.ndarray, float, Any]:
            t0 = time.perf_counter()
            audio = engine.synthesize(seg.text, spec, speed, run)
            took = time.perf_counter() - t0
            return audio, took, engine.word_weights(seg.text, spec.lang_code) if align else None

        deadline = time.monotonic() + self.buffered_seconds()
        cost = synthesis_cost(engine, seg.text, spec.lang_code, narrow=self._one_thread())
        audio, engine_s, words = await self.role.scheduler.run(job, deadline, cost)
        if item.first_engine_s is None:
            item.first_engine_s = engine_s
        return audio, words

    def _append(
        self,
        item: Item,
        seg: Segment,
        audio: np.ndarray,
        words: list[tuple[str, float]] | None,
        resampler: Resampler,
        rate: int,
    ) -> None:
        """A segment's audio (and the pause its punctuation calls for) as frames of the item;
        its words, if known, as an alignment event due with its first frame."""
        if words:
            self._queue_alignment(item, seg, words, len(audio) / rate)
        if seg.pause_after:
            audio = np.concatenate([audio, np.zeros(int(seg.pause_after * rate), dtype=np.float32)])
        frames = resampler.push(audio)
        item.frames.extend(frames)
        item.produced += len(frames)
        self._changed.set()

    def _ahead_seconds(self) -> float:
        """The audio buffered now, as this stream's share of the workers sees it: a segment slower
        than planned (load) shrinks the next one instead of leaving a gap; a faster engine grows
        them sooner. Streams synthesizing at once share the workers."""
        return self.buffered_seconds() / max(1.0, self._sharing() / self.role.scheduler.workers)

    def _sharing(self) -> int:
        """Streams synthesizing now, this one included."""
        return sum(1 for st in self.role.streams if st.producing)

    def _one_thread(self) -> bool:
        """Plan with the one-thread cost: the scheduler picks a job's threads when it starts, and
        a stream that starts meanwhile makes it one thread (a segment planned for every core,
        then run on one, was a 2 s gap). Alone, the job runs on every core and the buffer grows,
        so the next segments grow."""
        return self.role.scheduler.workers > 1

    @property
    def producing(self) -> bool:
        """This socket's producer is synthesizing a text now."""
        return self._producing is not None

    def _queue_alignment(
        self, item: Item, seg: Segment, words: list[tuple[str, float]], speech_seconds: float
    ) -> None:
        start = item.produced * FRAME_SECONDS
        total = sum(w for _, w in words) or 1.0
        t = start
        out = []
        for word, weight in words:
            d = speech_seconds * weight / total
            out.append({"word": word, "start": round(t, 3), "end": round(t + d, 3)})
            t += d
        item.events.append(
            (
                item.produced,
                item.tag(
                    {"type": "alignment", "text": seg.text, "words": out, "approximate": True}
                ),
            )
        )

    # ------------------------------------------------------------------ player

    async def _wait_changed(self, timeout: float | None = None) -> None:
        self._changed.clear()
        try:
            await asyncio.wait_for(self._changed.wait(), timeout)
        except TimeoutError:
            pass

    async def _play(self) -> None:
        """Send the head item's frames on the audio clock; finish each item (``done``) once its
        synthesis ended and its frames are out."""
        clock = FrameClock(self.settings.lead_frames)
        while True:
            item = self.items[0] if self.items else None
            if item is None:
                clock.stop()  # idle: the next text starts a new run
                await self._wait_changed()
            elif item.cancelled:
                self.items.popleft()
            elif not item.frames:
                await (self._finish(item) if item.synth_done else self._wait_changed())
            else:
                await self._start(item, clock)
                if await self._wait_due(item, clock) and not await self._send_frame(item, clock):
                    return

    async def _start(self, item: Item, clock: FrameClock) -> None:
        """``generating`` before the first frame of an item; its time to first audio when it
        starts a run (nothing was playing)."""
        if item.started:
            return
        item.started = True
        await self.send_json(item.tag({"type": "generating", "text": item.text}))
        if item.first_engine_s is not None and not clock.running:
            self.role.first_audio.append(
                (time.perf_counter() - item.received_at, item.first_engine_s)
            )

    async def _wait_due(self, item: Item, clock: FrameClock) -> bool:
        """Wait for the next frame's time (a ``clear`` cuts it short); False when the item has
        nothing to send any more."""
        now = time.monotonic()
        due, stalled = clock.due(now)
        if stalled:  # texts are queued but the engine fell behind
            self.role.stats["underruns"] += 1
            self.role.stats["stall_seconds"] += stalled
        if due <= now:
            return True
        self._interrupt.clear()
        try:
            await asyncio.wait_for(self._interrupt.wait(), due - now)
        except TimeoutError:
            pass
        return not item.cancelled and bool(item.frames)

    async def _send_frame(self, item: Item, clock: FrameClock) -> bool:
        """The item's next frame, after the events due before it; False once the socket is gone."""
        await self._flush_events(item)
        frame = item.frames.popleft()
        item.played += 1
        clock.sent()
        self.frames_sent += 1
        self._changed.set()  # the producer may be waiting for room
        try:
            await self.ws.send_bytes(frame)
        except (ConnectionError, RuntimeError):
            return False
        return True

    async def _finish(self, item: Item) -> None:
        """An item whose synthesis ended and whose frames are all out: its error, its last
        events and ``done`` (a text that made no audio still gets ``generating`` and ``done``)."""
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

    async def _flush_events(self, item: Item, final: bool = False) -> None:
        while item.events and (final or item.events[0][0] <= item.played):
            _, msg = item.events.popleft()
            await self.send_json(msg)
