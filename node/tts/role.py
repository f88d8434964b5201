"""The TTS role (``create_role``): the spec's Text-to-Speech WebSocket on ``/v1/stream``.

Kokoro-82M (int8 ONNX via kokoro-onnx by default, see :mod:`node.tts.engine`) speaks queued texts
as 48 kHz PCM16 frames of 20 ms at real-time pace, with barge-in (``clear``), session extension,
per-message voice/language/speed, voice blends, named contexts and approximate word timestamps.
The heartbeat load is the number of live streams; the capacity is measured at start
(:func:`stream_cost`, cached per machine and model) and bounded by the config's. At capacity a new
socket is refused with ``server_full``. See ``node/tts/README.md``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor

from aiohttp import web

from node.models.kokoro import LANGUAGES, VOICES, ensure_kokoro
from node.roles import RoleContext
from node.session import Sessions
from node.tts.characters import CharacterCount
from node.tts.connection import Connection
from node.tts.engine import Engine, create_engine
from node.tts.scheduler import ONE_THREAD, Scheduler
from node.tts.segments import plan_segments
from node.tts.settings import TtsSettings, load_settings
from node.tts.voices import VoiceSpec

log = logging.getLogger("node.tts")

# An agent's replies, to be planned into segments as the node plans them (a short first clause,
# then longer pieces). Each call synthesizes ~0.6 s of silence beside its speech, and a stream's
# short segments pay that more often than one long sentence does: priced on one 6 s sentence,
# the node advertised 3 streams where 3 stalled and 2 held.
CALIBRATION_REPLIES = (
    "Sure, I can help you with that right away.",
    "I have looked at your account, and everything seems to be in order. "
    "Your last payment arrived on the fifth, and the next one is due soon.",
)


def stream_cost(engine: Engine, spec: VoiceSpec, parallel: int = 1) -> float:
    """Core-seconds of CPU per second of speech, synthesized as a full node does (the replies
    planned into segments, one thread per inference, ``parallel`` streams at once): the cost of
    one real-time stream. Blocking; process CPU time, so threads the engine spawns are counted.

    A full node runs an inference on every core, and its cores slow each other down: one
    inference alone measured 0.53-0.71 core-s per second of speech on the 2-core machine, so the
    node sometimes advertised 3 streams where 2 is what holds.
    """
    segments = [
        seg.text
        for reply in CALIBRATION_REPLIES
        for seg in plan_segments(reply, spec.lang_code, engine, narrow=True)
    ]

    def speak() -> int:
        return sum(len(engine.synthesize(text, spec, 1.0, ONE_THREAD)) for text in segments)

    engine.synthesize("Warm up.", spec, 1.0, ONE_THREAD)
    c0 = time.process_time()
    with ThreadPoolExecutor(parallel, thread_name_prefix="tts-calibration") as pool:
        samples = sum(run.result() for run in [pool.submit(speak) for _ in range(parallel)])
    cpu = time.process_time() - c0
    return cpu / max(samples / engine.sample_rate, 1e-3)


class TtsRole:
    name = "tts"

    def __init__(self, context: RoleContext, engine: Engine | None = None) -> None:
        self.context = context
        self.settings: TtsSettings = load_settings(context.settings)
        self._engine = engine
        self.scheduler = Scheduler(self.settings.workers)
        self._capacity = context.capacity  # until start() measured it
        self.streams: set[Connection] = set()
        s = self.settings
        self.sessions = Sessions.of(context, CharacterCount, s.reconnect_grace, s.usage_interval)
        self.draining = False
        self.started_at = time.time()
        # underruns: times a playing text ran dry because the engine fell behind (CPU starved)
        self.stats: dict[str, float] = {"underruns": 0, "stall_seconds": 0.0}
        # (text received -> first frame sent, engine time of that first segment), latest runs
        self.first_audio: deque[tuple[float, float]] = deque(maxlen=1000)
        logging.getLogger("phonemizer").setLevel(logging.ERROR)

    @property
    def engine(self) -> Engine:
        if self._engine is None:
            raise RuntimeError("the TTS engine is not loaded yet (start() loads it)")
        return self._engine

    @property
    def capacity(self) -> int:
        return self._capacity

    def routes(self, app: web.Application) -> None:
        app.router.add_get("/v1/stream", self._stream)
        app.router.add_get("/v1/tts/voices", self._voices)

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        if self._engine is None:
            s = self.settings
            t0 = time.monotonic()
            self._engine = await loop.run_in_executor(None, self._load_engine)
            log.info("tts engine %s loaded in %.1f s", s.engine, time.monotonic() - t0)
        spec = VoiceSpec.parse(self.settings.voice, self.settings.lang_code)
        if self.settings.warmup:
            await loop.run_in_executor(None, self.engine.synthesize, "Ready.", spec, 1.0)
        model = f"{self.engine.name}:{self.settings.provider}:{spec.label}:replies"
        self._capacity = await self.context.measured_capacity(
            model, lambda: stream_cost(self.engine, spec, self.scheduler.workers)
        )
        self.scheduler.start()
        self.sessions.start()

    def _load_engine(self) -> Engine:
        s = self.settings
        files = None
        if s.engine == "kokoro-onnx":
            files = ensure_kokoro(s.model_dir)
        return create_engine(
            s.engine, threads=s.threads, provider=s.provider, files=files, spin=s.spin
        )

    async def drain(self) -> None:
        self.draining = True

    async def stop(self) -> None:
        for stream in list(self.streams):
            await stream.ws.close(code=1001, message=b"node stopping")
        self.sessions.close()
        await self.scheduler.stop()

    def load(self) -> int:
        return len(self.streams)

    async def _voices(self, request: web.Request) -> web.Response:
        return web.json_response(
            {"languages": LANGUAGES, "voices": VOICES, "default": self.settings.voice}
        )

    async def _stream(self, request: web.Request) -> web.StreamResponse:
        ws = web.WebSocketResponse(heartbeat=30, max_msg_size=1 << 20)
        await ws.prepare(request)
        try:
            await Connection(self, ws).run()
        finally:
            if not ws.closed:
                await ws.close()
        return ws


def create_role(context: RoleContext) -> TtsRole:
    return TtsRole(context)
