"""One client WebSocket of the STT role (a :class:`Connection`): the spec's protocol.

Per connection: a ``config`` within ``config_timeout`` (the session key verified against the
chain's issuers, ``node.session``), ``ready``, then binary PCM16 frames through the front end (VAD,
denoise) on worker threads, utterances through the role's pipeline on the engine's pool, results
back as ``vad_event`` and ``transcription``. The session's billing clock runs while a socket is
connected; ``session_expiring`` warns as its time runs out, ``session_expired`` ends it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from typing import Any, Protocol

import numpy as np
from aiohttp import WSMsgType, web

from node.protocol import BadMessage, json_object
from node.roles import RoleContext
from node.session import SessionRefused, Sessions, verify_session_key
from node.stt.clock import SessionClock
from node.stt.engines import EngineUnavailable
from node.stt.frontend import FrontEnd, FrontEndOutput, Utterance
from node.stt.models import Models
from node.stt.scheduler import InferencePool, QueueFull
from node.stt.settings import STTSettings
from node.stt.vad import SAMPLE_RATE, VadConfig
from registry.tokens import Claims

log = logging.getLogger("node.stt")

# what a client may ask as its own end-of-utterance silence (config end_of_utterance_ms)
EOU_RANGE_MS = (100, 5000)


class ProtocolError(Exception):
    def __init__(self, code: str, message: str, fatal: bool = False) -> None:
        self.code, self.fatal = code, fatal
        super().__init__(message)


class RoleView(Protocol):
    """What a connection uses of its role (``node.stt.role.STTRole``): the shared models, pools
    and pipeline, the live connections and the token sessions."""

    context: RoleContext
    settings: STTSettings
    models: Models
    vad_config: VadConfig
    pools: dict[str, InferencePool]
    frontend_pool: ThreadPoolExecutor | None
    sessions: Sessions[SessionClock]
    live: dict[str, Connection]
    by_session: dict[str, Connection]
    draining: bool
    stats: dict[str, int]

    @property
    def capacity(self) -> int: ...

    def choose_engine(self, force_model: str | None, language: str) -> str: ...

    def engine(self, name: str) -> Any: ...

    def supports(self, language: str) -> bool: ...

    def transcribe(
        self, utt: Utterance, language: str, engine_name: str
    ) -> dict[str, Any] | None: ...


class RealtimeBudget:
    """A token bucket of audio seconds: real time refills it, up to ``burst`` seconds ahead.

    A client streaming live audio never empties it; one sending faster than real time gets
    ``burst`` seconds ahead and then only real time, so the transcriber never does more work
    than the session pays for, however fast frames arrive."""

    def __init__(self, burst: float, now: float | None = None) -> None:
        self.burst = burst
        self.tokens = burst
        self.at = time.monotonic() if now is None else now
        self.accepted = 0.0  # audio seconds let through
        self.dropped = 0.0  # audio seconds refused

    def take(self, seconds: float, now: float | None = None) -> bool:
        now = time.monotonic() if now is None else now
        self.tokens = min(self.burst, self.tokens + (now - self.at))
        self.at = now
        if seconds > self.tokens:
            self.dropped += seconds
            return False
        self.tokens -= seconds
        self.accepted += seconds
        return True


class Connection:
    def __init__(self, role: RoleView, ws: web.WebSocketResponse, client_id: str) -> None:
        self.role, self.ws, self.client_id = role, ws, client_id
        self.settings = role.settings
        self.clock: SessionClock | None = None
        self.language = "en"
        self.force_model: str | None = None
        self.frontend: FrontEnd | None = None
        # bounded: a front end that falls behind stops the socket reads, not the node's memory
        self.audio_in: asyncio.Queue[tuple[str, Any]] = asyncio.Queue(
            maxsize=self.settings.audio_queue_frames
        )
        self._held: tuple[str, Any] | None = None  # taken off audio_in while batching frames
        self.budget = RealtimeBudget(self.settings.burst_seconds)
        self.rate_limited = False  # a rate_limited error was sent and the client did not slow down
        self.jobs: deque[Utterance] = deque()
        self.jobs_ready = asyncio.Event()
        self.tasks: list[asyncio.Task[Any]] = []
        self.send_lock = asyncio.Lock()
        self.closed = False
        self.generation = 0  # bumped by reset/config: results of older audio are dropped
        self.spec: tuple[Any, asyncio.Task[Any]] | None = None  # the early final in flight
        self.spec_for: dict[int, asyncio.Task[Any]] = {}
        self.final_uid = 0  # uid of the newest final the front end produced

    # ------------------------------------------------------------ sending

    async def send(self, msg: dict[str, Any]) -> None:
        if self.ws.closed:
            return
        async with self.send_lock:
            try:
                await self.ws.send_str(json.dumps(msg))
            except (ConnectionError, RuntimeError):
                pass

    async def error(self, code: str, message: str) -> None:
        await self.send({"type": "error", "error": code, "message": message})

    async def close_with(self, code: str, message: str) -> None:
        await self.error(code, message)
        await self.ws.close()

    # ------------------------------------------------------------ life

    async def run(self) -> None:
        if self.role.draining:
            await self.close_with("draining", "node is draining; ask the gateway for another")
            return
        if not await self._await_config():
            return
        self.tasks = [
            asyncio.create_task(self._frontend_loop()),
            asyncio.create_task(self._infer_loop()),
            asyncio.create_task(self._expiry_loop()),
        ]
        async for msg in self.ws:
            if msg.type == WSMsgType.BINARY:
                await self._audio(msg.data)
            elif msg.type == WSMsgType.TEXT:
                try:
                    await self._text(msg.data)
                except ProtocolError as exc:
                    if exc.fatal:
                        await self.close_with(exc.code, str(exc))
                        break
                    await self.error(exc.code, str(exc))
            elif msg.type == WSMsgType.ERROR:
                break

    async def _await_config(self) -> bool:
        deadline = time.monotonic() + self.settings.config_timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                await self.close_with(
                    "config_timeout", f"no config within {self.settings.config_timeout:g}s"
                )
                return False
            try:
                msg = await self.ws.receive(timeout=left)
            except TimeoutError:
                continue
            if msg.type in (WSMsgType.CLOSE, WSMsgType.CLOSING, WSMsgType.CLOSED, WSMsgType.ERROR):
                return False
            if msg.type == WSMsgType.BINARY:
                await self.error("not_configured", "send a config message before audio")
                continue
            try:
                data = self._parse(msg.data)
                if data.get("type") != "config":
                    kind = data.get("type")
                    raise ProtocolError(
                        "not_configured", f"the first message must be a config, not {kind!r}"
                    )
                await self._first_config(data)
                return True
            except ProtocolError as exc:
                if exc.fatal:
                    await self.close_with(exc.code, str(exc))
                    return False
                await self.error(exc.code, str(exc))

    async def cleanup(self) -> None:
        self.closed = True
        spec = [self.spec[1]] if self.spec else []
        for task in self.tasks + spec + list(self.spec_for.values()):
            task.cancel()
        for task in self.tasks:
            try:
                await task
            except (asyncio.CancelledError, Exception):
                pass
        role = self.role
        if role.live.get(self.client_id) is self:
            del role.live[self.client_id]
        if self.clock is not None:
            if role.by_session.get(self.clock.session_id) is self:
                del role.by_session[self.clock.session_id]
            role.sessions.detach(self.clock)
        if not self.ws.closed:
            await self.ws.close()

    # ------------------------------------------------------------ messages

    @staticmethod
    def _parse(text: str) -> dict[str, Any]:
        try:
            return json_object(text, "a text message")
        except BadMessage as exc:
            raise ProtocolError(
                "invalid_json", f"{exc} (text messages are JSON objects in UTF-8)"
            ) from None

    async def _verify(self, token: Any, fatal: bool = True) -> Claims:
        """A refused first key closes the socket; a refused extend leaves the session as it was."""
        try:
            return await verify_session_key(self.role.context, token)
        except SessionRefused as exc:
            raise ProtocolError(exc.code, str(exc), fatal=fatal) from None

    def _options(self, data: dict[str, Any]) -> tuple[str, str | None, VadConfig]:
        language = data.get("language", self.language if self.clock else "en")
        if not isinstance(language, str) or not language:
            raise ProtocolError("invalid_config", "language must be a language code or 'auto'")
        language = language.lower()
        model = data.get("model", self.force_model if self.clock else None)
        if model is not None and model not in ("whisper", "parakeet"):
            raise ProtocolError("invalid_config", f"model {model!r}: use 'whisper' or leave it out")
        if not self.role.supports(language):
            raise ProtocolError(
                "unsupported_language", f"no engine on this node transcribes {language!r}"
            )
        return language, model, self._vad_options(data)

    def _vad_options(self, data: dict[str, Any]) -> VadConfig:
        """The client's own end-of-utterance silence (``end_of_utterance_ms``), if it asks: an
        agent that prepares its answer while it waits out a pause wants ``speech_end`` early;
        dictation wants it late. Bounded so that no client turns the VAD into a per-frame
        event source."""
        base = self.frontend.vad_config if self.frontend is not None else self.role.vad_config
        eou = data.get("end_of_utterance_ms")
        if eou is None:
            return base
        lo, hi = EOU_RANGE_MS
        if isinstance(eou, bool) or not isinstance(eou, (int, float)) or not lo <= eou <= hi:
            raise ProtocolError(
                "invalid_config",
                f"end_of_utterance_ms {eou!r}: give a number "
                f"of milliseconds from {lo} to {hi}, or leave it out",
            )
        eou = float(eou)
        return replace(base, end_of_utterance_ms=eou, min_silence_ms=min(base.min_silence_ms, eou))

    async def _first_config(self, data: dict[str, Any]) -> None:
        claims = await self._verify(data.get("session_key"))
        language, model, vad = self._options(data)
        role = self.role
        previous = role.by_session.get(claims.session_id)
        if previous is None and len(role.live) >= role.capacity:
            raise ProtocolError("server_full", "Server at capacity", fatal=True)
        if role.draining:
            raise ProtocolError("draining", "node is draining", fatal=True)
        clock = self._attach(claims)
        if previous is not None:  # a reconnect while the old socket lingers: the new one wins
            role.by_session.pop(claims.session_id, None)
            await previous.close_with("session_taken_over", "a newer connection took this session")
        self.clock = clock
        role.live[self.client_id] = self
        role.by_session[claims.session_id] = self
        self.language, self.force_model = language, model
        self.frontend = FrontEnd(
            role.models.silero,
            role.models.gtcrn,
            vad,
            self.settings.vad.speech_pad_ms,
            self.settings.interim_interval_ms if self.settings.interim_results else None,
            self.settings.speculative_finals,
        )
        await self._ready()

    def _attach(self, claims: Claims) -> SessionClock:
        """The session's clock, running while this socket is open; a settled session, or one
        with no time left, is refused with ``session_expired``."""
        try:
            clock = self.role.sessions.attach(claims)
        except SessionRefused as exc:
            raise ProtocolError("session_expired", str(exc), fatal=True) from None
        if clock.remaining() <= 0:
            self.role.sessions.detach(clock)
            raise ProtocolError("session_expired", "this session has no time left", fatal=True)
        return clock

    async def _ready(self) -> None:
        assert self.clock is not None
        engine = self.role.choose_engine(self.force_model, self.language)
        await self.send(
            {
                "type": "ready",
                "client_id": self.client_id,
                "language": self.language,
                "remaining_seconds": round(self.clock.remaining(), 1),
                "session_id": self.clock.session_id,
                "engine": engine,
                "model": self.role.engine(engine).model_name(self.language)
                if engine == "whisper"
                else engine,
            }
        )

    async def _text(self, text: str) -> None:
        data = self._parse(text)
        kind = data.get("type")
        if kind == "ping":
            await self.send({"type": "pong", "timestamp": time.time()})
        elif kind == "flush":
            await self.audio_in.put(("flush", time.monotonic()))
        elif kind == "reset":
            self._clear()
        elif kind == "config":
            language, model, vad = self._options(data)
            if data.get("session_key") is not None:
                claims = await self._verify(data["session_key"], fatal=False)
                self._extend(claims)
            self.language, self.force_model = language, model
            self._clear()
            if self.frontend is not None:
                self.frontend.configure(vad)
            await self._ready()
        elif kind == "extend":
            claims = await self._verify(data.get("session_key"), fatal=False)
            self._extend(claims)
            assert self.clock is not None
            await self.send(
                {"type": "session_extended", "remaining_seconds": round(self.clock.remaining(), 1)}
            )
        else:
            raise ProtocolError("unknown_type", f"unknown message type {kind!r}")

    def _extend(self, claims: Claims) -> None:
        assert self.clock is not None
        try:
            self.role.sessions.extend(self.clock, claims)
        except SessionRefused as exc:
            raise ProtocolError(exc.code, str(exc)) from None

    def _clear(self) -> None:
        self.generation += 1
        self.jobs.clear()
        self.spec = None
        self.spec_for.clear()
        self._held = None
        while not self.audio_in.empty():
            self.audio_in.get_nowait()
        self.audio_in.put_nowait(("reset", None))  # fits: the queue was just emptied

    async def _audio(self, data: bytes) -> None:
        if len(data) == 0 or len(data) % 2:
            await self.error(
                "bad_audio", f"a PCM16 frame has an even number of bytes, got {len(data)}"
            )
            return
        max_bytes = int(self.settings.max_frame_ms * SAMPLE_RATE / 1000) * 2
        if len(data) > max_bytes:
            await self.error(
                "bad_audio",
                f"frame of {len(data)} bytes is over "
                f"{self.settings.max_frame_ms:g} ms ({max_bytes} bytes); "
                "send 20-100 ms",
            )
            return
        if not await self._within_budget(len(data) / 2 / SAMPLE_RATE):
            return
        audio = np.frombuffer(data, dtype="<i2").astype(np.float32) / 32768.0
        await self.audio_in.put(("audio", (audio, time.monotonic())))

    async def _within_budget(self, seconds: float) -> bool:
        """Real time plus ``burst_seconds``: past it a frame is dropped, and the client hears
        once (not per frame) until it has slowed down to half a burst of headroom again."""
        if self.budget.take(seconds):
            if self.rate_limited and self.budget.tokens >= self.budget.burst / 2:
                self.rate_limited = False
            return True
        if not self.rate_limited:
            self.rate_limited = True
            await self.error(
                "rate_limited",
                f"audio is arriving faster than real time (more than "
                f"{self.budget.burst:g} s ahead); frames are dropped until it "
                "slows down: send audio at its own pace",
            )
        return False

    # ------------------------------------------------------------ loops

    async def _frontend_loop(self) -> None:
        """Audio through the front end on its threads (frames that queued up meanwhile in one
        call), its VAD events and utterances on to the client and the inference loop."""
        fe = self.frontend
        assert fe is not None
        while True:
            kind, payload = await self._next_input()
            if kind == "reset":
                await self._in_frontend(fe.reset)
                continue
            generation = self.generation
            if kind == "flush":
                out = await self._in_frontend(fe.flush, payload)
            else:
                out = await self._in_frontend(fe.feed, *self._batch(payload))
            if generation == self.generation:  # else a reset/config came: the output is stale
                await self._dispatch(out)

    async def _next_input(self) -> tuple[str, Any]:
        if self._held is not None:
            item, self._held = self._held, None
            return item
        return await self.audio_in.get()

    def _batch(self, first: tuple[np.ndarray, float]) -> tuple[np.ndarray, float]:
        """The audio of ``first`` and of the frames queued right behind it (at most 50), and when
        the last of them arrived. A flush or reset behind them is held for the next round."""
        chunks, received = [first[0]], first[1]
        while len(chunks) < 50:
            try:
                kind, payload = self.audio_in.get_nowait()
            except asyncio.QueueEmpty:
                break
            if kind != "audio":
                self._held = (kind, payload)
                break
            chunks.append(payload[0])
            received = payload[1]
        return (chunks[0] if len(chunks) == 1 else np.concatenate(chunks)), received

    async def _in_frontend(self, fn: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self.role.frontend_pool, fn, *args)

    async def _dispatch(self, out: FrontEndOutput) -> None:
        for utt in out.utterances:  # before any await: partials older than a final are stale
            if utt.final and not utt.speculative:
                self.final_uid = max(self.final_uid, utt.uid)
        for event, sample in out.events:
            await self.send(
                {
                    "type": "vad_event",
                    "event": event,
                    "timestamp": time.time(),
                    "audio_time": round(sample / SAMPLE_RATE, 3),
                }
            )
        for utt in out.utterances:
            if utt.speculative:
                self._speculate(utt)
            else:
                self._queue(utt)

    def _queue(self, utt: Utterance) -> None:
        """An utterance for the inference loop: a final supersedes the interims of the same
        speech still waiting (and takes over its early run, if one had the same audio); one
        interim waiting is enough."""
        if utt.final:
            log.debug(
                "client %s: final %s, early %s", self.client_id, utt.key, self.spec and self.spec[0]
            )
            if self.spec is not None and self.spec[0] == utt.key:
                self.spec_for[utt.uid] = self.spec[1]  # the early run had the same audio
                self.spec = None
            while self.jobs and not self.jobs[-1].final:
                self.jobs.pop()
        elif any(not j.final for j in self.jobs):
            return
        self.jobs.append(utt)
        self.jobs_ready.set()

    def _speculate(self, utt: Utterance) -> None:
        """Start the final's inference early (only when an engine is idle); see frontend.py."""
        engine = self.role.choose_engine(self.force_model, self.language)
        pool = self.role.pools[engine]
        # waiting behind a running call is fine (the final would too), behind a queue is not
        if pool.waiting or not self.settings.speculative_finals:
            log.debug("client %s: no early final (engine queue)", self.client_id)
            return
        log.debug("client %s: early final for %s", self.client_id, utt.key)
        role, language = self.role, self.language

        def work() -> tuple[str, dict[str, Any] | None]:
            return engine, role.transcribe(utt, language, engine)

        self.spec = (utt.key, asyncio.create_task(pool.run(work)))
        self.role.stats["early_started"] += 1

    async def _infer_loop(self) -> None:
        """Queued utterances through the routed engine, one at a time; results of audio a
        reset/config dropped, and partials a final of the same speech overtook, are not sent."""
        while True:
            await self.jobs_ready.wait()
            if not self.jobs:
                self.jobs_ready.clear()
                continue
            utt = self.jobs.popleft()
            generation = self.generation
            msg = await self._transcribe(utt)
            if msg is None or generation != self.generation:
                continue
            if not utt.final and utt.uid < self.final_uid:
                continue  # the final of this speech is already due: skip a stale partial
            msg["latency_ms"] = round((time.monotonic() - utt.received_at) * 1000, 1)
            self.role.stats["finals" if utt.final else "interims"] += 1
            await self.send(msg)

    async def _transcribe(self, utt: Utterance) -> dict[str, Any] | None:
        """The utterance's message: from its early run if one had the same audio, else from the
        engine's pool. A failure is answered to the client (the stream goes on): None."""
        engine = self.role.choose_engine(self.force_model, self.language)
        try:
            early = await self._early_result(utt)
            if early is not None:
                self.role.stats["early_used"] += 1
                return early[1]
            return await self.role.pools[engine].run(
                self.role.transcribe, utt, self.language, engine, interim=not utt.final
            )
        except QueueFull as exc:
            await self.error("server_full", f"inference queue full, utterance dropped ({exc})")
        except EngineUnavailable as exc:
            await self.error("engine_unavailable", str(exc))
        except Exception:
            log.exception("transcription failed")
            await self.error("internal_error", "transcription failed")
        return None

    async def _early_result(self, utt: Utterance) -> tuple[str, dict[str, Any] | None] | None:
        """The early run of this final (``_speculate``), if one ran and did not fail."""
        spec = self.spec_for.pop(utt.uid, None)
        if spec is None:
            return None
        try:
            return await spec
        except Exception:
            return None

    async def _expiry_loop(self) -> None:
        warnings = sorted(self.settings.expiry_warnings, reverse=True)
        while self.clock is not None:
            clock = self.clock
            if clock.remaining() <= 0:
                await self.send({"type": "session_expired", "session_id": clock.session_id})
                self.role.sessions.report(clock, complete=True)
                await self.ws.close()
                return
            due = clock.due_warning(warnings)
            if due is not None:
                await self.send(
                    {"type": "session_expiring", "remaining_seconds": round(clock.remaining())}
                )
            await asyncio.sleep(0.2)
