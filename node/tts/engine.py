"""Speech engines behind one narrow interface.

An :class:`Engine` turns one *segment* of text (a clause, a sentence, a few sentences; see
:mod:`node.tts.segments`) into float32 mono audio at its native rate, in a voice of
:mod:`node.tts.voices`. The node never calls a model directly, so another backend drops in by
implementing :class:`Engine`:

* ``kokoro-onnx`` (:class:`KokoroOnnxEngine`): Kokoro-82M int8 on onnxruntime, CPU by default and
  the CUDA provider where onnxruntime-gpu is installed. The default and the only one tested here.
* ``kokoro`` (:class:`KokoroTorchEngine`): the PyTorch ``kokoro`` package (``KPipeline``), where
  it and its weights are installed.
* ``mlx`` (:class:`MlxEngine`): ``mlx-audio`` on Apple silicon, where installed.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterable
from typing import Any, Protocol

import numpy as np

from node.models.kokoro import ALL_VOICES, LANGUAGES, SAMPLE_RATE, KokoroFiles, ensure_kokoro
from node.tts.scheduler import ALONE, Run, Stopped
from node.tts.voices import VoiceSpec

MAX_PHONEMES = 510  # English: the model's context
# Kokoro synthesizes a clause with ~0.6 s of silence around it (trimmed after), and its time is in
# proportion to that whole length: seconds of synthesis per second of audio, on 2 cores (float
# convolutions, measured on clauses of 0.7-4.5 s): 0.25 on every core, 0.42 on one thread alone,
# ~0.47 on one thread beside another inference. The engine refines both from what it synthesizes.
PAD_SECONDS = 0.6
DEFAULT_RATE = {"wide": 0.25, "narrow": 0.47}
# speech at speed 1.0 is ~52 ms per character of English text (af_heart, sentences of 30-190
# characters; the engine refines it per language from what it synthesizes)
AUDIO_PER_CHAR = 0.052
# (seconds per call, seconds per character, audio seconds per character): the planner's model
DEFAULT_COST = (
    DEFAULT_RATE["wide"] * PAD_SECONDS,
    DEFAULT_RATE["wide"] * AUDIO_PER_CHAR,
    AUDIO_PER_CHAR,
)


class EngineUnavailable(RuntimeError):
    """A backend that is not installed on this machine."""


class Engine(Protocol):
    name: str
    sample_rate: int

    def voices(self) -> list[str]: ...

    def phoneme_length(self, text: str, lang_code: str) -> int:
        """How long ``text`` is in the unit the model's context is measured in."""

    def synthesize(self, text: str, voice: VoiceSpec, speed: float, run: Run = ALONE) -> np.ndarray:
        """Blocking: float32 mono audio at ``sample_rate`` for one segment, edge silence trimmed.
        ``run.threads``: a hint from the scheduler (1 under load); engines may ignore it.
        ``run.stop``: the scheduler may stop the call for a more urgent one (raise
        :class:`Stopped`); engines that cannot stop mid-call ignore it and finish."""

    def word_weights(self, text: str, lang_code: str) -> list[tuple[str, float]] | None:
        """Words of ``text`` with relative durations, for approximate alignment; None if unknown."""


def _joined(chunks: Iterable[Any]) -> np.ndarray:
    """One float32 array of a model's audio chunks (None where a chunk has no audio)."""
    parts = [np.asarray(c, dtype=np.float32) for c in chunks if c is not None]
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.float32)


# --------------------------------------------------------------------------- kokoro-onnx

_run = threading.local()  # the RunOptions of the synthesis this thread runs (see _Stoppable)


class _Stoppable:
    """An onnxruntime session whose runs carry the calling thread's ``RunOptions``, so that the
    scheduler can stop one (``terminate``) between two of the model's operators. kokoro-onnx calls
    ``session.run(None, inputs)`` and has no place for options."""

    def __init__(self, session: Any) -> None:
        self._session = session

    def __getattr__(self, name: str) -> Any:
        return getattr(self._session, name)

    def run(self, output_names: Any, input_feed: Any, run_options: Any = None) -> Any:
        options = run_options or getattr(_run, "options", None)
        return self._session.run(output_names, input_feed, options)


