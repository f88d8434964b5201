"""Voice agent figures: voice-to-voice latency at the caller, stage by stage, and barge-in stops.

    .venv/bin/python bench/agent.py [--turns 20] [--barge-ins 6] [--skip-embedded]

(``--turns 0`` measures barge-ins only.)

Starts the whole network on loopback as processes (a localnet with the registry, the gateway,
an SFU, an STT node with Whisper tiny.en and a TTS node with Kokoro: tests/support/
agents_network.py), runs a ``VoiceAgent`` on a bought agent-session bundle, and a caller on the
official livekit SDK that speaks Kokoro-made questions and records what it hears. Then:

* ``--turns`` questions answered by an LLM that answers at once (what the network itself costs),
  then ``--turns`` answered by the embedded SmolLM2 (llama-cpp-python, in the agent's process);
* voice-to-voice at the caller: the end of the question's speech in what it published (its last
  voiced sample) -> the first audible sample of the agent it received; p50 and p95;
* the agent's stages per turn: speech_end -> STT final, LLM first token, first TTS audio, and
  speech_end -> first frame sent; "endpointing + transport" is caller voice-to-voice minus the
  agent's own (the node's end-of-utterance silence and WebRTC both ways);
* ``--barge-ins`` interruptions of a long answer: speech detected -> agent audio flushed (the
  agent's clock), and the caller starting to talk -> the last audible agent sample it received.

Targets on the 2-core development machine with every service on it: voice-to-voice p50 <= 1.2 s,
p95 <= 2.0 s; barge-in stop p95 <= 200 ms. Printed, never asserted. The CPU is shared: quote
figures from a quiet machine.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any, Self

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
from solders.keypair import Keypair

from agents import VoiceAgent
from agents.metrics import TurnMetrics
from agents.plugins import LLM, ChatMessage
from gateway.client import DualWebrtc
from registry import program as p
from registry.client import RegistryClient
from registry.keys import save_keypair
from tests.conftest import TEST_TTL, Chain, init_registry, start_localnet_process
from tests.support.agents_caller import Caller
from tests.support.agents_network import Network, running_network
from tests.support.speech import silence, speak

QUESTIONS = (
    "What is the capital of France?",
    "How many days are in a week?",
    "What color is the sky on a clear day?",
    "Can you name a fruit that is yellow?",
    "What do bees make?",
    "How many legs does a spider have?",
    "What is the opposite of hot?",
    "Which animal says moo?",
    "What do you use to write on paper?",
    "What season comes after winter?",
)
INSTANT_ANSWER = "Sure. That is a good question, and here is a short answer."
LONG_ANSWER = (
    "Let me tell you the whole story from the very beginning. It started many years "
    "ago in a small town by the sea, where a young painter opened a tiny gallery. "
    "People came from far away to see the paintings, and the gallery grew and grew."
)
INTERRUPTION = "Wait, stop, I have a different question."


class InstantLLM:
    """Answers at once, word by word: the network's own cost, without a model's."""

    def __init__(self, answer: str) -> None:
        self.answer = answer

    async def chat(self, messages: Sequence[ChatMessage]) -> AsyncIterator[str]:
        for i, word in enumerate(self.answer.split()):
            yield word if i == 0 else " " + word

    async def aclose(self) -> None:
        pass


def voiced_end(audio16k: np.ndarray, level: float = 0.02) -> float:
    """Seconds of trailing quiet after the last voiced sample of a clip."""
    loud = np.nonzero(np.abs(audio16k) > level)[0]
    return (len(audio16k) - (loud[-1] + 1 if len(loud) else 0)) / 16000


def silent_after(caller: Caller, since: float, gap: float = 0.4) -> float:
    """Seconds from ``since`` to the last audible frame the caller received before ``gap``
    seconds without any (the cut answer; the next answer starts only after the interrupting
    speech and its end-of-utterance silence)."""
    last = since
    for t, c in caller.heard:
        if t < since:
            continue
        if t - last > gap:
            break
        if np.sqrt(np.mean(c.astype(float) ** 2)) > 500:
            last = t
    return last - since


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def row(name: str, values: list[float]) -> str:
    if not values:
        return f"  {name:<34} -"
    return (
        f"  {name:<34} p50 {statistics.median(values):7.0f} ms   p95 {pct(values, 95):7.0f}"
        f" ms   (n={len(values)})"
    )


# ---------------------------------------------------------------- one conversation


class Conversation:
    def __init__(self, net: Network, llm: LLM, minutes: float) -> None:
        self.net, self.llm, self.minutes = net, llm, minutes
        self.agent: VoiceAgent | None = None
        self.caller = Caller()
        self.gw = net.gateway()

    async def __aenter__(self) -> Self:
        session = await self.net.agent_session(minutes=self.minutes, tts_max_characters=20000)
        self.agent = VoiceAgent(
            self.llm, session=session, gateway=self.gw, instructions="Answer in one short sentence."
        )
        await self.agent.start()
        assert isinstance(session.webrtc, DualWebrtc)
        await self.caller.join(session.webrtc.client.ws_url, session.webrtc.client.token)
        await self.caller.say(silence(1.0))  # the mic is published and subscribed
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.caller.leave()
        if self.agent is not None:
            await self.agent.aclose()
        await self.gw.close()

    @property
    def turns(self) -> list[TurnMetrics]:
        assert self.agent is not None and self.agent.pipeline is not None
        return [t for t in self.agent.pipeline.turns if t.who == self.caller.identity]

    async def idle(self, count: int, timeout: float = 60) -> None:
        assert self.agent is not None and self.agent.pipeline is not None
        pipeline = self.agent.pipeline
        deadline = time.monotonic() + timeout
        while len(self.turns) < count or pipeline.speaking:
            if time.monotonic() > deadline:
                raise RuntimeError(f"no answer to turn {count} within {timeout} s")
            await asyncio.sleep(0.05)

    async def ask(self, audio: np.ndarray) -> tuple[float | None, TurnMetrics | None]:
        """Caller voice-to-voice (ms) and the agent's figures for one question."""
        before = len(self.turns)
        await self.caller.say(audio, tail_silence=0.1)
        assert self.caller.speech_ended_at is not None
        spoke_until = self.caller.speech_ended_at - voiced_end(audio)
        try:
            await self.idle(before + 1)
        except RuntimeError as exc:
            print(f"    ! {exc}", flush=True)
            return None, None
        heard = self.caller.first_audible(since=spoke_until)
        turn = self.turns[before]
        v2v = (heard - spoke_until) * 1000 if heard is not None else None
        return v2v, turn


