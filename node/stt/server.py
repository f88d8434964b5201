"""The STT role: the spec's WebSocket protocol at ``/v1/stream`` (and ``/stream``).

Per connection: a ``config`` within ``config_timeout`` (token verified against the chain's
issuers), ``ready``, then binary PCM16 frames through the front end (VAD, denoise) on worker
threads, utterances through validation, trimming, the routed engine and the hallucination filter
on the engine's pool, results back as ``vad_event`` and ``transcription``. The billing clock of the
token's session runs while a socket is connected; usage goes to the gateway through the agent's
durable outbox, periodically and at the end.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import time
from collections import deque
from dataclasses import replace
from pathlib import Path
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
from aiohttp import WSMsgType, web

from node.models.whisper import gtcrn_path, silero_vad_path
from node.roles import RoleContext
from node.stt.calibration import stream_cost
from node.stt.clock import Clocks, SessionClock
from node.stt.denoise import GTCRNModel
from node.stt.engines import EngineState, EngineUnavailable, ParakeetEngine, WhisperEngine, route
from node.stt.hallucination import filter_text
from node.stt.scheduler import InferencePool, QueueFull
from node.stt.settings import STTSettings, load_settings
from node.stt.stream import FrontEnd, Utterance
from node.stt.trimming import trim
from node.stt.vad import SAMPLE_RATE, SileroModel, VadConfig
from node.stt.validation import ValidationConfig, rms_dbfs, validate
from common import jsonsafe
from common.settings import SettingsError
from registry.tokens import Claims, TokenError

log = logging.getLogger("node.stt")

# what a client may ask as its own end-of-utterance silence (config end_of_utterance_ms)
EOU_RANGE_MS = (100, 5000)


class ProtocolError(Exception):
    def __init__(self, code: str, message: str, fatal: bool = False) -> None:
        self.code, self.fatal = code, fatal
        super().__init__(message)


class Models:
    """Everything loaded once per node and shared by all clients."""

    def __init__(self, settings: STTSettings) -> None:
        s = settings
        self.whisper = WhisperEngine(s.whisper.models, s.whisper.device, s.whisper.compute_type,
                                     s.whisper.cpu_threads, s.whisper.beam_size, s.model_cache,
                                     s.whisper.encoder_window)
        self.parakeet: ParakeetEngine | None = None
        if s.parakeet is not None:
            self.parakeet = ParakeetEngine(s.parakeet.model)
            self.parakeet.load()  # raises EngineUnavailable with what to do
        self.silero = SileroModel(silero_vad_path())
        self.gtcrn = GTCRNModel(gtcrn_path()) if s.denoise else None

    def load(self) -> None:
        self.whisper.load()


class STTRole:
    name = "stt"

    def __init__(self, context: RoleContext, settings: STTSettings | None = None,
                 models: Models | None = None) -> None:
        self.context = context
        self.settings = settings or load_settings(context.settings)
        self.models = models or Models(self.settings)  # ModelMissing: fail at start, clearly
        s = self.settings
        self.vad_config = VadConfig(
            threshold=s.vad.threshold, min_speech_ms=s.vad.min_speech_ms,
            end_of_utterance_ms=s.vad.end_of_utterance_ms, min_silence_ms=s.vad.min_silence_ms,
            adapt_after_s=s.vad.adapt_after_s, max_utterance_s=s.vad.max_utterance_s)
        self.validation = ValidationConfig(
            threshold=s.vad.threshold, min_confidence=s.validation.min_confidence,
            min_speech_ratio=s.validation.min_speech_ratio, min_rms_dbfs=s.validation.min_rms_dbfs)
        self.pools: dict[str, InferencePool] = {}
        self._capacity = context.capacity  # until start() measured it
        self.frontend_pool: ThreadPoolExecutor | None = None
        clock_file = f"stt-clocks-{str(context.keypair.pubkey())[:8]}.sqlite"
        self.clocks = Clocks(Path(context.state_dir) / clock_file if context.state_dir else None)
        self.live: dict[str, Connection] = {}
        self.by_session: dict[str, Connection] = {}
        self.draining = False
        self._ids = itertools.count(1)
        self._usage_task: asyncio.Task[None] | None = None
        self.stats: dict[str, int] = {"finals": 0, "interims": 0, "rejected": 0, "filtered": 0,
                                      "early_started": 0, "early_used": 0}

    # ------------------------------------------------------------ Role interface

    @property
    def capacity(self) -> int:
        return self._capacity

    def load(self) -> int:
        return len(self.live)

    def routes(self, app: web.Application) -> None:
        app.router.add_get("/v1/stream", self.handle)
        app.router.add_get("/stream", self.handle)

    async def start(self) -> None:
        s = self.settings
        self.pools["whisper"] = InferencePool("whisper", s.whisper.workers, s.queue_size,
                                              s.interim_max_utilization)
        if self.models.parakeet is not None:
            self.pools["parakeet"] = InferencePool("parakeet", s.parakeet.workers, s.queue_size,
                                                   s.interim_max_utilization)
        self.frontend_pool = ThreadPoolExecutor(s.frontend_threads, thread_name_prefix="stt-fe")
        await asyncio.get_running_loop().run_in_executor(self.frontend_pool, self.models.load)
        m = self.models
        self._capacity = await self.context.measured_capacity(
            f"whisper:{','.join(s.whisper.models)}:{m.whisper.device}:{m.whisper.compute_type}:"
            f"threads={s.whisper.cpu_threads}:denoise={s.denoise}",
            lambda: stream_cost(m.silero, m.gtcrn, self.vad_config, m.whisper, s.word_timestamps))
        self._usage_task = asyncio.create_task(self._usage_loop())
        log.info("stt ready: whisper %s on %s/%s, denoise %s, capacity %d",
                 ",".join(s.whisper.models), self.models.whisper.device,
                 self.models.whisper.compute_type, s.denoise, self.capacity)

    async def drain(self) -> None:
        self.draining = True

    async def stop(self) -> None:
        self.draining = True
        for conn in list(self.live.values()):
            await conn.close_with("server_shutdown", "node is shutting down")
        if self._usage_task:
            self._usage_task.cancel()
        self._report_all()
        self.clocks.close()
        for pool in self.pools.values():
            pool.shutdown()
        if self.frontend_pool:
            self.frontend_pool.shutdown(wait=False, cancel_futures=True)

    # ------------------------------------------------------------ usage

    def report(self, clock: SessionClock, complete: bool = False) -> None:
        if clock.completed:
            return
        used = round(min(clock.used(), clock.limit), 3)
        if not complete and used == clock.last_reported:
            return
        clock.last_reported = used
        clock.completed = complete
        self.clocks.save(clock, used)
        self.context.outbox.report_usage(clock.session_id, complete, duration_seconds=used)

    def _report_all(self) -> None:
        for clock in list(self.clocks.sessions.values()):
            self.report(clock, complete=clock.remaining() <= 0)

    async def _usage_loop(self) -> None:
        while True:
            await asyncio.sleep(self.settings.usage_report_interval)
            now = time.time()
            for sid, clock in list(self.clocks.sessions.items()):
                if clock.connected_since is not None:
                    self.report(clock)
                elif clock.expires_at < now or clock.remaining() <= 0:
                    self.report(clock, complete=True)  # nobody came back before expiry: settle
                    del self.clocks.sessions[sid]

    # ------------------------------------------------------------ routing

    def choose_engine(self, force_model: str | None, language: str) -> str:
        whisper_pool = self.pools.get("whisper")
        parakeet_pool = self.pools.get("parakeet")
        parakeet = EngineState(parakeet_pool is not None and self.models.parakeet is not None,
                               bool(parakeet_pool and parakeet_pool.busy),
                               self.models.parakeet.languages if self.models.parakeet else None)
        whisper = EngineState(True, bool(whisper_pool and whisper_pool.busy))
        return route(force_model, language, parakeet, whisper)

    def engine(self, name: str):
        return self.models.parakeet if name == "parakeet" else self.models.whisper

    def supports(self, language: str) -> bool:
        if self.models.whisper.supports(language):
            return True
        return bool(self.models.parakeet and self.models.parakeet.supports(language))

    # ------------------------------------------------------------ the pipeline after the front end

    def transcribe(self, utt: Utterance, language: str, engine_name: str) -> dict[str, Any] | None:
        """Stages 3-6 for one utterance; blocking (an engine thread). None: nothing to say."""
        verdict = validate(utt.audio, utt.probs, self.validation)
        if not verdict.ok:
            if utt.final:
                self.stats["rejected"] += 1
                log.debug("utterance %d rejected: %s", utt.uid, verdict.reason)
            return None
        audio, offset = trim(utt.audio, utt.probs, self.vad_config.threshold,
                             self.settings.vad.speech_pad_ms)
        engine = self.engine(engine_name)
        words = utt.final and self.settings.word_timestamps
        result = engine.transcribe(audio, language, word_timestamps=words)
        filtered = filter_text(result.text, len(audio) / SAMPLE_RATE, rms_dbfs(audio),
                               verdict.speech_seconds)
        if filtered.text is None:
            if utt.final:
                self.stats["filtered"] += 1
                log.debug("utterance %d filtered (%s): %r", utt.uid, filtered.reason, result.text)
            return None
        t0 = (utt.start + offset) / SAMPLE_RATE
        msg: dict[str, Any] = {
            "type": "transcription", "text": filtered.text, "language": result.language,
            "is_final": utt.final, "latency_ms": 0.0,
            "start": round(t0, 3), "end": round(t0 + len(audio) / SAMPLE_RATE, 3),
            "confidence": result.confidence, "engine": result.engine, "model": result.model,
        }
        if words:
            msg["words"] = [{"word": w.word, "start": round(t0 + w.start, 3),
                             "end": round(t0 + w.end, 3), "confidence": round(w.probability, 3)}
                            for w in result.words]
        return msg

    # ------------------------------------------------------------ WebSocket

    async def handle(self, request: web.Request) -> web.StreamResponse:
        ws = web.WebSocketResponse(heartbeat=30, max_msg_size=1 << 20)
        await ws.prepare(request)
        conn = Connection(self, ws, str(next(self._ids)))
        try:
            await conn.run()
        finally:
            await conn.cleanup()
        return ws


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
        self.dropped = 0.0   # audio seconds refused

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
    def __init__(self, role: STTRole, ws: web.WebSocketResponse, client_id: str) -> None:
        self.role, self.ws, self.client_id = role, ws, client_id
        self.settings = role.settings
        self.clock: SessionClock | None = None
        self.language = "en"
        self.force_model: str | None = None
        self.frontend: FrontEnd | None = None
        # bounded: a front end that falls behind stops the socket reads, not the node's memory
        self.audio_in: asyncio.Queue[tuple[str, Any]] = asyncio.Queue(
            maxsize=self.settings.audio_queue_frames)
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
        self.tasks = [asyncio.create_task(self._frontend_loop()),
                      asyncio.create_task(self._infer_loop()),
                      asyncio.create_task(self._expiry_loop())]
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
                await self.close_with("config_timeout",
                                      f"no config within {self.settings.config_timeout:g}s")
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
                    raise ProtocolError("not_configured",
                                        f"the first message must be a config, not {kind!r}")
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
                self.clock.disconnect()
            role.report(self.clock, complete=self.clock.remaining() <= 0)
        if not self.ws.closed:
            await self.ws.close()

    # ------------------------------------------------------------ messages

    @staticmethod
    def _parse(text: str) -> dict[str, Any]:
        try:
            data = jsonsafe.loads(text)
        except ValueError as exc:
            raise ProtocolError("invalid_json",
                                f"text messages must be JSON objects in UTF-8: {exc}") from None
        if not isinstance(data, dict):
            raise ProtocolError("invalid_json", "text messages must be JSON objects")
        return data

    async def _verify(self, token: Any, fatal: bool = True) -> Claims:
        """A refused first key closes the socket; a refused extend leaves the session as it was."""
        if not isinstance(token, str) or not token:
            raise ProtocolError("invalid_token", "session_key is required", fatal=fatal)
        try:
            claims = await self.role.context.verify(token)
        except TokenError as exc:
            # A key routed to another node has a code of its own: the client should ask the
            # gateway again rather than retry here.
            code = "wrong_node" if exc.code == "wrong_node" else "invalid_token"
            raise ProtocolError(code, f"{exc.code}: {exc}", fatal=fatal) from None
        if not claims.limit:
            raise ProtocolError("invalid_token", "the token grants no STT seconds", fatal=fatal)
        return claims

    def _options(self, data: dict[str, Any]) -> tuple[str, str | None, VadConfig]:
        language = data.get("language", self.language if self.clock else "en")
        if not isinstance(language, str) or not language:
            raise ProtocolError("invalid_config", "language must be a language code or 'auto'")
        language = language.lower()
        model = data.get("model", self.force_model if self.clock else None)
        if model is not None and model not in ("whisper", "parakeet"):
            raise ProtocolError("invalid_config", f"model {model!r}: use 'whisper' or leave it out")
        if not self.role.supports(language):
            raise ProtocolError("unsupported_language",
                                f"no engine on this node transcribes {language!r}")
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
            raise ProtocolError("invalid_config", f"end_of_utterance_ms {eou!r}: give a number "
                                f"of milliseconds from {lo} to {hi}, or leave it out")
        eou = float(eou)
        return replace(base, end_of_utterance_ms=eou, min_silence_ms=min(base.min_silence_ms, eou))

    async def _first_config(self, data: dict[str, Any]) -> None:
        claims = await self._verify(data.get("session_key"))
        language, model, vad = self._options(data)
        role = self.role
        clock = role.clocks.get_or_create(claims.session_id, claims.limit, claims.expires_at)
        if clock.completed or clock.remaining() <= 0:
            raise ProtocolError("session_expired", "this session has no time left", fatal=True)
        previous = role.by_session.get(claims.session_id)
        if previous is None and len(role.live) >= role.capacity:
            raise ProtocolError("server_full", "Server at capacity", fatal=True)
        if role.draining:
            raise ProtocolError("draining", "node is draining", fatal=True)
        if previous is not None:  # a reconnect while the old socket lingers: the new one wins
            role.by_session.pop(claims.session_id, None)
            previous.clock = None
            clock.disconnect()
            await previous.close_with("session_taken_over", "a newer connection took this session")
        self.clock = clock
        role.live[self.client_id] = self
        role.by_session[claims.session_id] = self
        clock.connect()
        self.language, self.force_model = language, model
        self.frontend = FrontEnd(role.models.silero, role.models.gtcrn, vad,
                                 self.settings.vad.speech_pad_ms,
                                 self.settings.interim_interval_ms
                                 if self.settings.interim_results else None,
                                 self.settings.speculative_finals)
        await self._ready()

    async def _ready(self) -> None:
        assert self.clock is not None
        engine = self.role.choose_engine(self.force_model, self.language)
        await self.send({"type": "ready", "client_id": self.client_id, "language": self.language,
                         "remaining_seconds": round(self.clock.remaining(), 1),
                         "session_id": self.clock.session_id, "engine": engine,
                         "model": self.role.engine(engine).model_name(self.language)
                         if engine == "whisper" else engine})

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
            await self.send({"type": "session_extended",
                             "remaining_seconds": round(self.clock.remaining(), 1)})
        else:
            raise ProtocolError("unknown_type", f"unknown message type {kind!r}")

    def _extend(self, claims: Claims) -> None:
        assert self.clock is not None
        if claims.session_id != self.clock.session_id:
            raise ProtocolError("invalid_token", "the new session_key is for another session")
        self.clock.extend(float(claims.limit or 0), float(claims.expires_at))

    def _clear(self) -> None:
        self.generation += 1
        self.jobs.clear()
        self.spec = None
        self.spec_for.clear()
        while not self.audio_in.empty():
            self.audio_in.get_nowait()
        self.audio_in.put_nowait(("reset", None))  # fits: the queue was just emptied

    async def _audio(self, data: bytes) -> None:
        if len(data) == 0 or len(data) % 2:
            await self.error("bad_audio",
                             f"a PCM16 frame has an even number of bytes, got {len(data)}")
            return
        max_bytes = int(self.settings.max_frame_ms * SAMPLE_RATE / 1000) * 2
        if len(data) > max_bytes:
            await self.error("bad_audio", f"frame of {len(data)} bytes is over "
                             f"{self.settings.max_frame_ms:g} ms ({max_bytes} bytes); "
                             "send 20-100 ms")
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
            await self.error("rate_limited",
                             f"audio is arriving faster than real time (more than "
                             f"{self.budget.burst:g} s ahead); frames are dropped until it "
                             "slows down: send audio at its own pace")
        return False

    # ------------------------------------------------------------ loops

    async def _frontend_loop(self) -> None:
        loop = asyncio.get_running_loop()
        fe = self.frontend
        assert fe is not None
        while True:
            kind, payload = await self.audio_in.get()
            if kind == "reset":
                await loop.run_in_executor(self.role.frontend_pool, fe.reset)
                continue
            generation = self.generation
            if kind == "flush":
                out = await loop.run_in_executor(self.role.frontend_pool, fe.flush, payload)
            else:
                chunks, received = [payload[0]], payload[1]
                while not self.audio_in.empty() and len(chunks) < 50:
                    nxt = self.audio_in._queue[0]  # type: ignore[attr-defined]
                    if nxt[0] != "audio":
                        break
                    self.audio_in.get_nowait()
                    chunks.append(nxt[1][0])
                    received = nxt[1][1]
                audio = chunks[0] if len(chunks) == 1 else np.concatenate(chunks)
                out = await loop.run_in_executor(self.role.frontend_pool, fe.feed, audio, received)
            if generation != self.generation:
                continue
            for utt in out.utterances:  # before any await: partials older than a final are stale
                if utt.final and not utt.speculative:
                    self.final_uid = max(self.final_uid, utt.uid)
            for event, sample in out.events:
                await self.send({"type": "vad_event", "event": event, "timestamp": time.time(),
                                 "audio_time": round(sample / SAMPLE_RATE, 3)})
            for utt in out.utterances:
                if utt.speculative:
                    self._speculate(utt)
                    continue
                if utt.final:
                    log.debug("client %s: final %s, early %s", self.client_id, utt.key,
                              self.spec and self.spec[0])
                if utt.final and self.spec is not None and self.spec[0] == utt.key:
                    self.spec_for[utt.uid] = self.spec[1]  # the early run had the same audio
                    self.spec = None
                if utt.final:  # a final supersedes interims of the same speech still waiting
                    while self.jobs and not self.jobs[-1].final:
                        self.jobs.pop()
                elif any(not j.final for j in self.jobs):
                    continue  # one interim waiting is enough
                self.jobs.append(utt)
                self.jobs_ready.set()

    def _speculate(self, utt: Utterance) -> None:
        """Start the final's inference early (only when an engine is idle); see stream.py."""
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
        while True:
            await self.jobs_ready.wait()
            if not self.jobs:
                self.jobs_ready.clear()
                continue
            utt = self.jobs.popleft()
            generation = self.generation
            engine = self.role.choose_engine(self.force_model, self.language)
            pool = self.role.pools[engine]
            try:
                early = None
                spec = self.spec_for.pop(utt.uid, None)
                if spec is not None:
                    try:
                        early = await spec
                    except Exception:
                        early = None
                if early is not None:
                    msg = early[1]
                    self.role.stats["early_used"] += 1
                else:
                    msg = await pool.run(self.role.transcribe, utt, self.language, engine,
                                         interim=not utt.final)
            except QueueFull as exc:
                await self.error("server_full", f"inference queue full, utterance dropped ({exc})")
                continue
            except EngineUnavailable as exc:
                await self.error("engine_unavailable", str(exc))
                continue
            except Exception:
                log.exception("transcription failed")
                await self.error("internal_error", "transcription failed")
                continue
            if msg is None or generation != self.generation:
                continue
            if not utt.final and utt.uid < self.final_uid:
                continue  # the final of this speech is already due: skip a stale partial
            msg["latency_ms"] = round((time.monotonic() - utt.received_at) * 1000, 1)
            self.role.stats["finals" if utt.final else "interims"] += 1
            await self.send(msg)

    async def _expiry_loop(self) -> None:
        warnings = sorted(self.settings.expiry_warnings, reverse=True)
        while self.clock is not None:
            clock = self.clock
            if clock.remaining() <= 0:
                await self.send({"type": "session_expired", "session_id": clock.session_id})
                self.role.report(clock, complete=True)
                await self.ws.close()
                return
            due = clock.due_warning(warnings)
            if due is not None:
                await self.send({"type": "session_expiring",
                                 "remaining_seconds": round(clock.remaining())})
            await asyncio.sleep(0.2)


def create_role(context: RoleContext) -> STTRole:
    """The plug-in entry point; a bad config or a missing model is a ConfigError naming the fix."""
    from node.models.whisper import ModelMissing

    try:
        return STTRole(context)
    except (ModelMissing, EngineUnavailable) as exc:
        raise SettingsError(f"stt: {exc}") from None
