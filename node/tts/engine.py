"""Speech engines behind one narrow interface, and the text planner that feeds them.

An :class:`Engine` turns one *segment* of text (a clause, a sentence, a few sentences) into
float32 mono audio at its native rate. The node never calls a model directly, so another backend
drops in by implementing :class:`Engine`:

* ``kokoro-onnx`` (:class:`KokoroOnnxEngine`): Kokoro-82M int8 on onnxruntime, CPU by default and
  the CUDA provider where onnxruntime-gpu is installed. The default and the only one tested here.
* ``kokoro`` (:class:`KokoroTorchEngine`): the PyTorch ``kokoro`` package (``KPipeline``), where
  it and its weights are installed.
* ``mlx`` (:class:`MlxEngine`): ``mlx-audio`` on Apple silicon, where installed.

:func:`plan_segments` cuts a text so that the first segment is short (a few words at a natural
break: first audio comes fast) and later segments grow geometrically (each is synthesized while the
audio before it plays) up to the spec's limits: 510 phonemes for English, about 400 characters
for the other languages, always at sentence boundaries when the text allows.
"""

from __future__ import annotations

import os
import re
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from node.models.kokoro import ALL_VOICES, LANGUAGES, SAMPLE_RATE, KokoroFiles, ensure_kokoro

MAX_PHONEMES = 510          # English: the model's context
OTHER_MAX_CHARS = 400       # other languages: characters per segment
SPEED_RANGE = (0.5, 2.0)
MAX_BLEND = 8


class EngineError(ValueError):
    """A request the engine cannot serve (unknown voice, language...); the message is for clients."""


class EngineUnavailable(RuntimeError):
    """A backend that is not installed on this machine."""


@dataclass(frozen=True)
class VoiceSpec:
    """One voice or a blend (``"af_heart,af_bella"`` averages the voice tensors) in a language."""

    names: tuple[str, ...]
    lang_code: str

    @staticmethod
    def parse(voice: str, lang_code: str | None = None) -> VoiceSpec:
        if not isinstance(voice, str) or not voice.strip():
            raise EngineError("voice must be a voice id such as 'af_heart' or a blend 'af_heart,af_bella'")
        names = tuple(n.strip() for n in voice.split(","))
        if len(names) > MAX_BLEND:
            raise EngineError(f"a blend takes at most {MAX_BLEND} voices, got {len(names)}")
        for n in names:
            if n not in ALL_VOICES:
                raise EngineError(f"unknown voice {n!r}: expected one of the 54 Kokoro voices, "
                                  "e.g. af_heart, bf_emma, ef_dora, ff_siwis, jf_alpha, zf_xiaoxiao")
        lang = names[0][0] if lang_code is None else lang_code
        if lang not in LANGUAGES:
            raise EngineError(f"unknown lang_code {lang!r}: expected one of "
                              f"{', '.join(LANGUAGES)} (a=en-us b=en-gb e=es f=fr h=hi i=it j=ja "
                              "p=pt-br z=zh)")
        return VoiceSpec(names, lang)

    @property
    def label(self) -> str:
        return ",".join(self.names)


def check_speed(speed: object) -> float:
    if isinstance(speed, bool) or not isinstance(speed, (int, float)):
        raise EngineError(f"speed must be a number between {SPEED_RANGE[0]} and {SPEED_RANGE[1]}")
    s = float(speed)
    if not (SPEED_RANGE[0] <= s <= SPEED_RANGE[1]):
        raise EngineError(f"speed {s} is outside {SPEED_RANGE[0]}-{SPEED_RANGE[1]}")
    return s


@dataclass
class Segment:
    text: str
    pause_after: float  # seconds of silence the punctuation at its end calls for


class Engine(Protocol):
    name: str
    sample_rate: int

    def voices(self) -> list[str]: ...

    def phoneme_length(self, text: str, lang_code: str) -> int:
        """How long ``text`` is in the unit the model's context is measured in."""

    def synthesize(self, text: str, voice: VoiceSpec, speed: float,
                   threads: int | None = None) -> np.ndarray:
        """Blocking: float32 mono audio at ``sample_rate`` for one segment, edge silence trimmed.
        ``threads``: a hint from the scheduler (1 under load); engines may ignore it."""

    def word_weights(self, text: str, lang_code: str) -> list[tuple[str, float]] | None:
        """Words of ``text`` with relative durations, for approximate alignment; None if unknown."""


# --------------------------------------------------------------------------- kokoro-onnx


