"""The text planner: a text cut into the segments the engine synthesizes, in order.

:func:`plan_segments` cuts a text so that the first segment is short (a few words at a natural
break: first audio comes fast) and later segments grow geometrically (each is synthesized while the
audio before it plays) up to ~8 s of speech (``SEGMENT_CHARS``) and the spec's limits: 510
phonemes for English, about 400 characters for the other languages, always at sentence boundaries
when the text allows. The first cut is the shortest natural one whose rest can be ready in time.
"""

from __future__ import annotations

import re
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

from node.tts.engine import DEFAULT_COST, MAX_PHONEMES, Engine

OTHER_MAX_CHARS = 400  # other languages: characters per segment


@dataclass
class Segment:
    text: str
    pause_after: float  # seconds of silence the punctuation at its end calls for


_SENTENCE_END = re.compile(r"(?<=[.!?…。！？])[\"'”’)\]]*\s+|(?<=[。！？])")
_CLAUSE_END = re.compile(r"(?<=[,;:—–、，；：])\s*")
_BREAK_WORDS = frozenset(
    (
        "and but or so because which that who when where while if then to of in on at for with "
        "from as than until unless although though since after before about into "
    ).split()
)
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
    (
        "a an the my your his her its our their this that these those to of in on at for with "
        "from by and or but so is are was were be i you we they he she it very "
    ).split()
)


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
            return " ".join(words[: i + 1]), " ".join(words[i + 1 :])
    for i in range(max_words, 1, -1):
        if words[i].lower().strip("\"'(") in _BREAK_WORDS:
            return " ".join(words[:i]), " ".join(words[i:])
    cut = max(1, max_words - 1)
    while cut > 2 and words[cut - 1].lower().strip("\"'(") in _WEAK_ENDINGS:
        cut -= 1
    return " ".join(words[:cut]), " ".join(words[cut:])


def _split_long(piece: str, limit: int, measure: Callable[[str], int]) -> list[str]:
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


def plan_segments(
    text: str,
    lang_code: str,
    engine: Engine | None = None,
    *,
    cut_first: bool = True,
    first_words: int = 4,
    speed: float = 1.0,
    lead_seconds: float = 0.1,
    min_chars: int = 30,
    ahead_seconds: float | None = None,
    narrow: bool = False,
) -> list[Segment]:
    """Segments to synthesize in order: a short first one, then ones sized so each is ready
    before the audio ahead of it runs out, growing to whole sentences within the model limits
    and ``SEGMENT_CHARS``.

    The size of segment k comes from the engine's cost model (``engine.estimate``: fixed cost per
    call plus cost per character, scaled by what it measured lately): its synthesis must fit in
    the audio already planned after the first segment plus the lead. Whole sentences are taken
    when they fit, otherwise the sentence is cut at a natural break. English segments stay within
    510 phonemes, other languages within 400 characters; Japanese and Chinese (no spaces) are
    cut at sentence ends only.

    ``ahead_seconds``: re-plan the rest of a text mid-way: that much audio is already buffered
    ahead of the listener, so even the first segment is sized to be ready before it runs out
    (no first-clause cut). ``narrow``: the node is shared, so segments are sized with the
    engine's one-thread cost.
    """
    limit, measure = _context_limit(lang_code, engine)
    atoms: deque[str] = deque(
        piece
        for sentence in split_sentences(text)
        for piece in _split_long(sentence, limit, measure)
    )
    if not atoms:
        return []
    cost = _cost_model(engine, lang_code, narrow)

    def plan(atoms: deque[str]) -> tuple[list[Segment], int]:
        budget = _Budget(cost, speed=speed, lead=lead_seconds, played=ahead_seconds or 0.0)
        return _segments(atoms, budget, ahead_seconds is None, limit, measure, spaced, min_chars)

    spaced = lang_code not in ("j", "z")
    if not (cut_first and spaced and ahead_seconds is None):
        return plan(atoms)[0]
    # the shortest first cut whose rest can be synthesized while the audio before it plays: a
    # short one ("I think") before a longer rest was a gap of up to 0.4 s in every other reply
    sentence, later = atoms[0], list(atoms)[1:]
    head, rest = first_cut(sentence, first_words)
    best: tuple[int, list[Segment]] | None = None
    while True:
        segments, gaps = plan(deque([head, *([rest] if rest else []), *later]))
        if best is None or gaps < best[0]:
            best = (gaps, segments)
        if not gaps or not rest:
            return best[1]
        head, rest = _next_cut(sentence, len(head))


def _next_cut(sentence: str, after: int) -> tuple[str, str]:
    """The first natural cut of ``sentence`` with a head longer than ``after`` characters."""
    for n in range(after + 1, len(sentence)):
        head, rest = cut_at(sentence, n)
        if len(head) > after:
            return head, rest
    return sentence, ""


