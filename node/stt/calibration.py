"""What one real-time STT stream costs on this machine, measured with the node's own models.

A stream costs its front end (Silero VAD and the GTCRN denoiser) on every second of audio, and a
Whisper final per utterance. The calibration clip is 3.7 s of real speech (Kokoro-82M, af_heart,
16 kHz, shipped beside this module) ending in 0.5 s of silence; a conversational caller is taken to
pause ``PAUSE_SECONDS`` between such utterances, as bench/stt.py streams them. Interim results
are not counted: the node runs them only while its engine is less than half busy.
"""

from __future__ import annotations

import time
import wave
from pathlib import Path

import numpy as np

from node.stt.denoise import GTCRNModel
from node.stt.engines import WhisperEngine
from node.stt.frontend import FrontEnd
from node.stt.vad import SAMPLE_RATE, SileroModel, VadConfig

CLIP = Path(__file__).with_name("calibration.wav")
PAUSE_SECONDS = 1.5
FRAME = SAMPLE_RATE // 50  # 20 ms, what clients send


def read_clip(path: Path = CLIP) -> np.ndarray:
    """The calibration speech as float32 at 16 kHz."""
    with wave.open(str(path), "rb") as w:
        if (w.getnchannels(), w.getsampwidth(), w.getframerate()) != (1, 2, SAMPLE_RATE):
            raise ValueError(f"{path}: expected 16 kHz mono PCM16, got {w.getparams()}")
        pcm = np.frombuffer(w.readframes(w.getnframes()), dtype="<i2")
    return pcm.astype(np.float32) / 32768.0


def stream_cost(
    silero: SileroModel,
    gtcrn: GTCRNModel | None,
    vad: VadConfig,
    whisper: WhisperEngine,
    word_timestamps: bool,
) -> float:
    """Core-seconds of CPU per second of one real-time stream (blocking; process CPU time, so
    Whisper's own threads count)."""
    audio = read_clip()
    seconds = len(audio) / SAMPLE_RATE
    front = FrontEnd(silero, gtcrn, vad, interim_interval_ms=None, speculative=False)
    c0 = time.process_time()
    for i in range(0, len(audio), FRAME):
        front.feed(audio[i : i + FRAME])
    front.flush()
    front_cost = (time.process_time() - c0) / seconds
    language = "en" if whisper.supports("en") else "auto"
    c0 = time.process_time()
    whisper.transcribe(audio, language, word_timestamps=word_timestamps)
    final_cost = time.process_time() - c0
    return front_cost + final_cost / (seconds + PAUSE_SECONDS)
