"""The pipeline's turn-taking, barge-in and history, with in-process implementations of every
interface: an STT that emits the events a test script gives it (the decisions under test are
the pipeline's, so each test chooses exactly what the node would have said), an LLM that
answers at once, a TTS that voices each word as 150 ms of tone with exact word timings, and an
output that plays 48 kHz audio in real time and counts what it played.

The end-to-end tests (real nodes, SFU, gateway) are tests/test_agents_e2e.py.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Sequence
from typing import Self

import numpy as np
import pytest

from agents.pipeline import ChatContext, Pipeline, PipelineConfig, approx_tokens, is_backchannel
from agents.plugins import (
    TTS_SAMPLE_RATE,
    ChatMessage,
    LLMError,
    SpeechAudio,
    SpeechEvent,
    WordTiming,
)

pytestmark = [pytest.mark.fast, pytest.mark.timeout(60)]

WORD_SECONDS = 0.15
FRAME = TTS_SAMPLE_RATE // 50  # 20 ms


# ---------------------------------------------------------------- the parts


class ScriptedSTTStream:
    def __init__(self) -> None:
        self.queue: asyncio.Queue[SpeechEvent | None] = asyncio.Queue()
        self.pushed = 0
        self.keys: list[str] = []
        self.closed = False

    async def push(self, pcm16: bytes) -> None:
        self.pushed += len(pcm16)

    async def events(self) -> AsyncIterator[SpeechEvent]:
        while (event := await self.queue.get()) is not None:
            yield event

    async def extend(self, session_key: str) -> None:
        self.keys.append(session_key)

    async def aclose(self) -> None:
        self.closed = True
        self.queue.put_nowait(None)

    def emit(self, type: str, text: str = "") -> None:
        self.queue.put_nowait(SpeechEvent(type, text=text, at=time.time()))  # type: ignore[arg-type]


class ScriptedSTT:
    def __init__(self) -> None:
        self.streams: list[ScriptedSTTStream] = []

    async def stream(self, language: str | None = None) -> ScriptedSTTStream:
        self.streams.append(ScriptedSTTStream())
        return self.streams[-1]


class ScriptedLLM:
    """Answers at once, word by word, from a list of answers; records every prompt."""

    def __init__(self, answers: Sequence[str | Exception | None]) -> None:
        self.answers = list(answers)
        self.prompts: list[list[ChatMessage]] = []

    async def chat(self, messages: Sequence[ChatMessage]) -> AsyncIterator[str]:
        self.prompts.append(list(messages))
        answer = self.answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        if answer is None:  # stalls
            await asyncio.sleep(3600)
            return
        for i, word in enumerate(answer.split()):
            yield word if i == 0 else " " + word

    async def aclose(self) -> None:
        pass


class ToneTTSStream:
    """Each word is WORD_SECONDS of a tone, in 20 ms chunks, with its timing; an empty chunk
    marks a piece's end. Synthesis takes no time, so the output's pacing is the clock."""

    clear_seconds = 0.0  # how long clear() takes (a network TTS answers after a round trip)

    def __init__(self) -> None:
        self.queue: asyncio.Queue[SpeechAudio | None] = asyncio.Queue()
        self.pieces: list[str] = []
        self.cleared = 0

    async def say(self, text: str) -> int:
        piece = len(self.pieces)
        self.pieces.append(text)
        words = text.split()
        n = int(WORD_SECONDS * TTS_SAMPLE_RATE) * len(words)
        tone = (np.sin(np.arange(n) * 2 * np.pi * 300 / TTS_SAMPLE_RATE) * 8000).astype("<i2")
        timings = [
            WordTiming(w, i * WORD_SECONDS, (i + 1) * WORD_SECONDS) for i, w in enumerate(words)
        ]
        for k in range(0, n, FRAME):
            self.queue.put_nowait(
                SpeechAudio(tone[k : k + FRAME].tobytes(), piece, timings if k == 0 else ())
            )
        self.queue.put_nowait(SpeechAudio(b"", piece))
        return piece

    async def audio(self) -> AsyncIterator[SpeechAudio]:
        while (chunk := await self.queue.get()) is not None:
            yield chunk

    async def clear(self) -> None:
        await asyncio.sleep(self.clear_seconds)
        self.cleared += 1
        while not self.queue.empty():
            self.queue.get_nowait()

    async def extend(self, session_key: str) -> None:
        pass

    @property
    def characters_left(self) -> int | None:
        return None

    async def aclose(self) -> None:
        self.queue.put_nowait(None)


class ToneTTS:
    def __init__(self) -> None:
        self.streams: list[ToneTTSStream] = []

    async def stream(self, voice: str | None = None, language: str | None = None) -> ToneTTSStream:
        self.streams.append(ToneTTSStream())
        return self.streams[-1]


class RealTimeOutput:
    """Plays 20 ms frames on the wall clock and counts the samples played per piece."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[tuple[bytes, int]] = asyncio.Queue(maxsize=10)
        self.played: dict[int, int] = {}
        self.flushes = 0
        self.first_frame_at: float | None = None
        self.task = asyncio.create_task(self._play())

    async def play(self, audio: SpeechAudio) -> None:
        await self.queue.put((audio.pcm16, audio.piece))

    def flush(self) -> None:
        self.flushes += 1
        while not self.queue.empty():
            self.queue.get_nowait()

    def played_samples(self, piece: int) -> int:
        return self.played.get(piece, 0)

    async def _play(self) -> None:
        next_at = time.monotonic()
        while True:
            pcm, piece = await self.queue.get()
            next_at = max(next_at, time.monotonic())
            if self.first_frame_at is None:
                self.first_frame_at = next_at
            next_at += len(pcm) / 2 / TTS_SAMPLE_RATE
            await asyncio.sleep(next_at - time.monotonic())
            self.played[piece] = self.played.get(piece, 0) + len(pcm) // 2


