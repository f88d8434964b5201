"""Stage 5: speech-recognition engines behind one interface, and the spec's routing rules.

``Engine.transcribe(audio, language, word_timestamps)`` is blocking and runs on a worker thread
(never on the event loop). ``WhisperEngine`` wraps faster-whisper over any CTranslate2 Whisper (an
offline-pack name or a path), CPU int8 by default, CUDA where present; it holds an English-only
model and a multilingual one and picks by language. ``ParakeetEngine`` is the slot for
Parakeet-TDT: the interface and the routing are in place, the runtime is not part of this build.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
from threadpoolctl import threadpool_limits

from node.models.whisper import resolve_whisper, whisper_languages

log = logging.getLogger("node.stt.engines")

# The spec's Parakeet-TDT languages (FLEURS table).
PARAKEET_LANGUAGES = frozenset(
    [
        "it",
        "es",
        "pt",
        "en",
        "de",
        "fr",
        "ru",
        "uk",
        "pl",
        "nl",
        "sk",
        "cs",
        "ro",
        "hr",
        "bg",
        "fi",
        "sv",
        "hu",
        "et",
        "da",
        "lt",
        "mt",
        "el",
        "lv",
        "sl",
    ]
)


class EngineUnavailable(Exception):
    """The engine cannot run here (not installed, not configured); the message says why."""


@dataclass
class Word:
    word: str
    start: float
    end: float
    probability: float


@dataclass
class EngineResult:
    text: str
    language: str
    confidence: float
    words: list[Word] = field(default_factory=list)
    no_speech_prob: float = 0.0
    engine: str = ""
    model: str = ""
    inference_ms: float = 0.0


class Engine(Protocol):
    name: str

    def supports(self, language: str) -> bool:
        """``language`` is an ISO code or ``auto``."""

    def load(self) -> None: ...

    def transcribe(
        self, audio: np.ndarray, language: str, word_timestamps: bool = False
    ) -> EngineResult: ...


def limit_blas_threads() -> None:
    """One BLAS thread per call in this process, for good.

    faster-whisper computes its mel spectrogram with a numpy matrix product, and numpy's OpenBLAS
    runs that on a thread per core and then spins them: every final burned two cores for the
    wall time of one (tiny.en on 2 cores: 0.17 CPU-s per utterance instead of 0.09, measured). A
    node is busy with many streams at once, so its parallelism is one call per core, not one call
    over every core.
    """
    threadpool_limits(1, user_api="blas")


def pick_device(device: str) -> str:
    if device != "auto":
        return device
    try:
        import ctranslate2

        return "cuda" if ctranslate2.get_cuda_device_count() > 0 else "cpu"
    except Exception:
        return "cpu"


# Whisper's encoder is trained on 30 s windows and faster-whisper pads every input to 3000 mel
# frames; CTranslate2 runs the encoder on fewer frames just as well. Padding an utterance of a
# few seconds only to the next of these windows cuts the encoder's work 2-3x (measured on the
# Kokoro test corpus: CPU per utterance 0.68 s -> 0.26 s at 15 s, same WER). The window is per
# call (thread-local), so concurrent calls with different windows do not interfere.
WINDOW_BUCKETS_S = (10, 15, 20, 30)
_window = threading.local()
_patched = False


def _install_window_patch() -> None:
    global _patched
    if _patched:
        return
    import faster_whisper.transcribe as fwt

    original = fwt.pad_or_trim

    def pad_or_trim(array, length: int = 3000, **kwargs):  # type: ignore[no-untyped-def]
        frames = getattr(_window, "frames", None)
        return original(array, frames or length, **kwargs)

    fwt.pad_or_trim = pad_or_trim
    _patched = True


def window_frames(samples: int, mode: str) -> int | None:
    """Mel frames (100/s) of the encoder window for an utterance; None: the standard 30 s."""
    if mode == "full":
        return None
    seconds = samples / 16000 + 0.5
    for bucket in WINDOW_BUCKETS_S:
        if seconds <= bucket:
            return bucket * 100
    return None


class WhisperEngine:
    """faster-whisper over CTranslate2 models; ``models`` in order of preference."""

    name = "whisper"

    def __init__(
        self,
        models: list[str],
        device: str = "auto",
        compute_type: str = "auto",
        cpu_threads: int = 1,
        beam_size: int = 1,
        cache_dir: Path | None = None,
        encoder_window: str = "auto",
        workers: int = 1,
    ) -> None:
        limit_blas_threads()
        self.model_names = models
        self.encoder_window = encoder_window
        if encoder_window != "full":
            _install_window_patch()
        self.device = pick_device(device)
        if compute_type == "auto":
            compute_type = "int8_float16" if self.device == "cuda" else "int8"
        self.compute_type = compute_type
        self.cpu_threads = cpu_threads
        self.workers = workers  # CTranslate2 replicas: the inferences that run at once
        self.beam_size = beam_size
        self.paths = [resolve_whisper(m, cache_dir) for m in models]  # raises ModelMissing
        self.languages = [whisper_languages(p) for p in self.paths]
        self._models: dict[int, object] = {}
        self._lock = threading.Lock()

    def supports(self, language: str) -> bool:
        return self._index(language) is not None

    def _index(self, language: str) -> int | None:
        for i, languages in enumerate(self.languages):
            # "auto": the model detects the language, which an English-only one cannot
            if language in languages or (language == "auto" and len(languages) > 1):
                return i
        return None

    def model_name(self, language: str) -> str:
        i = self._index(language)
        return self.model_names[i] if i is not None else ""

    def _model(self, i: int):
        with self._lock:
            if i not in self._models:
                from faster_whisper import WhisperModel

                self._models[i] = WhisperModel(
                    str(self.paths[i]),
                    device=self.device,
                    compute_type=self.compute_type,
                    cpu_threads=self.cpu_threads,
                    num_workers=self.workers,
                )
                log.info(
                    "loaded Whisper %s (%s, %s)",
                    self.model_names[i],
                    self.device,
                    self.compute_type,
                )
            return self._models[i]

    def load(self) -> None:
        """Load and warm every model, so that no client waits for a load."""
        for i in range(len(self.paths)):
            self._model(i).transcribe(
                np.zeros(8000, dtype=np.float32),
                beam_size=1,
                language="en" if self.languages[i] == {"en"} else None,
            )

    def transcribe(
        self, audio: np.ndarray, language: str, word_timestamps: bool = False
    ) -> EngineResult:
        i = self._index(language)
        if i is None:
            raise EngineUnavailable(f"no configured Whisper model transcribes {language!r}")
        model = self._model(i)
        t0 = time.perf_counter()
        _window.frames = window_frames(len(audio), self.encoder_window)
        try:
            segments, info = model.transcribe(
                audio,
                language=None if language == "auto" else language,
                beam_size=self.beam_size,
                temperature=0.0,
                condition_on_previous_text=False,
                vad_filter=False,
                word_timestamps=word_timestamps,
                without_timestamps=not word_timestamps,
            )
            segs = list(segments)
        finally:
            _window.frames = None
        text = " ".join(s.text.strip() for s in segs).strip()
        words = [
            Word(w.word.strip(), w.start, w.end, w.probability)
            for s in segs
            for w in (s.words or [])
        ]
        if segs:
            total = sum(max(len(s.tokens), 1) for s in segs)
            logprob = sum(s.avg_logprob * max(len(s.tokens), 1) for s in segs) / total
            no_speech = max(s.no_speech_prob for s in segs)
        else:
            logprob, no_speech = -10.0, 1.0
        return EngineResult(
            text=text,
            language=info.language if language == "auto" else language,
            confidence=round(math.exp(min(logprob, 0.0)), 3),
            words=words,
            no_speech_prob=no_speech,
            engine=self.name,
            model=self.model_names[i],
            inference_ms=(time.perf_counter() - t0) * 1000,
        )


class ParakeetEngine:
    """The Parakeet-TDT slot. Routing treats it as absent unless ``available`` is true."""

    name = "parakeet"
    languages = PARAKEET_LANGUAGES

    def __init__(self, model: str | None = None) -> None:
        self.model = model

    def supports(self, language: str) -> bool:
        return language == "auto" or language in self.languages

    def load(self) -> None:
        raise EngineUnavailable(
            "the Parakeet-TDT engine is a slot in this build: no Parakeet runtime is installed; "
            "remove `parakeet:` from the stt config (Whisper serves every language)"
        )

    def transcribe(self, audio: np.ndarray, language: str, **options: object) -> EngineResult:
        """Never reached: ``load`` refuses a config that names Parakeet."""
        raise EngineUnavailable("Parakeet is not available in this build")


@dataclass(frozen=True)
class EngineState:
    """What routing needs to know of an engine at the moment of choosing."""

    available: bool
    busy: bool
    languages: frozenset[str] | None = None  # None: any

    def speaks(self, language: str) -> bool:
        return self.languages is None or language in self.languages


def route(
    force_model: str | None, language: str, parakeet: EngineState, whisper: EngineState
) -> str:
    """The spec's six routing rules, in order; returns "parakeet" or "whisper"."""
    if force_model == "whisper" or not parakeet.available:  # 1 (and: no Parakeet at all)
        return "whisper"
    if language == "auto":  # 2: Parakeet detects the language natively
        return "parakeet"
    if not parakeet.speaks(language):  # 3
        return "whisper"
    if not parakeet.busy:  # 4
        return "parakeet"
    if whisper.available and not whisper.busy:  # 5
        return "whisper"
    return "parakeet"  # 6: both busy: queue to the faster engine
