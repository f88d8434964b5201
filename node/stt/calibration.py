"""What one real-time STT stream costs on this machine, measured with the node's own models.

A stream costs its Silero VAD on every second of audio, the GTCRN denoiser on its speech, and a
Whisper final per utterance. The calibration clip is 3.7 s of real speech (Kokoro-82M, af_heart,
16 kHz, shipped beside this module) ending in 0.5 s of silence; a conversational caller is taken to
pause ``PAUSE_SECONDS`` between such utterances, as bench/stt.py streams them. Interim results
are not counted: the node runs them only while its engine is less than half busy.
"""

from __future__ import annotations

import time
import wave
from concurrent.futures import ThreadPoolExecutor
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
    parallel: int = 1,
) -> float:
    """Core-seconds of CPU per second of one real-time stream, ``parallel`` streams at once
    (blocking; process CPU time, so Whisper's own threads count).

    A full node runs a stream on every core, and its cores slow each other down: the front end
    cost 0.053 core-s/s alone and 0.071-0.079 beside a second one on the 2-core machine, so a
    stream measured alone promised 23 streams where 16 kept real time. The node therefore
    measures ``parallel`` = its cores at once.
    """
    audio = read_clip()
    pause = np.zeros(int(PAUSE_SECONDS * SAMPLE_RATE), dtype=np.float32)
    language = "en" if whisper.supports("en") else "auto"

    def one_utterance() -> None:
        front = FrontEnd(silero, gtcrn, vad, interim_interval_ms=None, speculative=False)
        for i in range(0, len(audio), FRAME):
            front.feed(audio[i : i + FRAME])
        front.flush()
        for i in range(0, len(pause), FRAME):  # the pause costs the VAD alone: nothing to denoise
            front.feed(pause[i : i + FRAME])
        whisper.transcribe(audio, language, word_timestamps=word_timestamps)

    c0 = time.process_time()
    with ThreadPoolExecutor(parallel, thread_name_prefix="stt-calibration") as pool:
        for done in [pool.submit(one_utterance) for _ in range(parallel)]:
            done.result()
    used = time.process_time() - c0
    return used / (parallel * (len(audio) + len(pause)) / SAMPLE_RATE)
