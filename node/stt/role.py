"""The STT role (``create_role``): the spec's WebSocket protocol at ``/v1/stream`` (``/stream``).

The role holds what every client shares: the models (loaded once), the inference pools, the front
end's threads, the engine routing, the pipeline after the front end (validation, trimming, the
engine, the hallucination filter: :meth:`STTRole.transcribe`) and the token sessions, whose
billing clocks (``node.stt.clock``) report usage to the gateway through the agent's durable outbox
(``node.session``), periodically and when a session settles. One :class:`Connection` per socket
(``node.stt.connection``).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from aiohttp import web

from common.settings import SettingsError
from node.capacity import usable_cores
from node.models.whisper import ModelMissing
from node.roles import RoleContext
from node.session import Sessions
from node.stt.calibration import stream_cost
from node.stt.clock import SessionClock
from node.stt.connection import Connection
from node.stt.engines import EngineState, EngineUnavailable, route
from node.stt.frontend import Utterance
from node.stt.hallucination import filter_text
from node.stt.models import Models
from node.stt.scheduler import InferencePool
from node.stt.settings import STTSettings, load_settings
from node.stt.trimming import trim
from node.stt.vad import SAMPLE_RATE, VadConfig
from node.stt.validation import ValidationConfig, rms_dbfs, validate

log = logging.getLogger("node.stt")


class STTRole:
    name = "stt"

    def __init__(
        self,
        context: RoleContext,
        settings: STTSettings | None = None,
        models: Models | None = None,
    ) -> None:
        self.context = context
        self.settings = settings or load_settings(context.settings)
        self.models = models or Models(self.settings)  # ModelMissing: fail at start, clearly
        s = self.settings
        self.vad_config = VadConfig(
            threshold=s.vad.threshold,
            min_speech_ms=s.vad.min_speech_ms,
            end_of_utterance_ms=s.vad.end_of_utterance_ms,
            min_silence_ms=s.vad.min_silence_ms,
            adapt_after_s=s.vad.adapt_after_s,
            max_utterance_s=s.vad.max_utterance_s,
        )
        self.validation = ValidationConfig(
            threshold=s.vad.threshold,
            min_confidence=s.validation.min_confidence,
            min_speech_ratio=s.validation.min_speech_ratio,
            min_rms_dbfs=s.validation.min_rms_dbfs,
        )
        self.pools: dict[str, InferencePool] = {}
        self._capacity = context.capacity  # until start() measured it
        self.frontend_pool: ThreadPoolExecutor | None = None
        self.sessions = Sessions.of(
            context, SessionClock, s.reconnect_grace, s.usage_report_interval
        )
        self.live: dict[str, Connection] = {}
        self.by_session: dict[str, Connection] = {}
        self.draining = False
        self._ids = itertools.count(1)
        self.stats: dict[str, int] = {
            "finals": 0,
            "interims": 0,
            "rejected": 0,
            "filtered": 0,
            "early_started": 0,
            "early_used": 0,
        }

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
        self.pools["whisper"] = InferencePool(
            "whisper", s.whisper.workers, s.queue_size, s.interim_max_utilization
        )
        if self.models.parakeet is not None:
            self.pools["parakeet"] = InferencePool(
                "parakeet", s.parakeet.workers, s.queue_size, s.interim_max_utilization
            )
        self.frontend_pool = ThreadPoolExecutor(s.frontend_threads, thread_name_prefix="stt-fe")
        await asyncio.get_running_loop().run_in_executor(self.frontend_pool, self.models.load)
        m = self.models
        self._capacity = await self.context.measured_capacity(
            f"whisper:{','.join(s.whisper.models)}:{m.whisper.device}:{m.whisper.compute_type}:"
            f"threads={s.whisper.cpu_threads}:workers={s.whisper.workers}:denoise={s.denoise}:"
            "parallel",
            lambda: stream_cost(
                m.silero, m.gtcrn, self.vad_config, m.whisper, s.word_timestamps, usable_cores()
            ),
        )
        self.sessions.start()
        log.info(
            "stt ready: whisper %s on %s/%s, denoise %s, capacity %d",
            ",".join(s.whisper.models),
            self.models.whisper.device,
            self.models.whisper.compute_type,
            s.denoise,
            self.capacity,
        )

    async def drain(self) -> None:
        self.draining = True

    async def stop(self) -> None:
        self.draining = True
        for conn in list(self.live.values()):
            await conn.close_with("server_shutdown", "node is shutting down")
        self.sessions.close()
        for pool in self.pools.values():
            pool.shutdown()
        if self.frontend_pool:
            self.frontend_pool.shutdown(wait=False, cancel_futures=True)

    # ------------------------------------------------------------ routing

    def choose_engine(self, force_model: str | None, language: str) -> str:
        whisper_pool = self.pools.get("whisper")
        parakeet_pool = self.pools.get("parakeet")
        parakeet = EngineState(
            parakeet_pool is not None and self.models.parakeet is not None,
            bool(parakeet_pool and parakeet_pool.busy),
            self.models.parakeet.languages if self.models.parakeet else None,
        )
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
        audio, offset = trim(
            utt.audio, utt.probs, self.vad_config.threshold, self.settings.vad.speech_pad_ms
        )
        engine = self.engine(engine_name)
        words = utt.final and self.settings.word_timestamps
        result = engine.transcribe(audio, language, word_timestamps=words)
        filtered = filter_text(
            result.text, len(audio) / SAMPLE_RATE, rms_dbfs(audio), verdict.speech_seconds
        )
        if filtered.text is None:
            if utt.final:
                self.stats["filtered"] += 1
                log.debug("utterance %d filtered (%s): %r", utt.uid, filtered.reason, result.text)
            return None
        t0 = (utt.start + offset) / SAMPLE_RATE
        msg: dict[str, Any] = {
            "type": "transcription",
            "text": filtered.text,
            "language": result.language,
            "is_final": utt.final,
            "latency_ms": 0.0,
            "start": round(t0, 3),
            "end": round(t0 + len(audio) / SAMPLE_RATE, 3),
            "confidence": result.confidence,
            "engine": result.engine,
            "model": result.model,
        }
        if words:
            msg["words"] = [
                {
                    "word": w.word,
                    "start": round(t0 + w.start, 3),
                    "end": round(t0 + w.end, 3),
                    "confidence": round(w.probability, 3),
                }
                for w in result.words
            ]
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


def create_role(context: RoleContext) -> STTRole:
    """The plug-in entry point; a bad config or a missing model is a ConfigError naming the fix."""
    try:
        return STTRole(context)
    except (ModelMissing, EngineUnavailable) as exc:
        raise SettingsError(f"stt: {exc}") from None