class KokoroOnnxEngine:
    """Kokoro-82M through kokoro-onnx on onnxruntime."""

    name = "kokoro-onnx"
    sample_rate = SAMPLE_RATE

    def __init__(self, files: KokoroFiles, threads: int = 0, provider: str = "auto",
                 spin: bool = False) -> None:
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
                raise EngineUnavailable(f"onnxruntime provider {provider!r} is not available here "
                                        f"(have {', '.join(available)})")
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
        self._k = Kokoro.from_session(wide, str(files.voices))
        self._narrow = (Kokoro.from_session(session(1), str(files.voices))
                        if self.threads > 1 else self._k)
        self._voices = {n: np.asarray(self._k.voices[n], dtype=np.float32) for n in self._k.voices}
        self._blends: dict[tuple[str, ...], np.ndarray] = {}
        self._lock = threading.Lock()
        self._cost_scale = 1.0  # measured / modelled synthesis time, smoothed
        # audio seconds per character of text at speed 1, per language, smoothed over segments
        self._audio_per_char: dict[str, float] = {}

    def estimate(self, lang_code: str | None = None) -> tuple[float, float, float]:
        """(seconds per call, seconds per character, audio seconds per character at speed 1)
        as measured lately (the audio rate for ``lang_code`` once one segment of it was heard)."""
        fixed, per_char, audio = DEFAULT_COST
        k = min(max(self._cost_scale, 0.3), 4.0)
        return fixed * k, per_char * k, self._audio_per_char.get(lang_code or "", audio)

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

    def synthesize(self, text: str, voice: VoiceSpec, speed: float,
                   threads: int | None = None) -> np.ndarray:
        """``threads=1``: the narrow session (one inference per core under load); otherwise
        the wide one (all of ``self.threads`` on this inference)."""
        from kokoro_onnx.chunker import split_phonemes

        phonemes = self.phonemize(text, voice.lang_code)
        if not phonemes:
            return np.zeros(0, dtype=np.float32)
        style = self._style(voice)
        model = self._narrow if threads == 1 else self._k
        parts = []
        t0 = time.perf_counter()
        batches = split_phonemes(phonemes, MAX_PHONEMES)
        for batch in batches:
            audio, _ = model._create_batch(batch, style, speed, True, 0.0)
            parts.append(np.asarray(audio, dtype=np.float32))
        fixed, per_char, _ = DEFAULT_COST
        ratio = (time.perf_counter() - t0) / (fixed * len(batches) + per_char * len(text))
        self._cost_scale = 0.7 * self._cost_scale + 0.3 * ratio
        out = np.concatenate(parts) if parts else np.zeros(0, dtype=np.float32)
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
            return [(w, float(max(1, len(p)))) for w, p in zip(words, phon)]
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

    def synthesize(self, text: str, voice: VoiceSpec, speed: float,
                   threads: int | None = None) -> np.ndarray:
        pipe = self._pipeline(voice.lang_code)
        parts = [np.asarray(r.audio, dtype=np.float32)
                 for r in pipe(text, voice=voice.label, speed=speed) if r.audio is not None]
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.float32)

    def word_weights(self, text: str, lang_code: str) -> list[tuple[str, float]] | None:
        return [(w, float(len(w))) for w in text.split()] or None


class MlxEngine(KokoroTorchEngine):
    """Kokoro on Apple silicon through ``mlx-audio`` (``pip install mlx-audio``); untested here."""

    name = "mlx"

    def __init__(self, repo_id: str = "prince-canuma/Kokoro-82M") -> None:
        try:
            from mlx_audio.tts.utils import load_model  # type: ignore[import-not-found]
        except ImportError as exc:
            raise EngineUnavailable("engine 'mlx' needs Apple silicon and `pip install mlx-audio`") from exc
        self._mlx = load_model(repo_id)

    def synthesize(self, text: str, voice: VoiceSpec, speed: float,
                   threads: int | None = None) -> np.ndarray:
        parts = [np.asarray(r.audio, dtype=np.float32) for r in
                 self._mlx.generate(text=text, voice=voice.label, speed=speed,
                                    lang_code=voice.lang_code)]
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.float32)


def create_engine(name: str, threads: int = 0, provider: str = "auto",
                  files: KokoroFiles | None = None, spin: bool = False) -> Engine:
    if name == "kokoro-onnx":
        return KokoroOnnxEngine(files or ensure_kokoro(), threads=threads, provider=provider,
                                spin=spin)
    if name == "kokoro":
        return KokoroTorchEngine()
    if name == "mlx":
        return MlxEngine()
    raise EngineUnavailable(f"unknown engine {name!r}: expected kokoro-onnx, kokoro or mlx")


