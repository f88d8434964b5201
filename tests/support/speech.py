"""Real speech for the STT tests: sentences spoken by Kokoro-82M (a neural voice), at 16 kHz.

``synthesize`` comes from ``node.tts.engine`` (Kokoro, from the offline pack). Generated audio is
kept in a cache directory keyed by text, voice and speed, so a test session speaks each sentence
once.
Also: WER, PCM16 helpers and a client that streams PCM in 20 ms frames, in real time or faster.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
import time
from pathlib import Path

import numpy as np

SAMPLE_RATE = 16000

# 24 everyday sentences (agents, meetings, support calls), spoken by several Kokoro voices.
SENTENCES = (
    "The quick brown fox jumps over the lazy dog.",
    "Please send the quarterly report to the finance team by Friday.",
    "I would like to book a table for four people tomorrow evening.",
    "The weather today is sunny with a light breeze from the west.",
    "Can you remind me to call my mother after lunch?",
    "Our flight to Berlin leaves early in the morning.",
    "The meeting has been moved to the large conference room.",
    "She bought fresh bread, cheese and apples at the market.",
    "Turn left at the next corner and walk two blocks north.",
    "My password does not work and I cannot log into my account.",
    "The museum is open every day except Monday.",
    "We need more chairs for the guests in the garden.",
    "He plays the guitar in a small band on weekends.",
    "Please confirm the delivery address before we ship the order.",
    "The children are reading books in the school library.",
    "I left my keys on the kitchen table this morning.",
    "The train was delayed because of a signal problem.",
    "Could you explain how the new billing system works?",
    "Drink plenty of water when you exercise in hot weather.",
    "The doctor will see you after the break.",
    "Our company opened a new office in the city center last year.",
    "Let me know if you have any questions about the contract.",
    "The river flows slowly through the green valley.",
    "Thank you for calling customer support, how can I help you today?",
)
VOICES = ("af_heart", "am_michael", "af_bella", "am_adam", "bf_emma", "bm_george")
CACHE_DIR = Path(__file__).resolve().parents[2] / ".local" / "cache" / "stt-speech"


def resample_24k_to_16k(audio: np.ndarray) -> np.ndarray:
    """Polyphase 2/3 resampling with a windowed-sinc low-pass (no scipy needed)."""
    up = np.zeros(len(audio) * 2, dtype=np.float64)
    up[::2] = audio
    taps = 121
    n = np.arange(taps) - (taps - 1) / 2
    cutoff = 7600 / 48000  # normalised to the 48 kHz intermediate rate
    h = 2 * cutoff * np.sinc(2 * cutoff * n) * np.blackman(taps)
    h *= 2 / h.sum()  # gain 2 makes up for the zero stuffing
    y = np.convolve(up, h, mode="same")[::3]
    return y.astype(np.float32)


def speak(
    text: str, voice: str = "af_heart", speed: float = 1.0, cache_dir: Path | None = None
) -> np.ndarray:
    """``text`` spoken by Kokoro, float32 at 16 kHz; cached on disk."""
    cache = Path(cache_dir or CACHE_DIR)
    cache.mkdir(parents=True, exist_ok=True)
    key = hashlib.sha256(f"{text}|{voice}|{speed}".encode()).hexdigest()[:20]
    path = cache / f"{key}.npy"
    if path.is_file():
        return np.load(path)
    from node.tts.engine import synthesize

    audio, rate = synthesize(text, voice, speed)
    if rate != 24000:
        raise RuntimeError(f"unexpected Kokoro sample rate {rate}")
    out = resample_24k_to_16k(audio)
    peak = float(np.abs(out).max()) or 1.0
    out = (out * min(0.7 / peak, 4.0)).astype(np.float32)
    tmp = path.with_suffix(".tmp.npy")
    np.save(tmp, out)
    tmp.replace(path)
    return out


def corpus(n: int = len(SENTENCES)) -> list[tuple[str, np.ndarray]]:
    return [(s, speak(s, VOICES[i % len(VOICES)])) for i, s in enumerate(SENTENCES[:n])]


def silence(seconds: float) -> np.ndarray:
    return np.zeros(int(seconds * SAMPLE_RATE), dtype=np.float32)


def noise(seconds: float, level: float = 0.05, seed: int = 0) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal(int(seconds * SAMPLE_RATE)) * level).astype(
        np.float32
    )


def pcm16(audio: np.ndarray) -> bytes:
    return (np.clip(audio, -1, 1) * 32767).astype("<i2").tobytes()


# ------------------------------------------------------------------------------------------ WER


def words(text: str) -> list[str]:
    text = text.lower().replace("’", "'")
    text = re.sub(r"[^a-z0-9' ]+", " ", text)
    return text.split()


def word_errors(ref: str, hyp: str) -> tuple[int, int]:
    """(edit distance in words, reference length)."""
    r, h = words(ref), words(hyp)
    d = list(range(len(h) + 1))
    for i in range(1, len(r) + 1):
        prev, d[0] = d[0], i
        for j in range(1, len(h) + 1):
            cur = min(d[j] + 1, d[j - 1] + 1, prev + (r[i - 1] != h[j - 1]))
            prev, d[j] = d[j], cur
    return d[len(h)], len(r)


def wer(ref: str, hyp: str) -> float:
    e, n = word_errors(ref, hyp)
    return e / max(n, 1)


# ------------------------------------------------------------------------------------------ client


async def stream_audio(
    ws, audio: np.ndarray, speed: float | None = 1.0, frame_ms: int = 20
) -> None:
    """Send PCM16 in ``frame_ms`` frames; ``speed`` 1.0 is real time, None as fast as possible."""
    step = SAMPLE_RATE * frame_ms // 1000
    data = pcm16(audio)
    t0 = time.monotonic()
    for k, i in enumerate(range(0, len(audio), step)):
        await ws.send_bytes(data[2 * i : 2 * (i + step)])
        if speed is None:
            if k % 10 == 9:
                await asyncio.sleep(0)
            continue
        due = t0 + (k + 1) * frame_ms / 1000 / speed
        delay = due - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
