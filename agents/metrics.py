"""What one turn of the conversation cost, stage by stage: as an event, a log line, Prometheus
metrics and the figures of the ``transcript`` data message.

Every figure is measured on the agent's own monotonic clock from the moment the STT node said
``speech_end`` (the caller's speech ended, as the agent learns it): a figure the turn never
reached (an answer cut short before its first audio) is ``None`` and is left out of the
histograms, never reported as zero.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass

from prometheus_client import Counter, Histogram

log = logging.getLogger("agents.turn")

_BUCKETS = (0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.25, 1.5, 2.0, 3.0, 5.0, 10.0)

STT_FINAL = Histogram(
    "agent_stt_final_seconds", "Caller speech_end to the STT final transcript", buckets=_BUCKETS
)
LLM_FIRST_TOKEN = Histogram(
    "agent_llm_first_token_seconds", "LLM request to its first token", buckets=_BUCKETS
)
TTS_FIRST_AUDIO = Histogram(
    "agent_tts_first_audio_seconds",
    "First text piece sent to TTS to its first audio",
    buckets=_BUCKETS,
)
VOICE_TO_VOICE = Histogram(
    "agent_voice_to_voice_seconds",
    "Caller speech_end to the agent's first audio frame sent to the room",
    buckets=_BUCKETS,
)
BARGE_IN_STOP = Histogram(
    "agent_barge_in_stop_seconds",
    "Caller speech detected to the agent's audio flushed",
    buckets=_BUCKETS,
)
TURNS = Counter("agent_turns", "Answers by how they ended", ["outcome"])


@dataclass
class TurnMetrics:
    """One answer: who asked, what, and how long each stage took (milliseconds)."""

    who: str
    question: str
    answer: str = ""
    outcome: str = "answered"  # answered | interrupted | replaced | llm_error | llm_timeout | error
    stt_final_ms: float | None = None
    llm_first_token_ms: float | None = None
    tts_first_audio_ms: float | None = None
    voice_to_voice_ms: float | None = None
    barge_in_stop_ms: float | None = None
    stopped_at: float | None = None  # monotonic time the agent's audio was flushed (barge-in)

    def latency(self) -> dict[str, float | None]:
        """The figures alone, for the ``transcript`` data message."""
        return {k: v for k, v in asdict(self).items() if k.endswith("_ms")}


def _seconds(ms: float | None) -> float | None:
    return None if ms is None else ms / 1000


def record(turn: TurnMetrics) -> None:
    """Prometheus histograms and one log line for the turn."""
    for hist, ms in (
        (STT_FINAL, turn.stt_final_ms),
        (LLM_FIRST_TOKEN, turn.llm_first_token_ms),
        (TTS_FIRST_AUDIO, turn.tts_first_audio_ms),
        (VOICE_TO_VOICE, turn.voice_to_voice_ms),
        (BARGE_IN_STOP, turn.barge_in_stop_ms),
    ):
        seconds = _seconds(ms)
        if seconds is not None:
            hist.observe(seconds)
    TURNS.labels(turn.outcome).inc()
    log.info(
        "turn %s: %s | stt_final %s, llm_first_token %s, tts_first_audio %s, "
        "voice_to_voice %s, barge_in_stop %s | %r -> %r",
        turn.who,
        turn.outcome,
        _fmt(turn.stt_final_ms),
        _fmt(turn.llm_first_token_ms),
        _fmt(turn.tts_first_audio_ms),
        _fmt(turn.voice_to_voice_ms),
        _fmt(turn.barge_in_stop_ms),
        turn.question,
        turn.answer,
    )


def _fmt(ms: float | None) -> str:
    return "-" if ms is None else f"{ms:.0f} ms"
