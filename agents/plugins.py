"""The three plug-in interfaces of a voice agent: STT, LLM and TTS, each one narrow Protocol.

A provider is a page of code behind one of these (LiveKit's agents plugins are the model): the
pipeline (``agents.pipeline``) never knows whether speech goes to our network's nodes, to another
vendor, or to a model in the process. Audio crosses these interfaces as PCM16 mono bytes: 16 kHz
into STT, 48 kHz out of TTS.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol

STT_SAMPLE_RATE = 16_000
TTS_SAMPLE_RATE = 48_000


# ---------------------------------------------------------------- speech to text


@dataclass(frozen=True)
class SpeechEvent:
    """What an STT stream says about the caller's speech.

    ``speech_start`` / ``speech_end``: the node's voice activity detection (``at`` = the node's
    clock, unix seconds); ``interim`` / ``final``: a transcript (``text``); ``expiring``: the
    session runs out in ``remaining_seconds`` (the agent extends it); ``error``: ``code`` and
    ``text`` say what the node refused (the stream may end after it).
    """

    type: Literal["speech_start", "speech_end", "interim", "final", "expiring", "error"]
    text: str = ""
    at: float | None = None
    latency_ms: float | None = None
    remaining_seconds: float | None = None
    code: str | None = None


class STTStream(Protocol):
    """One caller's speech, as a stream: push audio in, read events out."""

    async def push(self, pcm16: bytes) -> None:
        """16 kHz mono PCM16, in real time (any frame size up to 1 s)."""

    def events(self) -> AsyncIterator[SpeechEvent]:
        """Every event until the stream is closed; ends after ``aclose``."""

    async def extend(self, session_key: str) -> None:
        """Carry on with a new token of the same session (after the gateway extended it)."""

    async def aclose(self) -> None: ...


class STT(Protocol):
    async def stream(self, language: str | None = None) -> STTStream:
        """A new stream, one per remote participant."""


# ---------------------------------------------------------------- language model


@dataclass(frozen=True)
class ChatMessage:
    role: Literal["system", "user", "assistant"]
    content: str
    name: str | None = None  # the speaker, in rooms with several people


class LLM(Protocol):
    def chat(self, messages: Sequence[ChatMessage]) -> AsyncIterator[str]:
        """Stream the answer's text as it is generated (deltas). Raises LLMError on failure;
        the caller cancels the iteration to stop generating (barge-in)."""

    async def aclose(self) -> None: ...


class LLMError(Exception):
    """The model failed or stalled; the message says which and why."""


# ---------------------------------------------------------------- text to speech


@dataclass(frozen=True)
class WordTiming:
    word: str
    start: float  # seconds from the start of the piece's audio
    end: float


@dataclass(frozen=True)
class SpeechAudio:
    """A chunk of synthesized voice: 48 kHz mono PCM16, and the words it carries where known."""

    pcm16: bytes
    piece: int  # which ``say`` call it belongs to (0, 1, ...), to know what was heard
    words: Sequence[WordTiming] = field(default_factory=tuple)


class TTSStream(Protocol):
    """One voice: text in (piece by piece, as the LLM writes it), audio out, in order."""

    async def say(self, text: str) -> int:
        """Queue a speakable piece; returns its piece number."""

    def audio(self) -> AsyncIterator[SpeechAudio]:
        """The voice, in order, until the stream is closed; an empty ``SpeechAudio`` follows
        the last chunk of each piece that was synthesized whole (so the agent knows when an
        answer has been played out)."""

    async def clear(self) -> None:
        """Barge-in: drop every queued piece and the audio not yet read; returns once the node
        confirmed (``cleared``), so no old audio follows."""

    async def extend(self, session_key: str) -> None: ...

    @property
    def characters_left(self) -> int | None:
        """What the session may still speak, where known (the agent extends before it runs out)."""

    async def aclose(self) -> None: ...


class TTS(Protocol):
    async def stream(self, voice: str | None = None, language: str | None = None) -> TTSStream: ...
