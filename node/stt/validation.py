"""Stage 3: speech validation — refuse audio that is not speech before it reaches the engine.

Three checks on an utterance (its samples and the VAD probabilities of its 32 ms windows): the
mean VAD confidence of the windows counted as speech, the share of windows that are speech, and
the RMS level. Whisper given noise or silence invents text; this stage is the first defence.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class ValidationConfig:
    threshold: float = 0.45  # the VAD's speech threshold
    min_confidence: float = 0.6  # mean probability of the speech windows
    min_speech_ratio: float = 0.15  # speech windows / all windows
    min_speech_ms: float = 200
    min_rms_dbfs: float = -50.0


@dataclass(frozen=True)
class Verdict:
    ok: bool
    reason: str
    confidence: float
    speech_ratio: float
    rms_dbfs: float
    speech_seconds: float


def rms_dbfs(audio: np.ndarray) -> float:
    if len(audio) == 0:
        return -120.0
    rms = float(np.sqrt(np.mean(np.square(audio, dtype=np.float64))))
    return 20 * np.log10(max(rms, 1e-6))


def validate(
    audio: np.ndarray,
    probs: np.ndarray,
    config: ValidationConfig | None = None,
    window_ms: float = 32.0,
) -> Verdict:
    cfg = config or ValidationConfig()
    probs = np.asarray(probs, dtype=np.float32)
    speech = probs[probs >= cfg.threshold]
    confidence = float(speech.mean()) if len(speech) else 0.0
    ratio = float(len(speech) / len(probs)) if len(probs) else 0.0
    level = rms_dbfs(audio)
    speech_s = len(speech) * window_ms / 1000
    reason = ""
    if speech_s * 1000 < cfg.min_speech_ms:
        reason = f"only {speech_s * 1000:.0f} ms of speech"
    elif confidence < cfg.min_confidence:
        reason = f"VAD confidence {confidence:.2f} < {cfg.min_confidence}"
    elif ratio < cfg.min_speech_ratio:
        reason = f"speech ratio {ratio:.2f} < {cfg.min_speech_ratio}"
    elif level < cfg.min_rms_dbfs:
        reason = f"RMS {level:.1f} dBFS < {cfg.min_rms_dbfs}"
    return Verdict(not reason, reason or "speech", confidence, ratio, level, speech_s)