async def latency_run(
    net: Network, llm: LLM, turns: int, label: str, questions: dict[str, np.ndarray]
) -> None:
    caller_v2v: list[float] = []
    stages: dict[str, list[float]] = {
        k: []
        for k in ("stt_final_ms", "llm_first_token_ms", "tts_first_audio_ms", "voice_to_voice_ms")
    }
    transport: list[float] = []
    async with Conversation(net, llm, minutes=max(5, turns)) as conv:
        for i in range(turns):
            text = QUESTIONS[i % len(QUESTIONS)]
            v2v, turn = await conv.ask(questions[text])
            if turn is None:
                continue
            for key, values in stages.items():
                value = getattr(turn, key)
                if value is not None:
                    values.append(value)
            if v2v is not None:
                caller_v2v.append(v2v)
                if turn.voice_to_voice_ms is not None:
                    transport.append(v2v - turn.voice_to_voice_ms)
            print(
                f"    {i + 1:2d}. {text!r} -> {turn.answer[:60]!r}: caller v2v "
                f"{v2v if v2v is None else round(v2v)} ms",
                flush=True,
            )
            await asyncio.sleep(0.5)
    print(f"\n{label}: {len(caller_v2v)} of {turns} turns heard")
    print(row("voice-to-voice at the caller", caller_v2v))
    print(row("  endpointing + transport", transport))
    print(row("  agent: speech_end -> first frame", stages["voice_to_voice_ms"]))
    print(row("    speech_end -> STT final", stages["stt_final_ms"]))
    print(row("    LLM first token", stages["llm_first_token_ms"]))
    print(row("    first TTS audio (after text)", stages["tts_first_audio_ms"]))
    print(flush=True)