def _segments(
    atoms: deque[str],
    budget: _Budget,
    first_plays: bool,
    limit: int,
    measure: Callable[[str], int],
    spaced: bool,
    min_chars: int,
) -> tuple[list[Segment], int]:
    """The segments of ``atoms`` in order, and how many could not be sized to be ready in time
    (the engine cannot get ahead there: a gap, at a natural break). ``first_plays``: the first
    atom is the first segment, as is, and plays while the next ones are synthesized."""
    segments: list[Segment] = []
    gaps = 0
    if first_plays:
        segments.append(_segment(atoms.popleft()))
        budget.hear(segments[0])
    while atoms:
        max_chars = budget.max_chars(min_chars)
        gaps += max_chars == 0
        segments.append(_segment(_take(atoms, max_chars, limit, measure, spaced, min_chars)))
        budget.hear(segments[-1])
        budget.synthesize(segments[-1])
    segments[-1].pause_after = 0.0
    return segments, gaps


def _context_limit(lang_code: str, engine: Engine | None) -> tuple[int, Callable[[str], int]]:
    """The longest segment the model takes, and how to measure a piece against it."""
    if lang_code in ("a", "b") and engine is not None:
        return MAX_PHONEMES, lambda s: engine.phoneme_length(s, lang_code)
    return OTHER_MAX_CHARS, len


def _segment(text: str) -> Segment:
    return Segment(text, _pause_for(text))


class _Cost(NamedTuple):
    """The engine's cost model (``Engine.estimate``) for one language and kind of inference."""

    fixed: float  # seconds per engine call
    per_char: float  # synthesis seconds per character
    audio_per_char: float  # audio seconds per character at speed 1

    def seconds(self, text: str) -> float:
        """Synthesis seconds ``text`` is expected to take."""
        return self.fixed + self.per_char * len(text)


@dataclass
class _Budget:
    """A plan's running account: the audio planned so far against the synthesis it costs."""

    cost: _Cost
    speed: float
    lead: float
    played: float = 0.0  # audio seconds planned (or buffered ahead) so far
    synth: float = 0.0  # synthesis seconds of the segments after the first

    def hear(self, seg: Segment) -> None:
        self.played += self.cost.audio_per_char * len(seg.text) / self.speed + seg.pause_after

    def synthesize(self, seg: Segment) -> None:
        self.synth += self.cost.seconds(seg.text)

    def max_chars(self, min_chars: int) -> int:
        """The longest next segment that is ready before the audio ahead of it runs out; 0 when
        the engine cannot get ahead here (short audio so far, or a slow machine)."""
        # plan each call to finish with a margin to spare: the cost model is an average, and
        # one late segment is an audible gap
        budget = (self.played + self.lead) * BUDGET_MARGIN - self.synth
        # never below min_chars: each call also synthesizes ~0.6 s of silence, so slicing finer
        # adds calls (and breaks prosody); a gap, if any, falls at a natural break instead
        max_chars = int((budget - self.cost.fixed) / self.cost.per_char)
        return min(max_chars, SEGMENT_CHARS) if max_chars >= min_chars else 0


def _take(
    atoms: deque[str],
    max_chars: int,
    limit: int,
    measure: Callable[[str], int],
    spaced: bool,
    min_chars: int,
) -> str:
    """The next segment's text off the front of ``atoms``: whole atoms while they fit in
    ``max_chars`` and the model's limit; else the first atom cut at a natural break; with
    ``max_chars`` 0 the next whole atom (the most efficient call: the gap falls at its start)."""
    cur: list[str] = []
    while atoms:
        cand = " ".join([*cur, atoms[0]])
        if len(cand) <= max_chars and (len(cand) <= limit // 2 or measure(cand) <= limit):
            cur.append(atoms.popleft())
        else:
            break
    if cur:
        return " ".join(cur)
    if not (spaced and max_chars):
        return atoms.popleft()
    head, rest = cut_at(atoms[0], max_chars)
    if len(rest) < min_chars // 2:  # do not leave a scrap for its own call
        head, rest = atoms[0], ""
    if rest:
        atoms[0] = rest
    else:
        atoms.popleft()
    return head


# a segment's planned synthesis must fit in this share of the audio buffered ahead of it
BUDGET_MARGIN = 0.8
# at most ~8 s of speech per segment: the longer the job, the less sure its cost (one of 215
# characters ran 25% over its estimate beside another stream's: a gap), and the longer a new
# stream's first clause may have to share the cores with it
SEGMENT_CHARS = 160


def synthesis_cost(engine: Engine | None, text: str, lang_code: str, narrow: bool) -> float:
    """Seconds ``engine`` is expected to take for ``text`` (on one thread when ``narrow``): what
    the scheduler weighs when it decides which job may wait."""
    return _cost_model(engine, lang_code, narrow).seconds(text)


def _cost_model(engine: Engine | None, lang_code: str | None = None, narrow: bool = False) -> _Cost:
    est = getattr(engine, "estimate", None)
    return _Cost(*(est(lang_code, narrow=narrow) if callable(est) else DEFAULT_COST))
