"""A scripted conversation for the voice-agent tests (agents end to end, the demo's talk page):
an LLM with known answers given at once, and what our STT node hears in a recording of the
agent's voice, to compare with the words the LLM wrote.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Sequence

import numpy as np
import soxr

from agents import NetworkSTT
from agents.plugins import ChatMessage, STTStream
from gateway.client import AgentSession, DualWebrtc, GatewayClient
from tests.support.speech import pcm16

ANSWERS = {
    "open": "The museum opens at nine in the morning.",
    "tickets": "Tickets cost twelve euros for adults.",
    "history": (
        "The museum was founded a long time ago by a group of painters. They wanted a "
        "place where everyone could see their work for free. Over the years the "
        "collection grew from a few rooms of paintings to three large buildings."
    ),
    "cost": "A ticket costs twelve euros.",
}


class ScriptedLLM:
    """Answers at once, word by word, with the answer whose key appears in the question;
    ``stall`` makes it hang on the first question instead."""

    def __init__(self, stall: bool = False) -> None:
        self.stall = stall
        self.prompts: list[list[ChatMessage]] = []

    async def chat(self, messages: Sequence[ChatMessage]) -> AsyncIterator[str]:
        self.prompts.append(list(messages))
        if self.stall:
            self.stall = False
            await asyncio.sleep(3600)
        question = messages[-1].content.lower()
        answer = next((a for k, a in ANSWERS.items() if k in question), "I did not catch that.")
        for i, word in enumerate(answer.split()):
            yield word if i == 0 else " " + word

    async def aclose(self) -> None:
        pass


NUMBERS = {"9": "nine", "12": "twelve"}


def spelled(text: str) -> str:
    """Digits Whisper writes for the numbers our answers spell out."""
    return " ".join(NUMBERS.get(w.strip(".,?!"), w) for w in text.split())


async def until(predicate, timeout: float, what: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


async def transcribe(gw: GatewayClient, audio48k: np.ndarray) -> str:
    """What our STT node hears in the recording (silences over 0.6 s shortened, real time)."""
    audio = soxr.resample(audio48k.astype(np.float32) / 32768, 48000, 16000)
    frames = audio[: len(audio) // 320 * 320].reshape(-1, 320)
    loud = np.sqrt((frames**2).mean(axis=1)) > 0.01
    keep, quiet = [], 0
    for frame, is_loud in zip(frames, loud, strict=False):
        quiet = 0 if is_loud else quiet + 1
        if quiet <= 30:
            keep.append(frame)
    session = await gw.create_stt_session(2, language="en")
    stream = await NetworkSTT(session.server_url, session.token).stream()
    try:
        return await hear(stream, np.concatenate(keep) if keep else np.zeros(0, np.float32))
    finally:
        await stream.aclose()


async def push_realtime(stream: STTStream, audio: np.ndarray, frame_ms: int = 20) -> None:
    """16 kHz float audio into the stream as PCM16 frames, paced at real time."""
    data = pcm16(audio)
    step = 16 * frame_ms * 2
    t0 = time.monotonic()
    for k, i in enumerate(range(0, len(data), step)):
        await stream.push(data[i : i + step])
        delay = t0 + (k + 1) * frame_ms / 1000 - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)


async def hear(
    stream: STTStream, audio16k: np.ndarray, quiet: float = 2.0, timeout: float = 90.0
) -> str:
    """The finals an STT stream gives for ``audio16k`` sent in real time (1.5 s of silence
    after it). On a loaded machine the node lags behind: this waits until every utterance it
    ended has its final and nothing came for ``quiet`` seconds, not a fixed time."""
    finals: list[str] = []
    ends = 0
    last = time.monotonic()

    async def read() -> None:
        nonlocal ends, last
        async for event in stream.events():
            last = time.monotonic()
            if event.type == "speech_end":
                ends += 1
            elif event.type == "final":
                finals.append(event.text)

    reader = asyncio.create_task(read())
    await push_realtime(stream, np.concatenate([audio16k, np.zeros(24000, dtype=np.float32)]))
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and (len(finals) < ends or time.monotonic() - last < quiet):
        await asyncio.sleep(0.1)
    reader.cancel()
    return " ".join(finals)


async def settled(
    gw: GatewayClient, session: AgentSession, services: set[str], timeout: float
) -> list[dict[str, object]]:
    """Wait until the bundle's sessions of ``services`` settled; their transactions."""
    assert isinstance(session.webrtc, DualWebrtc)
    ids = {
        "stt": {session.stt.session_id},
        "tts": {session.tts.session_id},
        "webrtc": {session.webrtc.agent.session_id, session.webrtc.client.session_id},
    }
    want = set().union(*(ids[s] for s in services))
    deadline = time.monotonic() + timeout
    while True:
        rows = {s["session_id"]: s for s in await gw.sessions(limit=100)}
        # completed: the node's final report; expired: the sweeper, at the token's expiry
        if all(rows.get(sid, {}).get("status") in ("completed", "expired") for sid in want):
            break
        assert time.monotonic() < deadline, f"not settled: {[rows.get(s) for s in want]}"
        await asyncio.sleep(1)
    txs = [t for t in await gw.transactions(limit=200) if t["session_id"] in want]
    for sid in want:
        kinds = sorted(t["type"] for t in txs if t["session_id"] == sid)
        # Reserved once (plus once per extension), charged at most once, refunded once.
        assert kinds.count("charge") <= 1 and kinds.count("refund") == 1, (sid, kinds)
    return txs