async def barge_in_run(net: Network, count: int, questions: dict[str, np.ndarray]) -> None:
    """A long answer; 1.5 s into it the caller talks over it."""
    agent_stop: list[float] = []
    caller_stop: list[float] = []
    onset: list[float] = []
    interruption = speak(INTERRUPTION)
    question = questions[QUESTIONS[0]]
    async with Conversation(net, InstantLLM(LONG_ANSWER), minutes=5) as conv:
        caller = conv.caller
        for i in range(count):
            before = len(conv.turns)
            await caller.say(question)
            asked = time.monotonic()
            deadline = asked + 30
            while caller.first_audible(since=asked) is None and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
            await asyncio.sleep(1.5)
            talk_from = time.monotonic() + 0.05
            await caller.say(interruption)
            try:
                await conv.idle(before + 2)
            except RuntimeError as exc:
                print(f"    ! {exc}", flush=True)
                continue
            cut = conv.turns[before]
            if (
                cut.outcome == "interrupted"
                and cut.barge_in_stop_ms is not None
                and cut.stopped_at is not None
            ):
                detected = cut.stopped_at - cut.barge_in_stop_ms / 1000
                agent_stop.append(cut.barge_in_stop_ms)
                onset.append((detected - talk_from) * 1000)
                caller_stop.append(silent_after(caller, detected) * 1000)
            print(
                f"    {i + 1}. {cut.outcome}: detected -> flushed "
                f"{cut.barge_in_stop_ms and round(cut.barge_in_stop_ms, 1)} ms; heard "
                f"{cut.answer[:50]!r}...",
                flush=True,
            )
            await asyncio.sleep(1.0)
    print(f"\nbarge-in: {len(agent_stop)} of {count} interruptions stopped the agent")
    print(row("caller talks -> speech detected", onset))
    print(row("speech detected -> audio flushed", agent_stop))
    print(row("detected -> agent silent at caller", caller_stop))
    print(flush=True)


# ---------------------------------------------------------------- the network


def chain_in(tmp: Path) -> tuple[Chain, Any]:
    localnet = start_localnet_process(tmp / "ledger")
    issuer = Keypair()
    save_keypair(issuer, tmp / "issuer.json")

    async def setup() -> None:
        await init_registry(localnet, TEST_TTL, p.Policy.OPEN)
        async with RegistryClient(localnet.url) as client:
            await client.add_issuer(localnet.authority, issuer.pubkey(), "http://127.0.0.1:9")

    asyncio.run(setup())
    return Chain(
        localnet.url,
        localnet.authority,
        localnet.authority_path,
        issuer,
        tmp / "issuer.json",
        TEST_TTL,
    ), localnet


async def bench(net: Network, args: argparse.Namespace) -> None:
    questions = {q: speak(q) for q in QUESTIONS}
    print(f"network up; {args.turns} turns per LLM, {args.barge_ins} barge-ins\n", flush=True)
    if args.turns:
        print("instant LLM (answers at once):", flush=True)
        await latency_run(net, InstantLLM(INSTANT_ANSWER), args.turns, "instant LLM", questions)
    if args.turns and not args.skip_embedded:
        from agents.llm import EmbeddedLLM

        llm = EmbeddedLLM(options={"max_tokens": 60})
        await llm.load()
        print("embedded LLM (SmolLM2-135M, llama-cpp-python):", flush=True)
        await latency_run(net, llm, args.turns, "embedded SmolLM2", questions)
    if args.barge_ins:
        print("barge-in (instant LLM, a long answer interrupted 1.5 s in):", flush=True)
        await barge_in_run(net, args.barge_ins, questions)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--turns", type=int, default=20)
    ap.add_argument("--barge-ins", type=int, default=6)
    ap.add_argument("--skip-embedded", action="store_true")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    with tempfile.TemporaryDirectory(prefix="bench-agent-") as d:
        tmp = Path(d)
        chain, localnet = chain_in(tmp)
        try:
            print("starting the gateway, SFU, STT and TTS nodes ...", flush=True)
            with running_network(chain, tmp) as net:
                asyncio.run(bench(net, args))
        finally:
            localnet.stop()


if __name__ == "__main__":
    main()
