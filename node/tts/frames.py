"""The audio a TTS socket sends: 48 kHz PCM16 mono in frames of 20 ms (960 samples).

The engine speaks at its native rate (24 kHz for Kokoro); :class:`Resampler` streams it through
soxr (HQ) into whole frames, padding only the very last one. :class:`FrameClock` says when each
frame leaves: on an absolute audio clock, so there is no drift.
"""

from __future__ import annotations

import numpy as np
import soxr

OUT_RATE = 48_000
FRAME_SAMPLES = 960
FRAME_BYTES = FRAME_SAMPLES * 2
FRAME_SECONDS = FRAME_SAMPLES / OUT_RATE  # 20 ms


class Resampler:
    """24 kHz float32 -> 48 kHz PCM16 frames of exactly 960 samples (soxr, streaming, HQ)."""

    def __init__(self, in_rate: int) -> None:
        self._rs = soxr.ResampleStream(in_rate, OUT_RATE, 1, dtype="float32", quality="HQ")
        self._rest = np.zeros(0, dtype=np.float32)

    def push(self, audio: np.ndarray, last: bool = False) -> list[bytes]:
        out = self._rs.resample_chunk(np.asarray(audio, dtype=np.float32), last=last)
        buf = np.concatenate([self._rest, out]) if self._rest.size else out
        n = len(buf) // FRAME_SAMPLES
        frames = [_pcm16(buf[i * FRAME_SAMPLES : (i + 1) * FRAME_SAMPLES]) for i in range(n)]
        self._rest = buf[n * FRAME_SAMPLES :]
        if last and self._rest.size:
            pad = np.zeros(FRAME_SAMPLES, dtype=np.float32)
            pad[: self._rest.size] = self._rest
            frames.append(_pcm16(pad))
            self._rest = np.zeros(0, dtype=np.float32)
        return frames


def _pcm16(x: np.ndarray) -> bytes:
    return (np.clip(x, -1.0, 1.0) * 32767.0).astype("<i2").tobytes()


class FrameClock:
    """The audio clock of a run of frames: frame ``n`` is due at ``t0 + (n - lead) * 20 ms`` (the
    first ``lead`` frames leave at once). When the engine fell behind (a frame more than two frames
    late) the clock re-anchors rather than bursting, and rebuilds the lead; idle time between texts
    ends the run instead (:meth:`stop`)."""

    def __init__(self, lead: int) -> None:
        self.lead = lead
        self.t0: float | None = None
        self.n = 0

    @property
    def running(self) -> bool:
        return self.t0 is not None

    def stop(self) -> None:
        self.t0 = None

    def due(self, now: float) -> tuple[float, float]:
        """(when the next frame is due, the seconds it stalled if the clock re-anchored, or 0)."""
        if self.t0 is None:
            self.t0, self.n = now, 0
        due = self.t0 + (self.n - self.lead) * FRAME_SECONDS
        if self.n >= self.lead and due < now - 2 * FRAME_SECONDS:
            self.t0, self.n = now, 0
            return now - self.lead * FRAME_SECONDS, now - due
        return due, 0.0

    def sent(self) -> None:
        self.n += 1
