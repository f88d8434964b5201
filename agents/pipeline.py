"""The conversation: whose turn it is, when the agent must stop talking, and what was said.

Streaming at every step: one STT stream per remote participant (the agent's own voice never
reaches STT); a caller's turn ends at an STT ``final`` once the node said ``speech_end``; the
answer's LLM deltas go through the chunker into ``TTS.say`` piece by piece, and the audio goes to
the room as it arrives, but not before ``min_silence`` after ``speech_end``. The answer is
prepared while that silence is waited out: an agent may ask the STT node for a shorter
end-of-utterance silence (``end_of_utterance``) and hold the rest itself, so a person gets the
same pause to go on talking while the LLM and TTS are already at work.

One answer at a time. Caller speech during an answer is judged as a person would:

* a backchannel ("mhm", "yeah", "okay", a cough: a final or interim made only of
  ``backchannel_words`` or of bracketed noises) does nothing;
* an interim or final with other words stops the agent at once (barge-in), and so does speech
  that goes on for ``min_interruption`` (the node's VAD says ``speech_end`` only after its own
  end-of-utterance silence, so the agent waits that silence more before it judges a sound
  without words long);
* the interrupting speech becomes the next turn. If nothing of the cut answer had been heard
  yet, the new words join the question it was answering (the caller had not finished): speech
  that starts before any of the answer was heard drops it at once, and the question is asked
  again, with whatever words follow, when that speech ends.

After an interruption only the words the room actually played enter the history: the room counts
the samples it played per TTS piece, and the TTS word timings say which words those samples hold
(a word counts once half of it was played).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from agents import metrics
from agents.metrics import TurnMetrics
from agents.plugins import (
    LLM,
    STT,
    TTS,
    TTS_SAMPLE_RATE,
    ChatMessage,
    LLMError,
    SpeechAudio,
    SpeechEvent,
    STTStream,
    TTSStream,
    WordTiming,
)

log = logging.getLogger("agents.pipeline")

# the STT node's end-of-utterance silence when the agent asks for none (node/stt/README.md)
NODE_END_OF_UTTERANCE = 0.5

BACKCHANNELS = frozenset(
    {
        "mhm",
        "mmhmm",
        "mmhm",
        "mhmm",
        "hmm",
        "hm",
        "mm",
        "mmm",
        "uhhuh",
        "uhuh",
        "ah",
        "aha",
        "oh",
        "uh",
        "um",
        "yeah",
        "yep",
        "yes",
        "yup",
        "okay",
        "ok",
        "right",
        "sure",
        "alright",
        "i",
        "see",
        "cool",
        "got",
        "it",
        "nice",
        "great",
    }
)


class AudioOutput(Protocol):
    """Where the agent's voice goes: the room's published track (``agents.room.AgentRoom``)."""

    async def play(self, audio: SpeechAudio) -> None:
        """Queue a chunk of 48 kHz mono PCM16; returns once queued for sending."""

    def flush(self) -> Any:
        """Drop every queued sample at once (barge-in)."""

    def played_samples(self, piece: int) -> int:
        """Samples of ``piece`` actually sent out so far."""


Chunker = Callable[[AsyncIterator[str]], AsyncIterator[str]]
Transcript = Callable[[dict[str, Any]], Awaitable[None]]


@dataclass
class PipelineConfig:
    instructions: str = "You are a helpful voice assistant. Answer briefly, in plain sentences."
    language: str | None = None
    voice: str | None = None
    # The STT node's end-of-utterance silence (seconds; None: the node's own, 500 ms) and the
    # silence the agent adds before its answer is heard, preparing it meanwhile. Asking 0.25 +
    # 0.25 keeps the same pause for the caller, but measured on the 2-core machine the node's
    # final then came 372 ms after speech_end instead of 73 (its early final starts only after
    # speech_pad_ms, 300, of silence): no gain there, so the node's own is the default.
    end_of_utterance: float | None = None
    min_silence: float = 0.0
    # speech reported this long after min_silence, before any of the answer was heard, still
    # means the caller went on (the node's speech_start lags the speech by its min_speech_ms)
    resume_window: float = 0.4
    min_interruption: float = 1.0  # speech this long (no words yet) interrupts the agent
    backchannel_words: frozenset[str] = BACKCHANNELS
    history_tokens: int = 1500  # approximate: 4 characters a token, 4 tokens per message
    llm_timeout: float = 15.0  # seconds to wait for the LLM's first token, and between tokens
    ready_timeout: float = 30.0  # say(): how long to wait for the caller to be ready
    agent_identity: str = "agent"


# ---------------------------------------------------------------- text helpers


def _normal_words(text: str) -> list[str]:
    text = re.sub(r"[\[(*][^\])*]*[\])*]", " ", text)  # [coughs], (laughs), *sighs*
    return [
        w
        for w in (re.sub(r"[^a-z0-9']", "", t.lower().replace("-", "")) for t in text.split())
        if w
    ]


def is_backchannel(text: str, words: frozenset[str] = BACKCHANNELS) -> bool:
    """True when ``text`` holds no word outside ``words`` (an empty or noise-only text too)."""
    return all(w in words for w in _normal_words(text))


def approx_tokens(message: ChatMessage) -> int:
    """Four characters a token plus four per message: close enough for every tokenizer we use
    to keep the prompt inside a budget without loading one."""
    return 4 + (len(message.content) + 3) // 4


class ChatContext:
    """The instructions and the history, trimmed oldest first to ``budget`` approximate tokens
    (the newest message always stays)."""

    def __init__(self, instructions: str, budget: int) -> None:
        self.instructions = instructions
        self.budget = budget
        self.history: list[ChatMessage] = []

    def add(self, message: ChatMessage) -> None:
        """Append; a caller's words that follow their own unanswered words join them (the answer
        in between was cut before anything was heard), so the model sees one question."""
        last = self.history[-1] if self.history else None
        if last is not None and message.role == last.role == "user" and message.name == last.name:
            self.history[-1] = ChatMessage(
                "user", f"{last.content} {message.content}", message.name
            )
        else:
            self.history.append(message)

    def messages(self) -> list[ChatMessage]:
        system = ChatMessage("system", self.instructions)
        room = self.budget - approx_tokens(system)
        kept: list[ChatMessage] = []
        for message in reversed(self.history):
            room -= approx_tokens(message)
            if room < 0 and kept:
                break
            kept.append(message)
        kept.reverse()
        while len(kept) > 1 and kept[0].role == "assistant":
            kept.pop(0)  # a prompt opens with the caller's words, not an orphan answer
        return [system, *kept]


def spoken_text(
    text: str, timings: Sequence[WordTiming], played_s: float, received_s: float, finished: bool
) -> str:
    """The words of one piece that were played: from the word timings when the TTS gave them,
    else in proportion to the audio played (exact when the piece played to its end)."""
    tokens = text.split()
    if played_s >= received_s and finished:
        return text.strip()
    if timings:
        heard = sum(
            1
            for t in timings
            if any(c.isalnum() for c in t.word) and (t.start + t.end) / 2 <= played_s
        )
    else:
        heard = int(len(tokens) * played_s / received_s) if received_s > 0 and finished else 0
    return " ".join(tokens[:heard])


# ---------------------------------------------------------------- one answer


@dataclass
class _Piece:
    text: str
    received: int = 0  # samples
    timings: list[WordTiming] = field(default_factory=list)
    finished: bool = False  # the TTS said the piece is complete (an empty SpeechAudio)


@dataclass
class _Answer:
    turn: TurnMetrics
    speech_end: float | None  # monotonic time the caller's speech ended (None: a greeting)
    text: str | None = None  # fixed text (say) instead of the LLM
    heard_from: float = 0.0  # monotonic: no audio reaches the room before (min_silence)
    pieces: dict[int, _Piece] = field(default_factory=dict)
    generated: bool = False  # every piece was handed to TTS
    last_audio: float = 0.0
    first_say: float | None = None
    task: asyncio.Task[None] | None = None
    question: ChatMessage | None = None

    def heard(self, output: AudioOutput) -> str:
        parts = []
        for n in sorted(self.pieces):
            p = self.pieces[n]
            played = output.played_samples(n)
            parts.append(
                spoken_text(
                    p.text,
                    p.timings,
                    played / TTS_SAMPLE_RATE,
                    p.received / TTS_SAMPLE_RATE,
                    p.finished or (self.generated and played >= p.received > 0),
                )
            )
            if played < p.received:
                break  # later pieces cannot have been heard
        return " ".join(x for x in parts if x)

    def anything_played(self, output: AudioOutput) -> bool:
        return any(output.played_samples(n) > 0 for n in self.pieces)


# ---------------------------------------------------------------- callers


@dataclass
class _Caller:
    identity: str
    name: str | None
    stream: STTStream | None = None
    speaking: bool = False
    speech_end: float | None = None  # monotonic, at the last speech_end
    final_at: float | None = None
    texts: list[str] = field(default_factory=list)
    unanswered: bool = False  # their question's answer was dropped unheard: ask it again
    commit: asyncio.Task[None] | None = None
    interrupt_timer: asyncio.Task[None] | None = None
    tasks: list[asyncio.Task[None]] = field(default_factory=list)


class Pipeline:
    """Turn-taking, barge-in and history for one agent in one room."""

    def __init__(
        self,
        stt: STT,
        llm: LLM,
        tts: TTS,
        output: AudioOutput,
        config: PipelineConfig | None = None,
        *,
        chunker: Chunker | None = None,
        transcript: Transcript | None = None,
        on_expiring: Callable[[str, SpeechEvent], Awaitable[None]] | None = None,
        on_turn: Callable[[TurnMetrics], None] | None = None,
        on_lost: Callable[[str], None] | None = None,
        on_characters: Callable[[int, int], Awaitable[None]] | None = None,
    ) -> None:
        self.stt, self.llm, self.tts, self.output = stt, llm, tts, output
        self.config = config or PipelineConfig()
        self.context = ChatContext(self.config.instructions, self.config.history_tokens)
        self.chunker = chunker or _default_chunker()
        self.transcript = transcript
        self.on_expiring = on_expiring
        self.on_turn = on_turn
        self.on_lost = on_lost  # an STT or TTS stream ended for good (its node went away)
        self.on_characters = on_characters  # (left, needed) before each piece: extend in time
        self.ready = asyncio.Event()  # the caller hears the agent's track (say() waits for it)
        self.turns: list[TurnMetrics] = []
        self.callers: dict[str, _Caller] = {}
        self.voice: TTSStream | None = None
        self._answer: _Answer | None = None
        self._pieces: dict[int, _Answer] = {}  # live piece -> its answer
        self._reader: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()  # one answer starts or stops at a time
        self._closed = False

    # ------------------------------------------------------------ life

    async def start(self) -> None:
        # The voice implies its language (TTS language codes are the engine's, not ISO).
        self.voice = await self.tts.stream(self.config.voice)
        self._reader = asyncio.create_task(self._read_voice(self.voice), name="agent-voice")

    async def aclose(self) -> None:
        """Stop talking and listening; close the STT streams and the voice."""
        for identity in list(self.callers):
            await self.remove_participant(identity)
        async with self._lock:
            self._closed = True
            if self._answer is not None:  # cut short: recorded as far as it was heard
                await self._stop(self._answer)
        if self._reader is not None:
            self._reader.cancel()
            await asyncio.gather(self._reader, return_exceptions=True)
        if self.voice is not None:
            with contextlib.suppress(Exception):
                await self.voice.aclose()

    @property
    def speaking(self) -> bool:
        """An answer is being generated or played."""
        return self._answer is not None

    @property
    def history(self) -> list[ChatMessage]:
        return list(self.context.history)

    # ------------------------------------------------------------ participants

    async def add_participant(
        self, identity: str, audio: AsyncIterator[bytes] | None = None, name: str | None = None
    ) -> None:
        """Open ``identity``'s STT stream (at once, so it is ready before the first word) and
        listen to its 16 kHz PCM16 when ``audio`` is given (else later, with ``listen_to``)."""
        if identity in self.callers:
            await self.remove_participant(identity)
        caller = _Caller(identity, name)
        self.callers[identity] = caller
        caller.stream = await self.stt.stream(self.config.language)
        caller.tasks.append(asyncio.create_task(self._listen(caller), name=f"stt-out-{identity}"))
        if audio is not None:
            await self.listen_to(identity, audio)

    async def listen_to(self, identity: str, audio: AsyncIterator[bytes]) -> None:
        """Send ``identity``'s audio (16 kHz mono PCM16) to its STT stream."""
        caller = self.callers.get(identity)
        if caller is None:
            await self.add_participant(identity, audio)
            return
        caller.tasks.append(
            asyncio.create_task(self._pump(caller, audio), name=f"stt-in-{identity}")
        )

    async def remove_participant(self, identity: str) -> None:
        caller = self.callers.pop(identity, None)
        if caller is None:
            return
        for task in (*caller.tasks, caller.commit, caller.interrupt_timer):
            if task is not None:
                task.cancel()
        await asyncio.gather(*(t for t in caller.tasks), return_exceptions=True)
        if caller.stream is not None:
            with contextlib.suppress(Exception):
                await caller.stream.aclose()

    async def extend_stt(self, session_key: str) -> None:
        for caller in list(self.callers.values()):
            if caller.stream is not None:
                await caller.stream.extend(session_key)

    async def _pump(self, caller: _Caller, audio: AsyncIterator[bytes]) -> None:
        try:
            async for pcm in audio:
                assert caller.stream is not None
                await caller.stream.push(pcm)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001  (any failure: logged, the conversation goes on)
            log.warning("audio from %s stopped reaching STT: %s", caller.identity, exc)

    async def _listen(self, caller: _Caller) -> None:
        assert caller.stream is not None
        try:
            async for event in caller.stream.events():
                try:
                    await self._on_event(caller, event)
                except asyncio.CancelledError:
                    raise
                except Exception:
                    log.exception("event %r from %s's STT stream failed", event, caller.identity)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001  (any failure: logged, the conversation goes on)
            log.warning("STT stream of %s ended: %s", caller.identity, exc)
        if caller.identity in self.callers and not self._closed:
            log.warning("STT stream of %s ended; its speech is no longer heard", caller.identity)
            if self.on_lost is not None:
                self.on_lost(f"the STT stream of {caller.identity}")

    # ------------------------------------------------------------ what the caller does

    async def _on_event(self, caller: _Caller, event: SpeechEvent) -> None:
        now = time.monotonic()
        if event.type == "speech_start":
            caller.speaking = True
            _cancel(caller.commit)
            if await self._drop_unheard(caller):
                return
            if self.speaking:
                caller.interrupt_timer = asyncio.create_task(self._interrupt_after(caller))
        elif event.type == "speech_end":
            caller.speaking, caller.speech_end = False, now
            _cancel(caller.interrupt_timer)
            if caller.texts or caller.unanswered:
                self._schedule_commit(caller)
        elif event.type == "interim":
            if event.text.strip():
                await self._send_transcript(caller.identity, event.text, final=False)
            if self.speaking and not self._backchannel(event.text):
                await self.interrupt(f"{caller.identity} said {event.text!r}", now)
        elif event.type == "final":
            await self._on_final(caller, event, now)
        elif event.type == "expiring":
            if self.on_expiring is not None:
                await self.on_expiring("stt", event)
        elif event.type == "error":
            log.warning("STT for %s: %s %s", caller.identity, event.code, event.text)

    async def _on_final(self, caller: _Caller, event: SpeechEvent, now: float) -> None:
        text = event.text.strip()
        if not text:
            return
        if self.speaking and self._backchannel(text) and not caller.texts:
            log.info(
                "backchannel from %s while the agent speaks: %r (goes on)", caller.identity, text
            )
            return
        if self.speaking:
            await self.interrupt(f"{caller.identity} said {text!r}", now)
        caller.texts.append(text)
        caller.final_at = now
        await self._send_transcript(caller.identity, text, final=True)
        if not caller.speaking:
            self._schedule_commit(caller)

    def _backchannel(self, text: str) -> bool:
        return is_backchannel(text, self.config.backchannel_words)

    async def _drop_unheard(self, caller: _Caller) -> bool:
        """The caller speaks again within the pause, before any of the answer to them was heard:
        they had not finished. Drop the answer now (nothing to flush); their question stands and
        is asked again, with what they add, when they stop. "Within the pause": the node reports
        speech_start once ``min_speech`` of speech went by, so up to ``resume_window`` after the
        answer could first have been heard."""
        async with self._lock:
            answer = self._answer
            if (
                answer is None
                or answer.question is None
                or answer.turn.who != caller.identity
                or answer.anything_played(self.output)
                or time.monotonic() > answer.heard_from + self.config.resume_window
            ):
                return False  # later speech is judged as barge-in (backchannels go on)
            log.info(
                "%s goes on talking before the answer was heard: it is dropped", caller.identity
            )
            caller.unanswered = True
            await self._stop(answer)
            return True

    async def _interrupt_after(self, caller: _Caller) -> None:
        """Speech without words interrupts once it lasted ``min_interruption``. The node says
        ``speech_end`` only after its end-of-utterance silence, so a short sound ("Mhm", 0.6 s)
        still counts as speaking for that silence after it ended: the wait covers it too, or a
        backchannel would stop the agent whenever its speech_end came a little late. Once it
        interrupts, the stop is shielded: the speech_end that cancels this timer may arrive while
        the stop is under way, and a stop cut short would lose the interrupted turn's record."""
        eou = self.config.end_of_utterance or NODE_END_OF_UTTERANCE
        await asyncio.sleep(self.config.min_interruption + eou)
        if caller.speaking and self.speaking:
            await asyncio.shield(
                self.interrupt(
                    f"{caller.identity} spoke for {self.config.min_interruption} s",
                    time.monotonic(),
                )
            )

    def _schedule_commit(self, caller: _Caller) -> None:
        _cancel(caller.commit)
        caller.commit = asyncio.create_task(self._commit(caller), name=f"turn-{caller.identity}")

    async def _commit(self, caller: _Caller) -> None:
        ended = caller.speech_end if caller.speech_end is not None else time.monotonic()
        if caller.speaking or not (caller.texts or caller.unanswered):
            return
        text, caller.texts, caller.unanswered = " ".join(caller.texts), [], False
        name = (caller.name or caller.identity) if len(self.callers) > 1 else None
        # Words added to a dropped answer's question join it in the history (ChatContext.add);
        # with none, the question already there is answered again.
        question = ChatMessage("user", text, name)
        turn = TurnMetrics(caller.identity, text)
        if caller.final_at is not None and caller.speech_end is not None:
            turn.stt_final_ms = max(0.0, caller.final_at - caller.speech_end) * 1000
        answer = _Answer(turn, ended, question=question, heard_from=ended + self.config.min_silence)
        # Shielded: speech that starts now must not cancel an answer half set up.
        await asyncio.shield(self._start_answer(answer))

    # ------------------------------------------------------------ answers

    async def say(self, text: str, *, wait_ready: bool = True) -> None:
        """Speak ``text`` (a greeting) once the caller is ready to hear it; it enters the
        history as far as it was heard. Returns when it was played or interrupted."""
        if wait_ready:
            try:
                await asyncio.wait_for(self.ready.wait(), self.config.ready_timeout)
            except TimeoutError:
                log.warning(
                    "no caller got ready within %.0f s; saying %r anyway",
                    self.config.ready_timeout,
                    text,
                )
        answer = _Answer(TurnMetrics(self.config.agent_identity, ""), None, text=text)
        await self._start_answer(answer)
        if answer.task is not None:
            await asyncio.gather(answer.task, return_exceptions=True)

    async def _start_answer(self, answer: _Answer) -> None:
        async with self._lock:
            if self._closed:
                return
            old = self._answer
            if old is not None:
                await self._stop(old)
            if answer.question is not None:
                if answer.question.content:
                    self.context.add(answer.question)
                answer.turn.question = self.context.history[-1].content
            self._answer = answer
            answer.task = asyncio.create_task(self._run(answer), name="agent-answer")

    async def interrupt(self, why: str, detected_at: float | None = None) -> None:
        """Barge-in: stop the current answer now (flush the room, clear the TTS).
        ``detected_at``: when the speech was detected (monotonic), for ``barge_in_stop_ms``."""
        async with self._lock:
            answer = self._answer
            if answer is not None:
                log.info("barge-in: %s", why)
                await self._stop(answer, detected_at)

    async def _stop(self, answer: _Answer, detected_at: float | None = None) -> None:
        """Flush first (what the caller hears stops at once), then cancel and clear the TTS,
        then record what was heard: ``interrupted``, or ``replaced`` when none of it was heard
        (the caller went on before the answer began). Called with the lock held."""
        t0 = detected_at if detected_at is not None else time.monotonic()
        outcome = "interrupted" if answer.anything_played(self.output) else "replaced"
        self._answer = None
        for n in answer.pieces:
            self._pieces.pop(n, None)
        self.output.flush()
        answer.turn.stopped_at = time.monotonic()
        answer.turn.barge_in_stop_ms = (answer.turn.stopped_at - t0) * 1000
        if answer.task is not None and answer.task is not asyncio.current_task():
            answer.task.cancel()
            await asyncio.gather(answer.task, return_exceptions=True)
        if self.voice is not None:
            try:
                await asyncio.wait_for(self.voice.clear(), 5)
            except Exception as exc:  # noqa: BLE001  (any failure: logged, the conversation goes on)
                log.warning("TTS clear failed (%s); old audio is dropped by piece", exc)
        self.output.flush()  # a frame the voice reader was handing over as we stopped
        await self._finish(answer, outcome)

    async def _finish(self, answer: _Answer, outcome: str) -> None:
        heard = answer.heard(self.output)
        answer.turn.answer, answer.turn.outcome = heard, outcome
        if outcome == "answered":
            answer.turn.barge_in_stop_ms = answer.turn.stopped_at = None
        if heard:
            self.context.add(ChatMessage("assistant", heard))
        if answer.question is not None or heard:
            self.turns.append(answer.turn)
            metrics.record(answer.turn)
            if self.on_turn is not None:
                self.on_turn(answer.turn)
        if heard:
            await self._send_transcript(
                self.config.agent_identity, heard, final=True, latency=answer.turn.latency()
            )

    async def _run(self, answer: _Answer) -> None:
        outcome = "answered"
        try:
            if answer.text is not None:
                await self._speak(answer, _one(answer.text))
            else:
                await self._speak(answer, self._deltas(answer))
            answer.generated = True
            await self._played_out(answer)
        except asyncio.CancelledError:
            raise
        except LLMError as exc:
            outcome = "llm_error"
            log.warning(
                "LLM failed, the turn of %s gets no (further) answer: %s", answer.turn.who, exc
            )
        except TimeoutError:
            outcome = "llm_timeout"
            log.warning(
                "LLM gave no token for %.0f s, the turn of %s is dropped",
                self.config.llm_timeout,
                answer.turn.who,
            )
        except Exception:
            outcome = "error"
            log.exception("the answer to %s failed", answer.turn.who)
        async with self._lock:
            if self._answer is answer:
                self._answer = None
                if outcome != "answered":
                    self.output.flush()
                    if self.voice is not None:
                        with contextlib.suppress(Exception):
                            await asyncio.wait_for(self.voice.clear(), 5)
                for n in answer.pieces:
                    self._pieces.pop(n, None)
                await self._finish(answer, outcome)

    async def _deltas(self, answer: _Answer) -> AsyncIterator[str]:
        """The LLM's text, with a deadline on the first token and between tokens."""
        t0 = time.monotonic()
        stream = self.llm.chat(self.context.messages())
        async with contextlib.aclosing(stream):  # type: ignore[type-var]
            it = aiter(stream)
            while True:
                try:
                    delta = await asyncio.wait_for(anext(it), self.config.llm_timeout)
                except StopAsyncIteration:
                    return
                if answer.turn.llm_first_token_ms is None:
                    answer.turn.llm_first_token_ms = (time.monotonic() - t0) * 1000
                yield delta

    async def _speak(self, answer: _Answer, deltas: AsyncIterator[str]) -> None:
        assert self.voice is not None
        async with contextlib.aclosing(self.chunker(deltas)) as pieces:  # type: ignore[type-var]
            async for text in pieces:
                if not text.strip():
                    continue
                left = self.voice.characters_left
                if left is not None and self.on_characters is not None:
                    await self.on_characters(left, len(text))
                if answer.first_say is None:
                    answer.first_say = time.monotonic()
                n = await self.voice.say(text)
                answer.pieces[n] = _Piece(text)
                self._pieces[n] = answer

    async def _played_out(self, answer: _Answer, quiet: float = 0.6) -> None:
        """Until the room played every piece. A piece has ended when the TTS says so (the empty
        SpeechAudio after its audio; ``is_done(piece)`` where the stream offers it, for pieces
        that ended otherwise), else, for a TTS that marks no ends, after audio and then
        ``quiet`` seconds without more. Held for two polls in a row, so audio the voice reader
        is just handing over is not missed."""
        is_done = getattr(self.voice, "is_done", None)
        held = 0
        while held < 2:
            await asyncio.sleep(0.02)
            now = time.monotonic()
            done = all(
                (
                    p.finished
                    or (is_done is not None and is_done(n))
                    or (is_done is None and p.received > 0 and now - answer.last_audio >= quiet)
                )
                and self.output.played_samples(n) >= p.received
                for n, p in answer.pieces.items()
            )
            held = held + 1 if done else 0

    async def _read_voice(self, voice: TTSStream) -> None:
        """The TTS audio, in order, to the room; audio of a stopped answer is dropped."""
        try:
            async for chunk in voice.audio():
                answer = self._pieces.get(chunk.piece)
                if answer is not None and chunk.pcm16:
                    await asyncio.sleep(answer.heard_from - time.monotonic())  # min_silence
                    answer = self._pieces.get(chunk.piece)  # the caller may have gone on
                if answer is None:
                    continue
                self._on_audio(answer, chunk)
                if chunk.pcm16:
                    await self.output.play(chunk)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001  (any failure: logged, the conversation goes on)
            log.warning("the agent's voice (TTS stream) failed: %s", exc)
        if not self._closed:
            log.warning("the agent's voice (TTS stream) ended; answers can no longer be heard")
            if self.on_lost is not None:
                self.on_lost("the TTS stream")

    def _on_audio(self, answer: _Answer, chunk: SpeechAudio) -> None:
        piece = answer.pieces[chunk.piece]
        now = time.monotonic()
        if not chunk.pcm16:
            piece.finished = True
            return
        if answer.turn.tts_first_audio_ms is None and answer.first_say is not None:
            answer.turn.tts_first_audio_ms = (now - answer.first_say) * 1000
        if answer.turn.voice_to_voice_ms is None and answer.speech_end is not None:
            answer.turn.voice_to_voice_ms = (now - answer.speech_end) * 1000
        piece.timings.extend(chunk.words)  # seconds from the start of the piece's audio
        piece.received += len(chunk.pcm16) // 2
        answer.last_audio = now

    async def _send_transcript(
        self, who: str, text: str, final: bool, latency: dict[str, float | None] | None = None
    ) -> None:
        if self.transcript is None:
            return
        try:
            await self.transcript(
                {"who": who, "text": text, "final": final, "latency": latency or {}}
            )
        except Exception as exc:  # noqa: BLE001  (any failure: logged, the conversation goes on)
            log.warning("transcript message not sent: %s", exc)


def _cancel(task: asyncio.Task[Any] | None) -> None:
    if task is not None and task is not asyncio.current_task():
        task.cancel()


async def _one(text: str) -> AsyncIterator[str]:
    yield text


def _default_chunker() -> Chunker:
    from agents import text

    return text.chunks  # type: ignore[attr-defined,no-any-return]