async def by_sentence(deltas: AsyncIterator[str]) -> AsyncIterator[str]:
    """Pieces at sentence ends, so each test knows where pieces begin."""
    buf = ""
    async for delta in deltas:
        buf += delta
        if buf.rstrip().endswith((".", "?", "!")):
            yield buf.strip()
            buf = ""
    if buf.strip():
        yield buf.strip()


async def silent_mic() -> AsyncIterator[bytes]:
    while True:
        await asyncio.sleep(0.02)
        yield bytes(640)


class Setup:
    def __init__(self, answers: Sequence[str | Exception | None], **config: object) -> None:
        self.stt, self.tts = ScriptedSTT(), ToneTTS()
        self.llm = ScriptedLLM(answers)
        self.output = RealTimeOutput()
        self.transcripts: list[dict[str, object]] = []
        self.pipeline = Pipeline(
            self.stt,
            self.llm,
            self.tts,
            self.output,
            PipelineConfig(**config),  # type: ignore[arg-type]
            chunker=by_sentence,
            transcript=self._transcript,
        )

    async def _transcript(self, message: dict[str, object]) -> None:
        self.transcripts.append(message)

    async def __aenter__(self) -> Self:
        await self.pipeline.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.pipeline.aclose()
        self.output.task.cancel()

    async def caller(self, identity: str = "caller", name: str | None = None) -> ScriptedSTTStream:
        await self.pipeline.add_participant(identity, silent_mic(), name)
        return self.stt.streams[-1]

    def ask(self, mic: ScriptedSTTStream, text: str) -> None:
        mic.emit("speech_start")
        mic.emit("speech_end")
        mic.emit("final", text)

    async def answered(self, count: int, timeout: float = 30) -> None:
        await until(
            lambda: len(self.pipeline.turns) >= count and not self.pipeline.speaking,
            timeout,
            f"{count} turns",
        )

    async def interrupted_by_speech(self, question: str) -> ScriptedSTTStream:
        """A caller asks, the answer plays, and the caller speaks without words until the
        agent stops (its first flush); the caller's mic is returned, still speaking."""
        mic = await self.caller()
        self.ask(mic, question)
        await self.playing()
        mic.emit("speech_start")
        await until(lambda: self.output.flushes >= 1, 10, "the interruption")
        return mic

    async def playing(self) -> None:
        await until(lambda: sum(self.output.played.values()) > 0, 10, "the agent's voice")


