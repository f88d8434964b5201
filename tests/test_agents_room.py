"""AgentRoom on our real SFU with the official livekit SDK: the agent and a caller (a second SDK
participant, tests/support/agents_caller.py) join with the two WebRTC tokens of an agent session
from the real gateway. The caller's Kokoro-spoken question reaches the agent as 16 kHz audio that
our STT node transcribes; the agent's 48 kHz voice reaches the caller; a flush stops it.
"""

from __future__ import annotations

import asyncio
import json
import time

import numpy as np
import pytest

from agents.network_stt import NetworkSTT
from agents.plugins import SpeechAudio
from agents.room import AgentRoom, RoomEvent
from scripts.devnet import wait_routable
from tests.support.agents_caller import Caller
from tests.support.agents_network import Network  # the `network` fixture: a conftest plugin
from tests.support.audio import tone_hz
from tests.support.speech import silence, speak, word_errors

pytestmark = pytest.mark.timeout(300)

QUESTION = "Can you remind me to call my mother after lunch?"


def tone(seconds: float, hz: float, piece: int) -> list[SpeechAudio]:
    t = np.arange(int(seconds * 48000)) / 48000
    pcm = (np.sin(2 * np.pi * hz * t) * 12000).astype("<i2").tobytes()
    return [SpeechAudio(pcm[i : i + 1920], piece) for i in range(0, len(pcm), 1920)]


async def next_event(
    agent: AgentRoom, kind: str, timeout: float = 15.0, kinds: tuple[str, ...] = ()
) -> RoomEvent:
    """The next event of type ``kind`` (or of any of ``kinds``), skipping others."""

    async def find() -> RoomEvent:
        async for event in agent.events():
            if event.type == kind or event.type in kinds:
                return event
        raise AssertionError(f"events ended before {kind}")

    return await asyncio.wait_for(find(), timeout)


def rms(samples: np.ndarray) -> float:
    return float(np.sqrt(np.mean(samples.astype(float) ** 2))) if len(samples) else 0.0


async def test_agent_hears_the_caller_and_the_caller_hears_the_agent(network: Network) -> None:
    bundle = await network.agent_session()
    agent, caller = AgentRoom(), Caller("caller")
    stt = await NetworkSTT(bundle.stt.server_url, bundle.stt.token).stream()
    try:
        await agent.connect(bundle.webrtc.agent.ws_url, bundle.webrtc.agent.token)
        await caller.join(bundle.webrtc.client.ws_url, bundle.webrtc.client.token)
        assert await agent.wait_for_listener(15), "a listener got ready"
        kinds = ("participant_joined", "listener_ready")
        seen: list[tuple[str, str]] = []
        while len(seen) < 3:  # the caller joined, subscribed (SFU), sent client-ready
            event = await next_event(agent, "any", kinds=kinds)
            seen.append((event.type, event.identity))
        assert sorted(seen) == [
            ("listener_ready", ""),
            ("listener_ready", "caller"),
            ("participant_joined", "caller"),
        ], "the SFU's track_subscribed and the caller's client-ready both reached the agent"
        assert agent.ready_listeners == {"caller"}
        assert set(agent.remote_participants) == {"caller"}

        # caller -> agent: 16 kHz frames, straight into our STT node
        frames: list[bytes] = []

        async def listen() -> None:
            async for frame in agent.audio_frames("caller"):
                frames.append(frame)
                await stt.push(frame)

        listener = asyncio.create_task(listen())
        await caller.say(np.concatenate([speak(QUESTION), silence(1.2)]))
        final = None
        async for event in stt.events():
            if event.type == "final":
                final = event
                break
        assert final is not None and word_errors(QUESTION, final.text)[0] <= 2, final
        assert frames and all(len(f) == 320 for f in frames), "10 ms of 16 kHz mono PCM16"
        with pytest.raises(ValueError, match="agent itself"):
            async for _ in agent.audio_frames(agent.identity):
                pass

        # agent -> caller: 48 kHz voice
        start = time.monotonic()
        for chunk in tone(1.5, 440, piece=0):
            await agent.play(chunk)
        await agent.wait_for_playout()
        await asyncio.sleep(0.5)
        heard = caller.heard_pcm(since=start)
        assert rms(heard) > 1000 and abs(tone_hz(heard) - 440) < 5
        assert agent.played_samples(0) == 72000, "all of piece 0 played"

        # transcript data message
        await agent.publish_data({"who": "agent", "text": "hello", "final": True})
        for _ in range(100):
            if any(topic == "transcript" for topic, _, _ in caller.data):
                break
            await asyncio.sleep(0.05)
        _, payload, sender = next(d for d in caller.data if d[0] == "transcript")
        assert json.loads(payload) == {"who": "agent", "text": "hello", "final": True}
        assert sender == agent.identity

        await caller.leave()
        assert (await next_event(agent, "participant_left")).identity == "caller"
        await asyncio.wait_for(listener, 10)  # the caller's audio ended with the caller
    finally:
        await stt.aclose()
        await caller.leave()
        await agent.aclose()


async def test_flush_stops_the_voice_and_counts_what_was_played(network: Network) -> None:
    bundle = await network.agent_session()
    agent, caller = AgentRoom(), Caller("caller")
    try:
        await agent.connect(bundle.webrtc.agent.ws_url, bundle.webrtc.agent.token)
        await caller.join(bundle.webrtc.client.ws_url, bundle.webrtc.client.token)
        assert await agent.wait_for_listener(15)

        async def speak_piece() -> None:
            for chunk in tone(6.0, 660, piece=3):
                await agent.play(chunk)

        start = time.monotonic()
        player = asyncio.create_task(speak_piece())
        heard_at = None
        while heard_at is None and time.monotonic() - start < 15:
            heard_at = caller.first_audible(since=start)
            await asyncio.sleep(0.02)
        assert heard_at is not None, "the caller hears the agent"
        await asyncio.sleep(1.0)
        assert agent.speaking
        flushed_at = time.monotonic()
        played = agent.flush()
        player.cancel()
        sent = agent.playout.captured[3]
        assert 0 < played[3] < sent, (played, sent)
        assert played[3] == agent.played_samples(3), "flushed audio never counts as played"
        await asyncio.sleep(1.0)
        assert not agent.speaking
        tail = caller.heard_pcm(since=flushed_at + 0.6)
        assert len(tail) > 0 and rms(tail) < 200, "silence after the flush"
        heard = caller.heard_pcm(since=start)
        audible = sum(rms(heard[i : i + 480]) > 1000 for i in range(0, len(heard), 480)) * 480
        stop = caller.heard[-1][0]
        for t, c in caller.heard:
            if t > flushed_at and rms(c) < 200:
                stop = t
                break
        print(
            f"played {played[3] / 48000:.2f} s by the room's count, the caller heard "
            f"{audible / 48000:.2f} s; silent {1000 * (stop - flushed_at):.0f} ms after flush"
        )
        assert abs(audible - played[3]) < 0.5 * 48000, (audible, played[3])
    finally:
        await caller.leave()
        await agent.aclose()


async def test_make_up_is_ready_once_the_gateway_routes_to_every_role(network: Network) -> None:
    """`make up` prints `ready` after this wait: it returns once the real gateway counts a healthy
    node of each role, and names what it does not route to when that never comes."""
    await wait_routable(["sfu", "stt", "tts"], network.gateway_url, timeout=30)
    with pytest.raises(RuntimeError, match="did not route to a stt, tts, webrtc node"):
        await wait_routable(["sfu", "stt", "tts"], "http://127.0.0.1:9", timeout=1)
