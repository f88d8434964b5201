"""One client's streaming front end: VAD, denoising and utterance assembly (stages 1, 2 and the
cut points for 3-4). Runs on a worker thread, one call at a time per client.

Positions are stream samples since the connection's first audio frame. Speech starts at the first
window of the run the VAD accepted; an utterance's audio begins ``pad_ms`` before that (from a
short history of raw audio) and ends ``pad_ms`` after the last speech window (within what the
end-of-utterance silence already delivered). Denoising runs incrementally while speech goes on,
so at ``speech_end`` only the last hop is left to do; silence costs only the VAD.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from node.stt.denoise import Denoiser, GTCRNModel
from node.stt.vad import SAMPLE_RATE, WINDOW, Segmenter, SileroModel, VadConfig

HISTORY_S = 1.0


@dataclass
class Utterance:
    """Audio handed to the engine: denoised samples from ``start`` and their VAD windows."""

    uid: int
    final: bool
    start: int  # stream sample of audio[0]
    audio: np.ndarray
    probs: np.ndarray  # VAD probability of each 512-sample window from ``start``
    received_at: float  # monotonic time the audio completing it arrived
    forced: bool = False
    speculative: bool = False  # a final computed early, during the end-of-utterance silence
    key: tuple[int, int] | None = None  # (start, end of speech): same key, same final audio


@dataclass
class FrontEndOutput:
    events: list[tuple[str, int]] = field(default_factory=list)  # (speech_start|speech_end, sample)
    utterances: list[Utterance] = field(default_factory=list)


class FrontEnd:
    def __init__(
        self,
        silero: SileroModel,
        gtcrn: GTCRNModel | None,
        vad: VadConfig,
        pad_ms: float = 300,
        interim_interval_ms: float | None = 1000,
        speculative: bool = True,
    ) -> None:
        self.vad = silero.stream()
        self.denoiser: Denoiser | None = gtcrn.stream() if gtcrn else None
        self.segmenter = Segmenter(vad)
        self.pad = int(pad_ms * SAMPLE_RATE / 1000)
        self.interim = int(interim_interval_ms * SAMPLE_RATE / 1000) if interim_interval_ms else 0
        self.position = 0  # samples received
        self.buf_start = 0  # stream sample of raw[0]
        self.raw = np.zeros(0, dtype=np.float32)
        self.prob_start = 0  # stream sample of the window probs[0]
        self.probs = np.zeros(0, dtype=np.float32)
        self.utt_start: int | None = None
        self.clean = np.zeros(0, dtype=np.float32)  # denoised audio from utt_start
        self.clean_upto = 0
        self.last_interim = 0
        self.uid = 0
        self.speculative = speculative
        self.speculated: tuple[int, int] | None = None

    # ---------------------------------------------------------------- public

    @property
    def vad_config(self) -> VadConfig:
        """The VAD settings this stream runs with (the node's, or the client's config)."""
        return self.segmenter.config

    def configure(self, vad: VadConfig) -> None:
        """New VAD settings from a mid-session ``config``; the utterance in progress ends by
        them."""
        self.segmenter.config = vad

    def reset(self) -> None:
        """Clear buffers and VAD state; the stream clock goes on."""
        self.vad.reset()
        self.segmenter.reset(position=self.position)
        self.buf_start, self.raw = self.position, np.zeros(0, dtype=np.float32)
        self.prob_start, self.probs = self.position, np.zeros(0, dtype=np.float32)
        self.utt_start = None

    @property
    def in_speech(self) -> bool:
        return self.segmenter.in_speech

    def feed(self, audio: np.ndarray, received_at: float | None = None) -> FrontEndOutput:
        received_at = time.monotonic() if received_at is None else received_at
        out = FrontEndOutput()
        self.raw = np.concatenate([self.raw, audio])
        self.position += len(audio)
        probs = self.vad.feed(audio)
        for p in probs:  # window by window so events cut the audio at the right place
            self.probs = np.append(self.probs, p)
            for ev in self.segmenter.feed(np.array([p], dtype=np.float32)):
                out.events.append((ev.kind, ev.sample))
                if ev.kind == "speech_start":
                    self._begin(ev.sample)
                else:
                    end = min(ev.sample + self.pad, self.segmenter.position)
                    out.utterances.append(self._finish(end, received_at, ev.forced))
            if self._speculate_now():
                out.utterances.append(self._speculate(received_at))
        if self.utt_start is not None:
            self._denoise_to(self.position)
            # a partial only while the speaker is talking: in a pause the final may be due soon,
            # and a partial then would hold the engine when the final needs it
            if (
                self.interim
                and self.position - self.last_interim >= self.interim
                and self.segmenter.speech_seconds() >= 0.5
                and self.segmenter.silence_ms == 0
            ):
                self.last_interim = self.position
                out.utterances.append(self._snapshot(received_at))
        self._forget()
        return out

    def flush(self, received_at: float | None = None) -> FrontEndOutput:
        """Force out the utterance in progress (the client's ``flush``)."""
        out = FrontEndOutput()
        if self.utt_start is None:
            return out
        received_at = time.monotonic() if received_at is None else received_at
        end = self.position
        out.events.append(("speech_end", min(self.segmenter.last_speech_end, end)))
        out.utterances.append(self._finish(end, received_at, forced=True))
        self.segmenter.reset()
        return out

    # ---------------------------------------------------------------- internals

    def _begin(self, speech_sample: int) -> None:
        start = max(speech_sample - self.pad, self.buf_start, self.prob_start)
        start -= (start - self.prob_start) % WINDOW  # window aligned
        self.utt_start = max(start, self.buf_start)
        self.clean = np.zeros(0, dtype=np.float32)
        self.clean_upto = self.utt_start
        self.last_interim = self.position
        if self.denoiser is not None:
            self.denoiser.reset()

    def _denoise_to(self, end: int) -> None:
        if end <= self.clean_upto:
            return
        chunk = self.raw[self.clean_upto - self.buf_start : end - self.buf_start]
        self.clean_upto = end
        if self.denoiser is None:
            self.clean = np.concatenate([self.clean, chunk])
        else:
            self.clean = np.concatenate([self.clean, self.denoiser.feed(chunk)])

    def _window_probs(self, start: int, end: int) -> np.ndarray:
        a = max((start - self.prob_start) // WINDOW, 0)
        b = max((end - self.prob_start + WINDOW - 1) // WINDOW, a)
        return self.probs[a:b].copy()

    def _snapshot(self, received_at: float) -> Utterance:
        assert self.utt_start is not None
        self.uid += 1
        audio = self.clean.copy()
        return Utterance(
            self.uid,
            False,
            self.utt_start,
            audio,
            self._window_probs(self.utt_start, self.utt_start + len(audio)),
            received_at,
        )

    def _speculate_now(self) -> bool:
        """In a pause as long as the padding: the final's audio is complete unless speech
        resumes, so the engine may start on it before the end-of-utterance silence is over."""
        seg = self.segmenter
        return (
            self.speculative
            and self.utt_start is not None
            and seg.in_speech
            and seg.silence_ms * SAMPLE_RATE / 1000 >= self.pad
            and self.speculated != (self.utt_start, seg.last_speech_end)
        )

    def _speculate(self, received_at: float) -> Utterance:
        assert self.utt_start is not None
        key = (self.utt_start, self.segmenter.last_speech_end)
        self.speculated = key
        end = key[1] + self.pad
        self._denoise_to(min(end, self.position))
        n = end - self.utt_start
        audio = self.clean[:n]
        if len(audio) < n:
            audio = np.concatenate([audio, np.zeros(n - len(audio), dtype=np.float32)])
        self.uid += 1
        return Utterance(
            self.uid,
            True,
            self.utt_start,
            audio.copy(),
            self._window_probs(self.utt_start, end),
            received_at,
            speculative=True,
            key=key,
        )

    def _finish(self, end: int, received_at: float, forced: bool) -> Utterance:
        assert self.utt_start is not None
        key = (self.utt_start, self.segmenter.last_speech_end)
        self._denoise_to(end)
        if self.denoiser is not None:
            self.clean = np.concatenate([self.clean, self.denoiser.flush()])
        n = max(end - self.utt_start, 0)
        audio = self.clean[:n].copy()
        self.uid += 1
        utt = Utterance(
            self.uid,
            True,
            self.utt_start,
            audio,
            self._window_probs(self.utt_start, end),
            received_at,
            forced,
            key=key,
        )
        self.utt_start = None
        self.clean = np.zeros(0, dtype=np.float32)
        return utt

    def _forget(self) -> None:
        keep_from = self.position - int(HISTORY_S * SAMPLE_RATE)
        if self.utt_start is not None:
            keep_from = min(keep_from, self.utt_start)
        keep_from = max(keep_from, self.buf_start)
        if keep_from - self.buf_start > SAMPLE_RATE:  # trim in 1 s steps
            self.raw = self.raw[keep_from - self.buf_start :]
            self.buf_start = keep_from
            drop = (keep_from - self.prob_start) // WINDOW
            if drop > 0:
                self.probs = self.probs[drop:]
                self.prob_start += drop * WINDOW
