"""The talk page's server side: one tutor agent per browser identity.

``POST /api/start`` (body ``{"identity": "student-42"}``) buys an agent-session bundle through
``gateway.client`` with the page's identity as ``client_identity`` and the browser's address as
``client_ip`` (the gateway routes to nodes near the person, not near this server), starts a
``VoiceAgent`` on it in this process and answers the client's token and ``ws_url``. The agent
ends by itself when the person leaves the room (Hang up, or the tab closed): its STT and TTS
sockets close and it leaves, so the nodes report and the gateway settles the bundle.

One identity talks in one tab: a second start with the same identity (a second tab) ends the
first conversation, whose page is told on the ``demo`` topic (``{"type": "replaced"}``) and
hangs up, rather than leaving two tutors answering one person.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import re
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from agents import LLM, VoiceAgent
from agents.pipeline import PipelineConfig
from gateway.client import GatewayClient

log = logging.getLogger("demo.talk")

IDENTITY = re.compile(r"^[A-Za-z0-9_-]{1,48}$")
CONTROL_TOPIC = "demo"
AGENT_IDENTITY = "tutor"
INSTRUCTIONS = (
    "You are Lina, a friendly and patient language tutor. The student speaks English and is "
    "learning. Answer in one or two short, simple sentences, gently correct mistakes, and end "
    "with a short question that keeps the student talking."
)
GREETING = "Hi, I'm Lina, your language tutor. What would you like to practise today?"


class StartError(ValueError):
    """A start request the page must fix; the message says how (answered as 400)."""


def parse_start(body: Any) -> str:
    """The identity from a ``/api/start`` body, or ``StartError`` naming what is wrong."""
    if not isinstance(body, dict):
        raise StartError('the body must be a JSON object: {"identity": "student-42"}')
    unknown = sorted(set(body) - {"identity"})
    if unknown:
        raise StartError(
            f'unknown field(s) {", ".join(map(repr, unknown))}: the body holds only "identity"'
        )
    identity = body.get("identity")
    if not isinstance(identity, str) or not IDENTITY.match(identity):
        raise StartError(
            f"identity {identity!r} is not 1-48 letters, digits, '-' or '_': send "
            f'e.g. {{"identity": "student-42"}}'
        )
    if identity == AGENT_IDENTITY:
        raise StartError(f"identity {identity!r} is the tutor's own: pick another name")
    return identity


@dataclass
class Conversation:
    identity: str
    room: str
    agent: VoiceAgent
    task: asyncio.Task[None]


class Tutors:
    """The live conversations of one demo server, paid by one wallet (``gateway``)."""

    def __init__(
        self,
        gateway: GatewayClient,
        llm_factory: Callable[[], LLM],
        *,
        instructions: str = INSTRUCTIONS,
        greeting: str = GREETING,
        minutes: float = 5,
        tts_characters: int = 4000,
    ) -> None:
        self.gateway = gateway
        self.llm_factory = llm_factory
        self.instructions, self.greeting = instructions, greeting
        self.minutes, self.tts_characters = minutes, tts_characters
        self.live: dict[str, Conversation] = {}
        self._lock = asyncio.Lock()

    async def start(self, identity: str, client_ip: str | None) -> dict[str, Any]:
        """A new conversation for ``identity`` (ending its previous one); the page's grant."""
        async with self._lock:
            old = self.live.pop(identity, None)
            if old is not None:
                await self._replace(old)
            room = f"tutor-{uuid.uuid4().hex[:10]}"
            session = await self.gateway.create_agent_session(
                room,
                AGENT_IDENTITY,
                self.minutes,
                language="en",
                tts_max_characters=self.tts_characters,
                client_ip=client_ip,
                client_identity=identity,
            )
            llm = self.llm_factory()
            load = getattr(llm, "load", None)
            if load is not None and inspect.iscoroutinefunction(load):
                await load()  # the model is ready before the person can speak
            agent = VoiceAgent(
                llm,
                session=session,
                gateway=self.gateway,
                room=room,
                identity=AGENT_IDENTITY,
                client_identity=identity,
                config=PipelineConfig(instructions=self.instructions),
            )
            try:
                await agent.start()
            except BaseException:
                await agent.aclose()
                raise
            conv = Conversation(
                identity, room, agent, asyncio.create_task(self._run(identity, agent))
            )
            self.live[identity] = conv
        grant = agent.client_grant
        assert grant is not None
        log.info(
            "%s talks with the tutor in room %s (bundle %s)", identity, room, session.bundle_id
        )
        return {
            "ws_url": grant.ws_url,
            "token": grant.token,
            "room": room,
            "identity": identity,
            "agent_identity": AGENT_IDENTITY,
            "bundle_id": session.bundle_id,
        }

    async def _run(self, identity: str, agent: VoiceAgent) -> None:
        """Greet once the page hears the agent, then talk until the person leaves."""
        greeting = asyncio.create_task(agent.say(self.greeting)) if self.greeting else None
        try:
            await agent.run()
        except Exception:
            log.exception("the conversation with %s failed", identity)
        finally:
            if greeting is not None:
                greeting.cancel()
                await asyncio.gather(greeting, return_exceptions=True)
            await agent.aclose()
            conv = self.live.get(identity)
            if conv is not None and conv.agent is agent:
                del self.live[identity]
            log.info("%s's conversation ended", identity)

    async def _replace(self, old: Conversation) -> None:
        """Tell the old tab it was replaced: it hangs up, and its agent ends with the last
        person gone (the bundle settles). Ending the agent at once could drop the message with
        the room; a tab that does not answer within 5 s is left anyway."""
        with contextlib.suppress(Exception):
            await old.agent.room.publish_data({"type": "replaced"}, topic=CONTROL_TOPIC)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(old.task), 5)
        old.agent.ended.set()
        await asyncio.gather(old.task, return_exceptions=True)

    async def aclose(self) -> None:
        """End every conversation (the server stops)."""
        convs = list(self.live.values())
        self.live.clear()
        for conv in convs:
            conv.agent.ended.set()
        await asyncio.gather(*(c.task for c in convs), return_exceptions=True)