class KokoroOnnxEngine:
    """Kokoro-82M through kokoro-onnx on onnxruntime."""

    name = "kokoro-onnx"
    sample_rate = SAMPLE_RATE

    def __init__(
        self, files: KokoroFiles, threads: int = 0, provider: str = "auto", spin: bool = False
    ) -> None:
        import logging

        import onnxruntime as rt
        from kokoro_onnx import Kokoro

        # phonemizer warns on every word-count mismatch (we fall back to characters for those)
        logging.getLogger("phonemizer").setLevel(logging.ERROR)

        available = rt.get_available_providers()
        if provider == "auto":
            providers = [p for p in ("CUDAExecutionProvider",) if p in available]
            providers.append("CPUExecutionProvider")
        else:
            if provider not in available:
                raise EngineUnavailable(
                    f"onnxruntime provider {provider!r} is not available here "
                    f"(have {', '.join(available)})"
                )
            providers = [provider]

        def session(n: int) -> rt.InferenceSession:
            opts = rt.SessionOptions()
            opts.intra_op_num_threads = n
            opts.inter_op_num_threads = 1
            # busy-waiting worker threads burn the cores other streams (and processes) need
            opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
            return rt.InferenceSession(str(files.model), sess_options=opts, providers=providers)

        # Two sessions over the same weights: a wide one (every core on one inference: the
        # lowest latency, for a lone request such as a new stream's first clause) and a narrow
        # one (one thread: under load, one inference per core in parallel gives more audio per
        # core-second than every core on each inference in turn).
        self.threads = threads or (os.cpu_count() or 1)
        wide = session(self.threads)
        self.providers = wide.get_providers()
        self._k = Kokoro.from_session(_Stoppable(wide), str(files.voices))
        self._narrow = (
            Kokoro.from_session(_Stoppable(session(1)), str(files.voices))
            if self.threads > 1
            else self._k
        )
        self._voices = {n: np.asarray(self._k.voices[n], dtype=np.float32) for n in self._k.voices}
        self._blends: dict[tuple[str, ...], np.ndarray] = {}
        self._lock = threading.Lock()
        # seconds of synthesis per second of audio (silence around it included), smoothed, per
        # session: a one-thread inference beside others takes about twice what one on every core
        # takes, and a plan made with the wide figure under load asks for segments the buffer
        # cannot cover
        self._rate = dict(DEFAULT_RATE)
        # audio seconds per character of text at speed 1, per language, smoothed over segments
        self._audio_per_char: dict[str, float] = {}

    def estimate(
        self, lang_code: str | None = None, narrow: bool = False
    ) -> tuple[float, float, float]:
        """(seconds per call, seconds per character, audio seconds per character at speed 1)
        as measured lately (the audio rate for ``lang_code`` once one segment of it was heard);
        ``narrow``: for one-thread inferences (the scheduler's choice when streams share the node).
        """
        rate = self._rate["narrow" if narrow else "wide"]
        audio = self._audio_per_char.get(lang_code or "", AUDIO_PER_CHAR)
        return rate * PAD_SECONDS, rate * audio, audio

    def voices(self) -> list[str]:
        return sorted(self._voices)

    def _style(self, voice: VoiceSpec) -> np.ndarray:
        with self._lock:
            style = self._blends.get(voice.names)
            if style is None:
                style = np.mean([self._voices[n] for n in voice.names], axis=0).astype(np.float32)
                self._blends[voice.names] = style
            return style

    def phonemize(self, text: str, lang_code: str) -> str:
        return " ".join(self._k.tokenizer.phonemize(text, LANGUAGES[lang_code]).split())

    def phoneme_length(self, text: str, lang_code: str) -> int:
        return len(self.phonemize(text, lang_code))

    def synthesize(self, text: str, voice: VoiceSpec, speed: float, run: Run = ALONE) -> np.ndarray:
        """``run.threads=1``: the narrow session (one inference per core under load); otherwise
        the wide one (all of ``self.threads`` on this inference)."""
        import onnxruntime as rt

        options = rt.RunOptions()
        stop = run.stop
        if stop is not None:
            stop.on_stop(lambda: setattr(options, "terminate", True))
        _run.options = options
        try:
            return self._synthesize(text, voice, speed, run.threads)
        except Exception as exc:
            if stop is not None and stop.stopped:
                raise Stopped(f"stopped for a more urgent job: {text[:40]!r}") from exc
            raise
        finally:
            _run.options = None

    def _synthesize(
        self, text: str, voice: VoiceSpec, speed: float, threads: int | None
    ) -> np.ndarray:
        from kokoro_onnx.chunker import split_phonemes

        phonemes = self.phonemize(text, voice.lang_code)
        if not phonemes:
            return np.zeros(0, dtype=np.float32)
        style = self._style(voice)
        narrow = threads == 1 and self._narrow is not self._k
        model = self._narrow if narrow else self._k
        t0 = time.perf_counter()
        batches = split_phonemes(phonemes, MAX_PHONEMES)
        out = _joined(model._create_batch(batch, style, speed, True, 0.0)[0] for batch in batches)
        took = time.perf_counter() - t0
        made = len(out) / self.sample_rate + len(batches) * PAD_SECONDS / speed
        rate = min(max(took / made, 0.02), 5.0)
        mode = "narrow" if narrow else "wide"
        self._rate[mode] = 0.7 * self._rate[mode] + 0.3 * rate
        if len(text) >= 20:  # a few words say little about the rate (edge trimming, one long word)
            rate = len(out) / self.sample_rate * speed / len(text)
            old = self._audio_per_char.get(voice.lang_code)
            self._audio_per_char[voice.lang_code] = rate if old is None else 0.7 * old + 0.3 * rate
        return out

    def word_weights(self, text: str, lang_code: str) -> list[tuple[str, float]] | None:
        words = text.split()
        if not words:
            return None
        phon = self.phonemize(text, lang_code).split()
        if len(phon) == len(words):
            return [(w, float(max(1, len(p)))) for w, p in zip(words, phon, strict=False)]
        return [(w, float(max(1, len(w)))) for w in words]


