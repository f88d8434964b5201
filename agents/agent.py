"""``VoiceAgent``: one agent in one room, paid through one agent-session bundle.

It takes a bundle from ``gateway.client`` (or buys one), joins the room with the agent's token,
listens to every remote participant through ``NetworkSTT`` and speaks through ``NetworkTTS`` on
the bundle's STT/TTS sessions, and keeps the bundle alive as its ``Budget`` says: it extends it
before it runs out (on the STT node's ``session_expiring``, ``extend_before`` seconds before
``expires_at``, and when the TTS characters left fall under ``min_characters``), hands the new
tokens to the providers, and tops credits up first (``ensure_credits``) when ``top_up_usd`` is
set. It ends when the last person leaves (or none came within ``join_timeout``): STT and TTS
sockets closed, the room left, so the nodes report and the gateway settles the bundle (used part
charged, the rest refunded).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from datetime import datetime
from typing import Any, Self

from agents.budget import Budget
from agents.pipeline import Chunker, Pipeline, PipelineConfig
from agents.plugins import LLM, STT, TTS, SpeechEvent
from gateway.client import AgentSession, DualWebrtc, GatewayClient, GatewayError, WebrtcSession

log = logging.getLogger("agents.agent")

TRANSCRIPT_TOPIC = "transcript"
DEFAULT_BUDGET = Budget()


class VoiceAgent:
    """A spoken conversation: ``await agent.start()``, ``await agent.say(...)``, then
    ``await agent.run()`` until the last caller left."""

    def __init__(
        self,
        llm: LLM,
        *,
        session: AgentSession | None = None,
        gateway: GatewayClient | None = None,
        room: str | None = None,
        identity: str = "agent",
        client_identity: str | None = "caller",
        instructions: str | None = None,
        config: PipelineConfig | None = None,
        budget: Budget = DEFAULT_BUDGET,
        join_timeout: float = 120,
        voice: str = "af_heart",
        language: str = "en",
        stt: STT | None = None,
        tts: TTS | None = None,
        chunker: Chunker | None = None,
    ) -> None:
        if session is None and (gateway is None or room is None):
            raise ValueError(
                "VoiceAgent needs an agent-session bundle (session=...) or a "
                "GatewayClient and a room name to buy one (gateway=..., room=...)"
            )
        self.llm = llm
        self.session = session
        self.gateway = gateway
        self.room_name = room
        self.identity, self.client_identity = identity, client_identity
        self.config = config or PipelineConfig()
        if instructions is not None:
            self.config.instructions = instructions
        self.config.agent_identity = identity
        self.config.language = self.config.language or language
        self.config.voice = self.config.voice or voice
        self.budget = budget
        self.join_timeout = join_timeout
        self.voice, self.language = voice, language
        self._stt, self._tts = stt, tts
        self.chunker = chunker
        self.room: Any = None
        self.pipeline: Pipeline | None = None
        self.extensions = 0
        self.ended = asyncio.Event()
        self._humans: set[str] = set()
        self._joined = asyncio.Event()
        self._extend_lock = asyncio.Lock()
        self._last_extension = 0.0
        self._tasks: list[asyncio.Task[None]] = []
        self._closed = False

    # ------------------------------------------------------------ the bundle

    @property
    def agent_grant(self) -> WebrtcSession:
        assert self.session is not None
        rtc = self.session.webrtc
        return rtc.agent if isinstance(rtc, DualWebrtc) else rtc

    @property
    def client_grant(self) -> WebrtcSession | None:
        """The caller's token and SFU URL (None for a bundle bought without a client identity)."""
        rtc = self.session.webrtc if self.session is not None else None
        return rtc.client if isinstance(rtc, DualWebrtc) else None

    async def create_session(self) -> AgentSession:
        """Buy the bundle (after topping credits up, where configured)."""
        assert self.gateway is not None and self.room_name is not None
        await self._top_up()
        self.session = await self.gateway.create_agent_session(
            self.room_name,
            self.identity,
            self.budget.duration_minutes,
            language=self.language,
            tts_max_characters=self.budget.tts_characters,
            client_identity=self.client_identity,
        )
        log.info(
            "agent session %s bought: room %r, %s minutes, %d TTS characters",
            self.session.bundle_id,
            self.room_name,
            self.budget.duration_minutes,
            self.budget.tts_characters,
        )
        return self.session

    async def _top_up(self) -> None:
        top_up = self.budget.top_up_usd
        if self.gateway is None or top_up is None:
            return
        try:
            bought = await self.gateway.ensure_credits(self.budget.min_credits, top_up)
        except GatewayError as exc:
            log.warning("credit top-up of $%s failed: %s", top_up, exc)
            return
        if bought is not None:
            log.info("credits topped up: %s", bought.get("credited_microcredits"))

    async def extend(self, why: str) -> bool:
        """Extend the bundle and hand the new STT/TTS tokens to the open streams. One at a time;
        a second request within 10 s of an extension is already served by it."""
        if self.gateway is None or self.session is None:
            log.warning(
                "the session needs extending (%s) but the agent has no GatewayClient; "
                "pass gateway=... to VoiceAgent",
                why,
            )
            return False
        async with self._extend_lock:
            if time.monotonic() - self._last_extension < 10:
                return True
            await self._top_up()
            try:
                more = await self.gateway.extend_agent_session(
                    self.session.bundle_id,
                    self.budget.extend_minutes,
                    self.budget.extend_characters,
                )
            except GatewayError as exc:
                log.error(
                    "extending agent session %s (%s) failed: %s", self.session.bundle_id, why, exc
                )
                return False
            self._last_extension = time.monotonic()
            self.extensions += 1
            self.session = AgentSession(
                self.session.bundle_id,
                self.session.webrtc,
                _keep_url(more.stt, self.session.stt),
                _keep_url(more.tts, self.session.tts),
                more.stt.expires_at or self.session.expires_at,
                more.raw,
            )
            log.info(
                "agent session %s extended (%s): +%s minutes, +%d characters",
                self.session.bundle_id,
                why,
                self.budget.extend_minutes,
                self.budget.extend_characters,
            )
            await self._hand_over(more.stt.token, more.tts.token)
            return True

    async def _hand_over(self, stt_key: str, tts_key: str) -> None:
        for provider, key in ((self._stt, stt_key), (self._tts, tts_key)):
            extend = getattr(provider, "extend", None)
            if extend is not None:
                await extend(key)
        if self.pipeline is None:
            return
        await self.pipeline.extend_stt(stt_key)
        if self.pipeline.voice is not None:
            await self.pipeline.voice.extend(tts_key)

    async def _on_expiring(self, service: str, event: SpeechEvent) -> None:
        log.info(
            "%s session expiring (%s s left)%s",
            service,
            event.remaining_seconds,
            "" if self.budget.auto_extend else "; not extended (auto_extend=False)",
        )
        if self.budget.auto_extend:
            self._tasks.append(asyncio.create_task(self.extend(f"{service} session expiring")))

    async def _on_characters(self, left: int, needed: int) -> None:
        """Before each piece: extend first when it would leave fewer than ``min_characters``
        (a piece past the limit would be refused by the node, a gap in the answer)."""
        if self.budget.auto_extend and left - needed < self.budget.min_characters:
            await self.extend(f"{left} TTS characters left, {needed} needed")

    async def _watch_session(self) -> None:
        """Extend before ``expires_at`` and before the TTS characters run out."""
        while True:
            await asyncio.sleep(1)
            left = _seconds_left(self.session.expires_at if self.session else None)
            chars = (
                self.pipeline.voice.characters_left
                if self.pipeline and self.pipeline.voice
                else None
            )
            if left is not None and left < self.budget.extend_before:
                await self.extend(f"{left:.0f} s left")
            elif chars is not None and chars < self.budget.min_characters:
                await self.extend(f"{chars} TTS characters left")

    # ------------------------------------------------------------ life

    async def start(self) -> None:
        """Buy the bundle if none was given, join the room, start listening."""
        if self.session is None:
            await self.create_session()
        assert self.session is not None
        if self._stt is None:
            from agents.network_stt import NetworkSTT

            self._stt = NetworkSTT(
                self.session.stt.server_url,
                self.session.stt.token,
                language=self.language,
                end_of_utterance=self.config.end_of_utterance,
            )
        if self._tts is None:
            from agents.network_tts import NetworkTTS

            self._tts = NetworkTTS(
                self.session.tts.server_url, self.session.tts.token, voice=self.voice
            )
        from agents.room import AgentRoom

        self.room = AgentRoom()
        await self.room.connect(self.agent_grant.ws_url, self.agent_grant.token)
        self.pipeline = Pipeline(
            self._stt,
            self.llm,
            self._tts,
            self.room,
            self.config,
            transcript=self._send_transcript,
            on_expiring=self._on_expiring,
            on_lost=self._on_lost,
            chunker=self.chunker,
            on_characters=self._on_characters,
        )
        await self.pipeline.start()
        self._tasks += [
            asyncio.create_task(self._follow_room(), name="agent-room"),
            asyncio.create_task(self._await_caller(), name="agent-join"),
        ]
        if self.budget.auto_extend:
            self._tasks.append(asyncio.create_task(self._watch_session(), name="agent-session"))
        log.info("agent %r in room %r", self.identity, self.room_name or self.room.room.name)

    async def say(self, text: str) -> None:
        """Speak ``text`` once a caller hears the agent's track (or sent ``client-ready``).
        Returns when it was played, or at once when the conversation ends meanwhile (a caller
        who hangs up during the greeting does not keep the agent talking to an empty room)."""
        assert self.pipeline is not None, "start() the agent first"
        saying = asyncio.ensure_future(self.pipeline.say(text))
        ended = asyncio.ensure_future(self.ended.wait())
        await asyncio.wait({saying, ended}, return_when=asyncio.FIRST_COMPLETED)
        for task in (saying, ended):
            task.cancel()  # no-op for the one that finished
        failure, _ = await asyncio.gather(saying, ended, return_exceptions=True)
        if isinstance(failure, Exception):
            raise failure

    async def run(self) -> None:
        """Until the conversation ends (the last caller left, or none came)."""
        await self.ended.wait()
        await self.aclose()

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.ended.set()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.pipeline is not None:
            await self.pipeline.aclose()
        with contextlib.suppress(Exception):
            await self.llm.aclose()
        if self.room is not None:
            await self.room.aclose()
        log.info("agent %r left; the bundle settles with the nodes' last reports", self.identity)

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    # ------------------------------------------------------------ the room

    async def _await_caller(self) -> None:
        try:
            await asyncio.wait_for(self._joined.wait(), self.join_timeout)
        except TimeoutError:
            log.warning(
                "no caller joined room %r within %.0f s; ending the session",
                self.room_name or "",
                self.join_timeout,
            )
            self.ended.set()

    async def _follow_room(self) -> None:
        """Room events: who to listen to, when the caller is ready, when the last one left."""
        assert self.pipeline is not None
        async for event in self.room.events():
            try:
                await self._on_room_event(event)
            except Exception:
                log.exception("room event %s failed", event)
        if not self._closed:
            log.warning("the agent was disconnected from the room; ending the session")
            self.ended.set()

    async def _on_room_event(self, event: Any) -> None:
        assert self.pipeline is not None
        if event.type == "participant_joined":
            self._humans.add(event.identity)
            self._joined.set()
            log.info("%s joined the room", event.identity)
            await self.pipeline.add_participant(event.identity)
        elif event.type == "audio_track":
            log.info("listening to %s", event.identity)
            await self.pipeline.listen_to(event.identity, self.room.audio_frames(event.identity))
        elif event.type == "participant_left":
            self._humans.discard(event.identity)
            await self.pipeline.remove_participant(event.identity)
            log.info("%s left (%d still in the room)", event.identity, len(self._humans))
            if not self._humans:
                self.ended.set()
        elif event.type == "listener_ready":
            self.pipeline.ready.set()
        elif event.type == "disconnected":
            self.ended.set()

    def _on_lost(self, what: str) -> None:
        """A node went away for good (its provider's reconnects failed): the bundle's session is
        bound to that node, so the conversation ends cleanly rather than talking half-deaf."""
        log.error("%s is gone after its reconnect tries; ending the conversation", what)
        self.ended.set()

    async def _send_transcript(self, message: dict[str, Any]) -> None:
        await self.room.publish_data(message, topic=TRANSCRIPT_TOPIC)


def _keep_url(new: Any, old: Any) -> Any:
    """An extension's STT/TTS entry carries a token but no server_url: keep the old one."""
    from gateway.client import ServiceSession

    return ServiceSession(
        old.session_id,
        new.token,
        new.server_url or old.server_url,
        new.expires_at or old.expires_at,
        new.raw,
    )


def _seconds_left(expires_at: str | None) -> float | None:
    if not expires_at:
        return None
    try:
        when = datetime.fromisoformat(expires_at)
    except ValueError:
        return None
    return when.timestamp() - time.time()