# --------------------------------------------------------------------------- text planning

_SENTENCE_END = re.compile(r"(?<=[.!?…。！？])[\"'”’)\]]*\s+|(?<=[。！？])")
_CLAUSE_END = re.compile(r"(?<=[,;:—–、，；：])\s*")
_BREAK_WORDS = frozenset(
    ["and", "but", "or", "so", "because", "which", "that", "who", "when", "where", "while", "if", "then", "to", "of", "in", "on", "at", "for", "with", "from", "as", "than", "until", "unless", "although", "though", "since", "after", "before", "about", "into"])
_SENTENCE_PAUSE = 0.25
_CLAUSE_PAUSE = 0.10


def split_sentences(text: str) -> list[str]:
    return [s.strip() for s in _SENTENCE_END.split(text.strip()) if s and s.strip()]


def _pause_for(text: str) -> float:
    t = text.rstrip("\"'”’)] ")
    if not t:
        return 0.0
    if t[-1] in ".!?…。！？":
        return _SENTENCE_PAUSE
    if t[-1] in ",;:—–、，；：":
        return _CLAUSE_PAUSE
    return 0.0


_WEAK_ENDINGS = frozenset(
    ["a", "an", "the", "my", "your", "his", "her", "its", "our", "their", "this", "that", "these", "those", "to", "of", "in", "on", "at", "for", "with", "from", "by", "and", "or", "but", "so", "is", "are", "was", "were", "be", "i", "you", "we", "they", "he", "she", "it", "very"])


def first_cut(sentence: str, max_words: int = 4) -> tuple[str, str]:
    """Cut the first few words off a sentence at the most natural break, for fast first audio.

    Preference: a clause mark within the first ``max_words`` words; else just before a
    conjunction/preposition; else after a few words, never ending on an article or preposition.
    Short sentences stay whole.
    """
    words = sentence.split()
    if len(words) <= max_words + 1:
        return sentence, ""
    for i in range(max_words):
        if words[i][-1] in ",;:—–":
            return " ".join(words[: i + 1]), " ".join(words[i + 1:])
    for i in range(max_words, 1, -1):
        if words[i].lower().strip("\"'(") in _BREAK_WORDS:
            return " ".join(words[:i]), " ".join(words[i:])
    cut = max(1, max_words - 1)
    while cut > 2 and words[cut - 1].lower().strip("\"'(") in _WEAK_ENDINGS:
        cut -= 1
    return " ".join(words[:cut]), " ".join(words[cut:])


def _split_long(piece: str, limit: int, measure) -> list[str]:
    """Split a piece longer than ``limit`` at clause marks, then at words."""
    if measure(piece) <= limit:
        return [piece]
    clauses = [c for c in _CLAUSE_END.split(piece) if c.strip()]
    if len(clauses) > 1:
        return [p for c in clauses for p in _split_long(c.strip(), limit, measure)]
    words = piece.split()
    out, cur = [], []
    for w in words:
        if cur and measure(" ".join(cur + [w])) > limit:
            out.append(" ".join(cur))
            cur = []
        cur.append(w)
    if cur:
        out.append(" ".join(cur))
    return out


def cut_at(text: str, max_chars: int) -> tuple[str, str]:
    """Cut ``text`` into a head of at most ``max_chars`` (at least one word) at the most natural
    break: after a clause mark, else before a conjunction/preposition, else at a word boundary
    that does not end on an article or preposition."""
    words = text.split()
    i = 0
    while i < len(words) and len(" ".join(words[: i + 1])) <= max_chars:
        i += 1
    if i >= len(words):
        return text, ""
    i = max(i, 1)
    for j in range(i, 0, -1):
        if words[j - 1][-1] in ",;:—–" and j >= min(2, i):
            return " ".join(words[:j]), " ".join(words[j:])
    for j in range(i, 1, -1):
        if words[j].lower().strip("\"'(") in _BREAK_WORDS:
            return " ".join(words[:j]), " ".join(words[j:])
    j = i
    while j > 2 and words[j - 1].lower().strip("\"'(") in _WEAK_ENDINGS:
        j -= 1
    return " ".join(words[:j]), " ".join(words[j:])