# --------------------------------------------------------------------------- other backends


class KokoroTorchEngine:
    """The PyTorch ``kokoro`` package (``KPipeline``); needs ``pip install kokoro`` and its weights
    in the Hugging Face cache (``hexgrad/Kokoro-82M``). Not exercised by the tests here: the
    offline pack has no PyTorch weights."""

    name = "kokoro"
    sample_rate = SAMPLE_RATE

    def __init__(self, repo_id: str = "hexgrad/Kokoro-82M", device: str | None = None) -> None:
        try:
            from kokoro import KModel, KPipeline  # type: ignore[import-not-found]
        except ImportError as exc:
            raise EngineUnavailable("engine 'kokoro' needs `pip install kokoro` (PyTorch)") from exc
        self._model = KModel(repo_id=repo_id).to(device or "cpu").eval()
        self._pipelines: dict[str, object] = {}
        self._KPipeline = KPipeline
        self._repo_id = repo_id

    def voices(self) -> list[str]:
        return list(ALL_VOICES)

    def _pipeline(self, lang_code: str):
        p = self._pipelines.get(lang_code)
        if p is None:
            p = self._KPipeline(lang_code=lang_code, repo_id=self._repo_id, model=self._model)
            self._pipelines[lang_code] = p
        return p

    def phoneme_length(self, text: str, lang_code: str) -> int:
        return len(text)

    def synthesize(self, text: str, voice: VoiceSpec, speed: float, run: Run = ALONE) -> np.ndarray:
        pipe = self._pipeline(voice.lang_code)
        return _joined(r.audio for r in pipe(text, voice=voice.label, speed=speed))

    def word_weights(self, text: str, lang_code: str) -> list[tuple[str, float]] | None:
        return [(w, float(len(w))) for w in text.split()] or None


class MlxEngine(KokoroTorchEngine):
    """Kokoro on Apple silicon through ``mlx-audio`` (``pip install mlx-audio``); untested here."""

    name = "mlx"

    def __init__(self, repo_id: str = "prince-canuma/Kokoro-82M") -> None:
        try:
            from mlx_audio.tts.utils import load_model  # type: ignore[import-not-found]
        except ImportError as exc:
            raise EngineUnavailable(
                "engine 'mlx' needs Apple silicon and `pip install mlx-audio`"
            ) from exc
        self._mlx = load_model(repo_id)

    def synthesize(self, text: str, voice: VoiceSpec, speed: float, run: Run = ALONE) -> np.ndarray:
        said = self._mlx.generate(
            text=text, voice=voice.label, speed=speed, lang_code=voice.lang_code
        )
        return _joined(r.audio for r in said)


def create_engine(
    name: str,
    threads: int = 0,
    provider: str = "auto",
    files: KokoroFiles | None = None,
    spin: bool = False,
) -> Engine:
    if name == "kokoro-onnx":
        return KokoroOnnxEngine(
            files or ensure_kokoro(), threads=threads, provider=provider, spin=spin
        )
    if name == "kokoro":
        return KokoroTorchEngine()
    if name == "mlx":
        return MlxEngine()
    raise EngineUnavailable(f"unknown engine {name!r}: expected kokoro-onnx, kokoro or mlx")


# --------------------------------------------------------------------------- tiny synthesis helper

_engine = None


def synthesize(
    text: str, voice: str = "af_heart", speed: float = 1.0, lang_code: str | None = None
) -> tuple[np.ndarray, int]:
    """Speak ``text`` with the offline Kokoro model: ``(float32 mono audio, 24000)``.

    For tests and tools (e.g. making speech for STT tests). The model loads once per process.
    ``lang_code`` defaults to the voice's own language (its first letter).
    """
    global _engine
    if _engine is None:
        _engine = KokoroOnnxEngine(ensure_kokoro())
    spec = VoiceSpec.parse(voice, lang_code or voice[0])
    audio = _engine.synthesize(text, spec, speed)
    return audio.astype(np.float32, copy=False), SAMPLE_RATE
