"""Stage 1: Silero VAD per client, streaming, and the speech/silence state machine around it.

``SileroVAD`` runs the v6 ONNX model (``faster_whisper/assets/silero_vad_v6.onnx``: 512 new
samples plus 64 of context per 32 ms window, LSTM state ``h``/``c`` carried between calls) over
whatever audio has arrived. ``Segmenter`` turns window probabilities into ``speech_start`` and
``speech_end``: speech starts once ``min_speech_ms`` (250 ms) of windows reach ``threshold`` (0.45);
it ends after a run of silence whose required length adapts to the utterance: the configured
end-of-utterance silence for short utterances, shrinking towards ``min_silence_ms`` as the
utterance grows (long turns rarely pause for long), and a forced end at ``max_utterance_s``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from node.stt.onnx import OnnxModel

SAMPLE_RATE = 16000
WINDOW = 512
CONTEXT = 64
WINDOW_MS = WINDOW * 1000 / SAMPLE_RATE  # 32 ms


class SileroModel(OnnxModel):
    """The model, with a session per thread (node/stt/onnx.py); each stream keeps its own state."""

    def stream(self) -> SileroVAD:
        return SileroVAD(self)


class SileroVAD:
    """Streaming probabilities: ``feed(float32 audio) -> probs`` for each completed window."""

    def __init__(self, model: SileroModel) -> None:
        self.model = model
        self.reset()

    def reset(self) -> None:
        self.h = np.zeros((1, 1, 128), dtype=np.float32)
        self.c = np.zeros((1, 1, 128), dtype=np.float32)
        self.context = np.zeros(CONTEXT, dtype=np.float32)
        self.pending = np.zeros(0, dtype=np.float32)

    def feed(self, audio: np.ndarray) -> np.ndarray:
        buf = np.concatenate([self.pending, audio.astype(np.float32, copy=False)])
        n = len(buf) // WINDOW
        self.pending = buf[n * WINDOW :]
        if n == 0:
            return np.zeros(0, dtype=np.float32)
        windows = buf[: n * WINDOW].reshape(n, WINDOW)
        contexts = np.empty((n, CONTEXT), dtype=np.float32)
        contexts[0] = self.context
        if n > 1:
            contexts[1:] = windows[:-1, -CONTEXT:]
        self.context = windows[-1, -CONTEXT:].copy()
        batch = np.concatenate([contexts, windows], axis=1)
        probs, self.h, self.c = self.model.session.run(
            None, {"input": batch, "h": self.h, "c": self.c}
        )
        return np.asarray(probs, dtype=np.float32).reshape(-1)


@dataclass
class VadConfig:
    threshold: float = 0.45
    min_speech_ms: float = 250
    end_of_utterance_ms: float = 500
    min_silence_ms: float = 200
    adapt_after_s: float = 3.0
    max_utterance_s: float = 15.0

    @property
    def neg_threshold(self) -> float:
        return max(self.threshold - 0.15, 0.01)

    def silence_needed_ms(self, speech_s: float) -> float:
        """Adaptive silence: full end-of-utterance silence up to ``adapt_after_s`` of speech, then
        shrinking linearly to ``min_silence_ms`` at ``max_utterance_s``."""
        top, low = self.end_of_utterance_ms, min(self.min_silence_ms, self.end_of_utterance_ms)
        if speech_s <= self.adapt_after_s or self.max_utterance_s <= self.adapt_after_s:
            return top
        f = min((speech_s - self.adapt_after_s) / (self.max_utterance_s - self.adapt_after_s), 1.0)
        return top - (top - low) * f


@dataclass
class VadEvent:
    kind: str  # "speech_start" | "speech_end"
    sample: int  # stream position: first speech sample (start) or end of the last speech (end)
    forced: bool = False


@dataclass
class Segmenter:
    """Window probabilities in, speech_start/speech_end out (positions in stream samples)."""

    config: VadConfig = field(default_factory=VadConfig)
    position: int = 0  # samples consumed (window aligned)
    in_speech: bool = False
    candidate_start: int | None = None
    candidate_ms: float = 0.0
    speech_start: int = 0
    last_speech_end: int = 0
    silence_ms: float = 0.0

    def reset(self, position: int | None = None) -> None:
        self.in_speech = False
        self.candidate_start = None
        self.candidate_ms = 0.0
        self.silence_ms = 0.0
        if position is not None:
            self.position = position

    def speech_seconds(self) -> float:
        return (self.last_speech_end - self.speech_start) / SAMPLE_RATE

    def feed(self, probs: np.ndarray) -> list[VadEvent]:
        cfg, events = self.config, []
        for p in probs:
            start, end = self.position, self.position + WINDOW
            self.position = end
            if not self.in_speech:
                if p >= cfg.threshold:
                    if self.candidate_start is None:
                        self.candidate_start = start
                    self.candidate_ms += WINDOW_MS
                    if self.candidate_ms >= cfg.min_speech_ms:
                        self.in_speech, self.speech_start = True, self.candidate_start
                        self.last_speech_end, self.silence_ms = end, 0.0
                        self.candidate_start, self.candidate_ms = None, 0.0
                        events.append(VadEvent("speech_start", self.speech_start))
                elif p < cfg.neg_threshold:
                    self.candidate_start, self.candidate_ms = None, 0.0
                continue
            if p >= cfg.threshold:
                self.last_speech_end, self.silence_ms = end, 0.0
            elif p < cfg.neg_threshold or self.silence_ms > 0:
                # Silero's rule: once below neg_threshold, silence runs until p >= threshold
                self.silence_ms += WINDOW_MS
            if self.silence_ms >= cfg.silence_needed_ms(self.speech_seconds()):
                self.in_speech = False
                events.append(VadEvent("speech_end", self.last_speech_end))
                self.silence_ms = 0.0
            elif (end - self.speech_start) / SAMPLE_RATE >= cfg.max_utterance_s:
                self.in_speech = False
                events.append(VadEvent("speech_end", end, forced=True))
                self.silence_ms = 0.0
        return events
