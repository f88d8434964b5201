"""Stage 6: the hallucination filter, after the engine.

Whisper, given little or no speech, produces fluent text that was never said. Checks, in order:

1. **low energy**: any text over audio quieter than ``low_energy_dbfs`` is dropped;
2. **known phrases**: the subtitle-credit phrases Whisper learnt from YouTube ("Thanks for
   watching", "Subtitles by the Amara.org community", ...) are dropped when they are the whole
   text and the audio is not clearly loud, sustained speech of that length;
3. **text-to-audio ratio**: more characters per second of speech than anyone speaks;
4. **repetition and loops**: an n-gram repeated back to back is collapsed to one (de-looping);
   text that is mostly loop is dropped.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

KNOWN_PHRASES = (
    "thanks for watching",
    "thank you for watching",
    "thanks for watching and see you next time",
    "please subscribe",
    "subscribe to my channel",
    "like and subscribe",
    "don't forget to like and subscribe",
    "thank you for listening",
    "thanks for listening",
    "see you next time",
    "see you in the next video",
    "bye",
    "bye bye",
    "you",
    "thank you",
    "thank you very much",
    "okay",
    "so",
    "the end",
    "music",
    "applause",
    "silence",
)
KNOWN_PATTERNS = (
    re.compile(r"^(subtitles|captions|transcription|translated|translation)\b.*\bby\b"),
    re.compile(r"amara\.?org"),
    re.compile(r"^\W*(♪|♫|\[music\]|\(music\)|\[applause\]|\[silence\]|\[blank_audio\])+\W*$"),
    re.compile(r"www\.|\.com\b"),
)
_KNOWN = {p for p in KNOWN_PHRASES}


def normalize(text: str) -> str:
    text = text.lower().replace("’", "'")
    text = re.sub(r"[^\w\s'.]", " ", text)
    text = re.sub(r"(?<!\w)\.|\.(?!\w)", " ", text)
    return re.sub(r"\s+", " ", text).strip()


@dataclass(frozen=True)
class FilterConfig:
    low_energy_dbfs: float = -45.0
    known_phrase_min_dbfs: float = -30.0  # a known phrase needs at least this level...
    known_phrase_min_speech_s: float = 0.25  # ...and this much speech per word
    max_chars_per_second: float = 30.0
    loop_min_repeats: int = 3  # collapse an n-gram repeated this many times in a row
    max_loop_share: float = 0.6  # drop when loops made up more than this share of the words


@dataclass(frozen=True)
class FilterResult:
    text: str | None  # None: dropped
    reason: str


def deloop(text: str, min_repeats: int = 3, max_n: int = 8) -> tuple[str, int]:
    """Collapse back-to-back repeats of any 1..max_n word n-gram; returns (text, words removed)."""
    words = text.split()
    removed = 0
    changed = True
    while changed:
        changed = False
        for n in range(1, max_n + 1):
            i = 0
            while i + n * min_repeats <= len(words):
                gram = [normalize(w) for w in words[i : i + n]]
                reps = 1
                while (
                    words[i + reps * n : i + (reps + 1) * n]
                    and [normalize(w) for w in words[i + reps * n : i + (reps + 1) * n]] == gram
                ):
                    reps += 1
                if reps >= min_repeats:
                    del words[i + n : i + reps * n]
                    removed += (reps - 1) * n
                    changed = True
                i += 1
    return " ".join(words), removed


def is_known_phrase(text: str) -> bool:
    norm = normalize(text)
    if norm in _KNOWN:
        return True
    return any(p.search(norm) or p.search(text.lower()) for p in KNOWN_PATTERNS)


def filter_text(
    text: str,
    audio_seconds: float,
    rms_dbfs: float,
    speech_seconds: float,
    config: FilterConfig | None = None,
) -> FilterResult:
    cfg = config or FilterConfig()
    text = text.strip()
    if not normalize(text).replace(".", "").strip():
        return FilterResult(None, "empty")
    if rms_dbfs < cfg.low_energy_dbfs:
        return FilterResult(None, f"low energy ({rms_dbfs:.1f} dBFS)")
    n_words = max(len(text.split()), 1)
    if is_known_phrase(text) and (
        rms_dbfs < cfg.known_phrase_min_dbfs
        or speech_seconds < cfg.known_phrase_min_speech_s * n_words
    ):
        return FilterResult(None, "known hallucination phrase")
    seconds = max(speech_seconds, min(audio_seconds, 0.5), 0.1)
    if len(text) / seconds > cfg.max_chars_per_second:
        return FilterResult(None, f"{len(text) / seconds:.0f} characters per second of speech")
    cleaned, removed = deloop(text, cfg.loop_min_repeats)
    if removed:
        if removed / n_words > cfg.max_loop_share:
            return FilterResult(None, "repetition loop")
        return FilterResult(cleaned, "de-looped")
    return FilterResult(text, "ok")