async def until(predicate, timeout: float = 10, what: str = "condition") -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


LONG = (
    "The museum opens at nine in the morning. It closes at six in the evening. "
    "On Sundays it closes earlier, at four. Tickets cost twelve euros for adults."
)


# ---------------------------------------------------------------- turn-taking


async def test_a_turn_is_answered_in_full_with_metrics_and_transcripts() -> None:
    async with Setup(["Sure. The museum opens at nine."]) as s:
        mic = await s.caller()
        s.ask(mic, "When does the museum open?")
        await s.answered(1)
        assert s.pipeline.history == [
            ChatMessage("user", "When does the museum open?"),
            ChatMessage("assistant", "Sure. The museum opens at nine."),
        ]
        assert s.tts.streams[0].pieces == ["Sure.", "The museum opens at nine."]
        assert s.llm.prompts[0][0].role == "system"
        turn = s.pipeline.turns[0]
        assert turn.outcome == "answered"
        for figure in (
            "stt_final_ms",
            "llm_first_token_ms",
            "tts_first_audio_ms",
            "voice_to_voice_ms",
        ):
            assert getattr(turn, figure) is not None, figure
        assert turn.barge_in_stop_ms is None
        assert {
            "who": "caller",
            "text": "When does the museum open?",
            "final": True,
            "latency": {},
        } in s.transcripts
        agent = [t for t in s.transcripts if t["who"] == "agent"]
        assert agent and agent[0]["text"] == "Sure. The museum opens at nine."
        assert agent[0]["latency"]["voice_to_voice_ms"] == turn.voice_to_voice_ms  # type: ignore[index]


async def test_the_answer_is_prepared_at_once_but_held_for_min_silence() -> None:
    """The turn ends at speech_end and the answer is prepared at once, but nobody hears it before
    min_silence: a caller who goes on within it drops it, and their words join the question."""
    async with Setup(["Two answers? No, one.", "A table for four, done."], min_silence=0.4) as s:
        mic = await s.caller()
        mic.emit("speech_start")
        mic.emit("final", "I need a table")
        await asyncio.sleep(0.3)
        assert not s.llm.prompts, "the caller still speaks: no answer yet"
        mic.emit("speech_end")
        await until(lambda: s.llm.prompts, 5, "the answer prepared at speech_end")
        await asyncio.sleep(0.2)
        assert sum(s.output.played.values()) == 0, "nothing heard within min_silence"
        mic.emit("speech_start")  # within min_silence: the same turn goes on
        mic.emit("speech_end")
        mic.emit("final", "for four people.")
        await s.answered(2)
        assert [t.outcome for t in s.pipeline.turns] == ["replaced", "answered"]
        assert s.llm.prompts[-1][-1].content == "I need a table for four people."
        assert s.pipeline.history == [
            ChatMessage("user", "I need a table for four people."),
            ChatMessage("assistant", "A table for four, done."),
        ]


async def test_a_sound_within_min_silence_delays_the_answer_but_does_not_lose_it() -> None:
    async with Setup(["Dropped unheard.", "At nine."], min_silence=0.4) as s:
        mic = await s.caller()
        s.ask(mic, "When do you open?")
        await until(lambda: s.llm.prompts, 5, "the answer prepared at speech_end")
        mic.emit("speech_start")  # a cough: speech, then no words at all
        mic.emit("speech_end")
        await s.answered(2)
        assert [p[-1].content for p in s.llm.prompts] == ["When do you open?"] * 2
        assert s.pipeline.history == [
            ChatMessage("user", "When do you open?"),
            ChatMessage("assistant", "At nine."),
        ]


