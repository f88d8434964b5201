"""Stage 4: intelligent trimming — keep the speech region plus padding (300 ms by default).

Given an utterance's samples and the VAD probabilities of its 32 ms windows, cut everything
before the first and after the last speech window, less ``pad_ms`` on each side. Less silence
means less for Whisper to hallucinate over and a shorter decode.
"""

from __future__ import annotations

import numpy as np

SAMPLE_RATE = 16000


def speech_bounds(probs: np.ndarray, threshold: float, window: int = 512) -> tuple[int, int] | None:
    """Sample range [start, end) of the speech windows, or None without any."""
    idx = np.flatnonzero(np.asarray(probs) >= threshold)
    if len(idx) == 0:
        return None
    return int(idx[0]) * window, (int(idx[-1]) + 1) * window


def trim(
    audio: np.ndarray,
    probs: np.ndarray,
    threshold: float = 0.45,
    pad_ms: float = 300,
    window: int = 512,
) -> tuple[np.ndarray, int]:
    """The trimmed audio and its offset (samples) into the input. No speech: returned whole."""
    bounds = speech_bounds(probs, threshold, window)
    if bounds is None:
        return audio, 0
    pad = int(pad_ms * SAMPLE_RATE / 1000)
    start = max(bounds[0] - pad, 0)
    end = min(bounds[1] + pad, len(audio))
    return audio[start:end], start
