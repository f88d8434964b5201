"""Audio checks shared by the tests."""

from __future__ import annotations

import numpy as np


def dominant_hz(samples: np.ndarray, rate: int = 48000, floor_hz: float = 100.0) -> float:
    """The strongest frequency from ``floor_hz`` up: on a loaded machine a stall gates the audio
    at the 20 ms frame rate, which puts energy at 0-50 Hz (the envelope), not a tone."""
    x = samples.astype(float)
    x = (x - x.mean()) * np.hanning(len(x))
    spectrum = np.abs(np.fft.rfft(x))
    freqs = np.fft.rfftfreq(len(x), 1 / rate)
    spectrum[freqs < floor_hz] = 0
    return float(freqs[spectrum.argmax()])


def tone_hz(
    samples: np.ndarray, rate: int = 48000, window: int = 4800, min_rms: float = 1000.0
) -> float:
    """The tone a listener hears: the median dominant frequency over 100 ms windows that carry
    sound. A receiver that stalls for a moment (a loaded machine, a jitter-buffer underrun) gates
    the audio, which moves the whole-buffer spectrum to the gating rate; each audible window still
    carries the tone itself. NaN when no window is audible."""
    found = []
    for start in range(0, len(samples) - window + 1, window):
        w = samples[start : start + window].astype(float)
        if np.sqrt(np.mean((w - w.mean()) ** 2)) >= min_rms:
            found.append(dominant_hz(w, rate))
    return float(np.median(found)) if found else float("nan")
