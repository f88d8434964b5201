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