async def test_words_after_an_unheard_answer_join_the_question() -> None:
    """The caller adds words before any of the answer was played: one question, one answer."""
    async with Setup([None, "A table for four, done."]) as s:  # the first answer stalls
        mic = await s.caller()
        s.ask(mic, "Book a table")
        await until(lambda: s.pipeline.speaking, 5, "the first answer")
        s.ask(mic, "for four people.")
        await s.answered(2)
        assert s.llm.prompts[1][-1] == ChatMessage("user", "Book a table for four people.")
        assert s.pipeline.history == [
            ChatMessage("user", "Book a table for four people."),
            ChatMessage("assistant", "A table for four, done."),
        ]
        assert [t.outcome for t in s.pipeline.turns] == ["replaced", "answered"]


# ---------------------------------------------------------------- barge-in


async def test_barge_in_keeps_only_the_words_played_and_answers_the_new_turn() -> None:
    async with Setup([LONG, "Twelve euros."]) as s:
        mic = await s.caller()
        s.ask(mic, "Tell me about the museum.")
        await s.playing()
        await asyncio.sleep(1.0)
        mic.emit("speech_start")
        mic.emit("interim", "Wait, how much")
        await until(lambda: s.output.flushes >= 1, 10, "the flush")
        played = {n: s.output.played_samples(n) for n in range(len(s.tts.streams[0].pieces))}
        mic.emit("speech_end")
        mic.emit("final", "Wait, how much are tickets?")
        await s.answered(2)
        assert s.tts.streams[0].cleared >= 1
        first = s.pipeline.turns[0]
        assert first.outcome == "interrupted" and first.barge_in_stop_ms is not None
        heard = s.pipeline.history[1]
        assert heard.role == "assistant"
        # What the output played, word by word (each word WORD_SECONDS of audio).
        words = []
        for n, text in enumerate(s.tts.streams[0].pieces[:2]):
            seconds = played.get(n, 0) / TTS_SAMPLE_RATE
            words += text.split()[: int(seconds / WORD_SECONDS + 0.5)]
        assert 3 <= len(heard.content.split()) < len(LONG.split())
        assert abs(len(heard.content.split()) - len(words)) <= 1
        assert LONG.startswith(heard.content)
        assert s.pipeline.history[2:] == [
            ChatMessage("user", "Wait, how much are tickets?"),
            ChatMessage("assistant", "Twelve euros."),
        ]
        assert s.llm.prompts[1][2].content == heard.content


async def test_a_backchannel_does_not_stop_the_agent() -> None:
    async with Setup(["The museum opens at nine. It closes at six in the evening."]) as s:
        mic = await s.caller()
        s.ask(mic, "When is the museum open?")
        await s.playing()
        mic.emit("speech_start")
        mic.emit("interim", "Mm-hmm.")
        await asyncio.sleep(0.3)
        mic.emit("speech_end")
        mic.emit("final", "Mhm.")
        mic.emit("speech_start")
        mic.emit("speech_end")
        mic.emit("final", "[coughs]")
        await s.answered(1)
        assert s.output.flushes == 0
        assert s.pipeline.turns[0].outcome == "answered"
        assert (
            s.pipeline.history[-1].content
            == "The museum opens at nine. It closes at six in the evening."
        )
        assert len(s.llm.prompts) == 1


async def test_long_speech_without_words_yet_interrupts() -> None:
    async with Setup([LONG, "Go ahead."], min_interruption=0.5) as s:
        mic = await s.interrupted_by_speech("Tell me about the museum.")
        assert not s.pipeline.speaking
        mic.emit("speech_end")
        mic.emit("final", "Sorry, one question.")
        await s.answered(2)
        assert s.pipeline.history[-2].content == "Sorry, one question."