def plan_segments(text: str, lang_code: str, engine: Engine | None = None, *,
                  cut_first: bool = True, first_words: int = 4, speed: float = 1.0,
                  lead_seconds: float = 0.1, min_chars: int = 30,
                  ahead_seconds: float | None = None) -> list[Segment]:
    """Segments to synthesize in order: a short first one, then ones sized so each is ready
    before the audio ahead of it runs out, growing to whole sentences within the model limits.

    The size of segment k comes from the engine's cost model (``engine.estimate``: fixed cost per
    call plus cost per character, scaled by what it measured lately): its synthesis must fit in
    the audio already planned after the first segment plus the lead. Whole sentences are taken
    when they fit, otherwise the sentence is cut at a natural break. English segments stay within
    510 phonemes, other languages within 400 characters; Japanese and Chinese (no spaces) are
    cut at sentence ends only.

    ``ahead_seconds``: re-plan the rest of a text mid-way: that much audio is already buffered
    ahead of the listener, so even the first segment is sized to be ready before it runs out
    (no first-clause cut).
    """
    english = lang_code in ("a", "b")
    if english and engine is not None:
        limit = MAX_PHONEMES

        def measure(s: str) -> int:
            return engine.phoneme_length(s, lang_code)
    else:
        limit = OTHER_MAX_CHARS

        def measure(s: str) -> int:
            return len(s)

    atoms: deque[str] = deque()
    for sentence in split_sentences(text):
        atoms.extend(_split_long(sentence, limit, measure))
    if not atoms:
        return []
    spaced = lang_code not in ("j", "z")
    if cut_first and spaced and ahead_seconds is None:
        head, rest = first_cut(atoms[0], first_words)
        atoms[0] = head
        if rest:
            atoms.insert(1, rest)

    fixed, per_char, audio_per_char = _cost_model(engine, lang_code)
    segments: list[Segment] = []
    if ahead_seconds is None:
        first = atoms.popleft()
        segments.append(Segment(first, _pause_for(first)))
        played = audio_per_char * len(first) / speed + segments[0].pause_after
    else:
        played = ahead_seconds
    synth = 0.0
    while atoms:
        # plan each call to finish with a margin to spare: the cost model is an average, and
        # one late segment is an audible gap
        budget = (played + lead_seconds) * BUDGET_MARGIN - synth
        # never below min_chars: each call costs a fixed ~0.4 s, so slicing finer only adds calls
        # (and breaks prosody); a gap, if any, falls at a natural break instead
        max_chars = int((budget - fixed) / per_char)
        if max_chars < min_chars:
            # the engine cannot get ahead here (short audio so far, or a slow machine): take the
            # next whole sentence, the most efficient call, and let the gap fall at its start
            max_chars = 0
        cur: list[str] = []
        while atoms:
            cand = " ".join([*cur, atoms[0]])
            if len(cand) <= max_chars and (len(cand) <= limit // 2 or measure(cand) <= limit):
                cur.append(atoms.popleft())
            else:
                break
        if not cur:
            if spaced and max_chars:
                head, rest = cut_at(atoms[0], max_chars)
                if len(rest) < min_chars // 2:  # do not leave a scrap for its own call
                    head, rest = atoms[0], ""
                if rest:
                    atoms[0] = rest
                else:
                    atoms.popleft()
                cur = [head]
            else:
                cur = [atoms.popleft()]
        seg = " ".join(cur)
        segments.append(Segment(seg, _pause_for(seg)))
        played += audio_per_char * len(seg) / speed + segments[-1].pause_after
        synth += fixed + per_char * len(seg)
    segments[-1].pause_after = 0.0
    return segments


# Kokoro int8 on 2 CPU cores (measured): ~0.42 s per call plus ~16 ms per character; speech
# at speed 1.0 is ~52 ms per character of English text (af_heart, sentences of 30-190 characters;
# the engine refines it per language from what it synthesizes).
DEFAULT_COST = (0.42, 0.016, 0.052)
# a segment's planned synthesis must fit in this share of the audio buffered ahead of it
BUDGET_MARGIN = 0.8


def _cost_model(engine: Engine | None, lang_code: str | None = None) -> tuple[float, float, float]:
    est = getattr(engine, "estimate", None)
    if not callable(est):
        return DEFAULT_COST
    try:
        return est(lang_code)
    except TypeError:  # an engine whose estimate() takes no language
        return est()


# --------------------------------------------------------------------------- tiny synthesis helper

_engine = None


def synthesize(text: str, voice: str = "af_heart", speed: float = 1.0,
               lang_code: str | None = None) -> tuple[np.ndarray, int]:
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