async def test_speech_end_during_the_interruption_keeps_the_interrupted_turn(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The node's speech_end cancels the wait for min_interruption; arriving while that wait's
    interruption is still clearing the TTS, it must not cut the stop short."""
    monkeypatch.setattr(ToneTTSStream, "clear_seconds", 0.3)
    async with Setup([LONG, "Go ahead."], min_interruption=0.5) as s:
        mic = await s.interrupted_by_speech("Tell me about the museum.")
        mic.emit("speech_end")  # while the TTS is being cleared
        await until(lambda: s.tts.streams[0].cleared >= 1, 10, "the TTS cleared")
        await until(lambda: len(s.pipeline.turns) >= 1, 10, "the interrupted turn")
        assert s.pipeline.turns[0].outcome == "interrupted"
        assert s.pipeline.history[-1].role == "assistant"
        mic.emit("final", "Sorry, one question.")
        await s.answered(2)
        assert s.pipeline.history[-2].content == "Sorry, one question."


# ---------------------------------------------------------------- bad LLMs


async def test_an_llm_error_is_logged_and_the_next_turn_is_answered(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, "agents.pipeline")
    async with Setup([LLMError("model crashed: out of memory"), "Fine again."]) as s:
        mic = await s.caller()
        s.ask(mic, "Hello?")
        await s.answered(1)
        assert s.pipeline.turns[0].outcome == "llm_error"
        assert "LLM failed" in caplog.text and "out of memory" in caplog.text
        s.ask(mic, "Hello again?")
        await s.answered(2)
        assert s.pipeline.history[-1].content == "Fine again."


async def test_a_stalled_llm_times_out(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, "agents.pipeline")
    async with Setup([None], llm_timeout=0.5) as s:
        mic = await s.caller()
        s.ask(mic, "Are you there?")
        await s.answered(1)
        assert s.pipeline.turns[0].outcome == "llm_timeout"
        assert "LLM gave no token" in caplog.text
        assert s.pipeline.history == [ChatMessage("user", "Are you there?")]


# ---------------------------------------------------------------- context


async def test_speakers_are_named_when_several_people_are_in_the_room() -> None:
    async with Setup(["Hi Ann.", "Hi Bob."]) as s:
        ann = await s.caller("ann", "Ann")
        bob = await s.caller("bob")
        s.ask(ann, "Hello, I am Ann.")
        await s.answered(1)
        s.ask(bob, "And I am Bob.")
        await s.answered(2)
        users = [m for m in s.pipeline.history if m.role == "user"]
        assert [(m.name, m.content) for m in users] == [
            ("Ann", "Hello, I am Ann."),
            ("bob", "And I am Bob."),
        ]


async def test_say_waits_until_the_caller_is_ready() -> None:
    async with Setup([]) as s:
        greeting = asyncio.create_task(s.pipeline.say("Hello, how can I help?"))
        await asyncio.sleep(0.3)
        assert s.output.first_frame_at is None and not s.tts.streams[0].pieces
        s.pipeline.ready.set()
        await asyncio.wait_for(greeting, 10)
        assert s.pipeline.history == [ChatMessage("assistant", "Hello, how can I help?")]


def test_history_is_trimmed_to_the_token_budget() -> None:
    context = ChatContext("Be brief.", budget=60)
    for i in range(20):
        context.add(ChatMessage("user" if i % 2 == 0 else "assistant", f"message number {i} " * 3))
    messages = context.messages()
    assert messages[0] == ChatMessage("system", "Be brief.")
    assert messages[-1].content.startswith("message number 19")
    assert messages[1].role == "user"
    assert sum(approx_tokens(m) for m in messages) <= 60
    assert len(messages) < 21


@pytest.mark.parametrize(
    "text,backchannel",
    [
        ("Mhm.", True),
        ("Mm-hmm", True),
        ("Yeah, okay.", True),
        ("Uh-huh", True),
        ("Right.", True),
        ("[coughs]", True),
        ("(coughing)", True),
        ("", True),
        ("Wait, stop.", False),
        ("Okay, but how much?", False),
        ("No.", False),
    ],
)
def test_backchannels(text: str, backchannel: bool) -> None:
    assert is_backchannel(text) is backchannel
