"""Cut an LLM's streamed text into speakable pieces as it arrives, and clean what is not spoken.

Why a piece boundary matters: the first piece decides the dead air before the agent's voice, so it
leaves as soon as it can be spoken well. A short complete sentence ("Sure.") goes at once (peers
hold it until 20-150 characters); a long first sentence is cut at a natural break (comma,
semicolon, colon, dash, or before a conjunction such as "but" or "because") once it has a few
words. Later pieces are whole sentences (or long clauses), so the voice keeps its intonation while
the earlier audio plays. ``flush()`` returns the rest at the end of the answer.

A full stop ends a sentence only when whitespace follows it, so "3.5" never splits, and not after
an abbreviation ("Dr.", "e.g.", "vs."), an initial ("J. R. R. Tolkien") or a list number ("1."
at the start of a line). "etc.", "a.m." and "p.m." end a sentence only before a capital letter.
A line break always ends a piece (list items, paragraphs).

What is not spoken (``speakable``): markdown emphasis (``*``, ``**``, ``__``, ``_x_``), inline code
backticks, headings (``#``), list bullets (``-``, ``*``, ``+``, ``•``) and numbers (``1.``, ``2)``)
at the start of a line, markdown links (the link text stays), emoji and pictographs. A URL is read
as its host name ("https://www.example.com/a?b=1" -> "example.com"): a voice cannot spell a path
usefully. Whitespace is collapsed.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import AsyncIterator

# ---------------------------------------------------------------- what is not spoken

_LINK = re.compile(r"\[([^\]]*)\]\((?:[^)\s]+)\)")
_URL = re.compile(r"\b(?:https?://|www\.)[^\s<>()\"']+", re.IGNORECASE)
_LINE_MARKER = re.compile(r"(?m)^[ \t]*(?:#{1,6}[ \t]+|>[ \t]*|[-*+•][ \t]+|\d{1,3}[.)][ \t]+)")
_UNDERSCORE_EMPHASIS = re.compile(r"(?<!\w)_{1,2}(?=\S)(.+?)(?<=\S)_{1,2}(?!\w)")
_EMOJI = re.compile(
    "["
    "\U0001f000-\U0001faff"  # pictographs, emoticons, transport, flags, symbols and extended-A
    "\u2600-\u27bf"  # miscellaneous symbols and dingbats (☀ ✅ ✨ ❤)
    "\u2b00-\u2bff"  # arrows and stars (⭐)
    "\ufe0e\ufe0f\u200d\u20e3"  # variation selectors, zero-width joiner, keycap
    "\U000e0020-\U000e007f"  # tag characters (subdivision flags)
    "]+"
)
_SPACES = re.compile(r"\s+")
_SPACE_BEFORE_PUNCT = re.compile(r"\s+([,.;:!?])")


def _host(match: re.Match[str]) -> str:
    url = match.group(0).rstrip(".,;:!?")  # a full stop after a URL ends the sentence
    tail = match.group(0)[len(url) :]
    host = re.sub(r"^(?:https?://)?(?:www\.)?", "", url, flags=re.IGNORECASE)
    return host.split("/", 1)[0].split("?", 1)[0].split("#", 1)[0] + tail


def speakable(text: str) -> str:
    """``text`` without what a voice should not read (see the module docstring), on one line."""
    text = _LINK.sub(r"\1", text)
    text = _URL.sub(_host, text)
    text = _LINE_MARKER.sub("", text)
    text = text.replace("*", "").replace("`", "")
    text = _UNDERSCORE_EMPHASIS.sub(r"\1", text)
    text = _EMOJI.sub(" ", text)
    text = _SPACES.sub(" ", text).strip()
    return _SPACE_BEFORE_PUNCT.sub(r"\1", text)


# ---------------------------------------------------------------- where a piece may end

# Never a sentence end: a title or a Latin abbreviation (lower case, without the final dot).
ABBREVIATIONS = frozenset(
    {
        "mr",
        "mrs",
        "ms",
        "dr",
        "prof",
        "st",
        "jr",
        "sr",
        "mt",
        "ft",
        "vs",
        "e.g",
        "i.e",
        "cf",
        "approx",
        "no",
        "fig",
        "vol",
        "inc",
        "ltd",
        "co",
        "dept",
        "gen",
        "col",
        "capt",
        "sgt",
        "rev",
    }
)
# A sentence end only when the next word starts with a capital letter.
SOFT_ABBREVIATIONS = frozenset({"etc", "a.m", "p.m", "u.s", "u.k", "al"})
# A cut right after one of these would leave a phrase hanging ("the", "of", "and" ...).
_NO_CUT_AFTER = frozenset(
    {
        "a",
        "an",
        "the",
        "this",
        "that",
        "these",
        "those",
        "my",
        "your",
        "our",
        "their",
        "his",
        "her",
        "its",
        "of",
        "to",
        "in",
        "on",
        "at",
        "for",
        "with",
        "from",
        "by",
        "about",
        "into",
        "and",
        "or",
        "but",
        "so",
        "than",
        "as",
        "is",
        "are",
        "was",
        "were",
        "be",
        "very",
        "not",
        "no",
        "mr",
        "mrs",
        "dr",
        "ms",
        "i",
    }
)
CONJUNCTIONS = (
    "and",
    "but",
    "because",
    "so",
    "which",
    "while",
    "although",
    "though",
    "whereas",
    "since",
    "unless",
    "then",
)

# Terminal punctuation, then any closing quotes/brackets/emphasis, confirmed by whitespace.
_SENTENCE_END = re.compile(r"(?:\.{3}|…|[.!?]+)[\"'”’)\]*_]*(?=\s)")
_CLAUSE_BREAK = re.compile(
    r"[,;:][\"'”’)\]*_]*(?=\s)"  # comma, semicolon, colon (and "3,5" or "10:30" are not breaks)
    r"|(?<=\S)[ \t]+[-–—](?=[ \t])"  # a spaced dash (not a bullet at the start of a line)
    r"|(?<=\w)—(?=\w)"  # an unspaced em dash
    r"|(?<=\S)[ \t]+(?=(?:" + "|".join(CONJUNCTIONS) + r")[ \t])",  # before a conjunction
    re.IGNORECASE,
)
_NUMBER = re.compile(r"^[\d.,]+$")


class Chunker:
    """Streamed text in (``push`` each delta), speakable pieces out, in order.

    ``first_min_words``: a first piece cut at a natural break has at least this many words.
    ``first_max_words``: with no break at all, the first piece is cut at a word boundary after
    this many words (dead air is worse than a cut mid-phrase). ``min_chars``: a later sentence
    shorter than this joins the next one. ``clause_chars``: a later sentence this long is cut at
    its next natural break. ``max_chars``: a piece never grows beyond this (cut at a word).
    """

    def __init__(
        self,
        *,
        first_min_words: int = 4,
        first_max_words: int = 20,
        min_chars: int = 20,
        clause_chars: int = 120,
        max_chars: int = 300,
    ) -> None:
        if not 1 <= first_min_words <= first_max_words:
            raise ValueError(
                f"first_min_words={first_min_words} and first_max_words="
                f"{first_max_words}: need 1 <= first_min_words <= first_max_words"
            )
        if not 0 <= min_chars <= clause_chars <= max_chars:
            raise ValueError(
                f"min_chars={min_chars}, clause_chars={clause_chars}, max_chars="
                f"{max_chars}: need 0 <= min_chars <= clause_chars <= max_chars"
            )
        self.first_min_words = first_min_words
        self.first_max_words = first_max_words
        self.min_chars = min_chars
        self.clause_chars = clause_chars
        self.max_chars = max_chars
        self._buffer = ""
        self._pieces = 0  # pieces given out so far (the first piece has its own rules)

    def push(self, delta: str) -> list[str]:
        """Add a delta of the answer; returns the pieces it completed (often none)."""
        self._buffer += delta
        pieces: list[str] = []
        while (cut := self._next_cut()) is not None:
            piece = self._take(cut)
            if piece:
                pieces.append(piece)
        return pieces

    def flush(self) -> list[str]:
        """The answer is complete: the rest, as one last piece (none when nothing speakable)."""
        piece = self._take(len(self._buffer))
        return [piece] if piece else []

    # ------------------------------------------------------------ internals

    def _take(self, cut: int) -> str:
        raw, self._buffer = self._buffer[:cut], self._buffer[cut:]
        piece = speakable(raw)
        if piece and "\n" in self._buffer[:1] and piece[-1].isalnum():
            piece += "."  # a list item or heading read as a sentence, not run into the next
        if piece:
            self._pieces += 1
        return piece

    def _next_cut(self) -> int | None:
        """Where the next piece ends in the buffer, or None while it cannot be known yet."""
        text = self._buffer
        first = self._pieces == 0
        line_end = text.find("\n")
        if line_end == 0:  # a line break right at the start: drop it
            self._buffer = text.lstrip()
            return None if not self._buffer else self._next_cut()
        scope = text if line_end < 0 else text[:line_end]
        sentence = self._sentence_end(scope, first)
        if sentence is not None:
            return sentence
        clause = self._clause_break(scope, first)
        if clause is not None:
            return clause
        if line_end > 0:
            return line_end
        return self._forced_cut(scope, first)

    def _sentence_end(self, scope: str, first: bool) -> int | None:
        for match in _SENTENCE_END.finditer(scope):
            verdict = _ends_sentence(scope, match)
            if verdict is None:
                return None  # undecided until the next word arrives
            if not verdict:
                continue
            if first or len(speakable(scope[: match.end()])) >= self.min_chars:
                return match.end()
        return None

    def _clause_break(self, scope: str, first: bool) -> int | None:
        for match in _CLAUSE_BREAK.finditer(scope):
            before = scope[: match.end()]
            words = speakable(before).split()
            if not words or _no_cut_after(words[-1]) or _splits_number(scope, match):
                continue
            if first and len(words) >= self.first_min_words:
                return match.end()
            if not first and len(speakable(before)) >= self.clause_chars:
                return match.end()
        return None

    def _forced_cut(self, scope: str, first: bool) -> int | None:
        """No break in sight: cut at the last good word boundary, once the piece is too long."""
        words = list(re.finditer(r"\S+(?=\s)", scope))  # complete words only
        too_long = (
            len(words) >= self.first_max_words if first else len(speakable(scope)) >= self.max_chars
        )
        if not too_long:
            return None
        for word in reversed(words[1:]):
            if not _no_cut_after(speakable(word.group(0))):
                return word.end()
        return words[-1].end()


def _ends_sentence(scope: str, match: re.Match[str]) -> bool | None:
    """Whether the punctuation ``match`` ends a sentence; None when the next word decides."""
    mark = match.group(0).rstrip("\"'”’)]*_")
    if mark != ".":
        return True  # "!", "?", "...", "?!" end a sentence
    start = match.start()
    word = re.search(r"\S*$", scope[:start]).group(0).lstrip("(\"'“‘*_[").lower()  # type: ignore[union-attr]
    if not word:
        return True
    if word in ABBREVIATIONS or (len(word) == 1 and word.isalpha()):
        return False  # "Dr." or an initial ("J.")
    if word.isdigit() and not scope[: start - len(word)].strip():
        return False  # a list number at the start of a line ("1.")
    if word in SOFT_ABBREVIATIONS:
        rest = scope[match.end() :].lstrip()
        if not rest:
            return None
        return rest[0].isupper()
    return True


def _no_cut_after(word: str) -> bool:
    return word.lower().strip(",;:\"'”’)(") in _NO_CUT_AFTER


def _splits_number(scope: str, match: re.Match[str]) -> bool:
    """A conjunction between numbers ("between 3 and 5") is not a break."""
    before = scope[: match.start()].split()
    after = scope[match.end() :].split()
    near = [before[-1]] if before else []
    near += after[1:2] if len(after) > 1 else []
    return any(_NUMBER.match(w.strip(",;:")) for w in near) and not match.group(0).strip()


async def chunks(deltas: AsyncIterator[str], chunker: Chunker | None = None) -> AsyncIterator[str]:
    """The pipeline's view: an LLM's deltas in, speakable pieces out as soon as each is ready.

    Closing this iterator (barge-in) closes ``deltas`` too, so the LLM stops generating.
    """
    chunker = chunker or Chunker()
    try:
        async for delta in deltas:
            for piece in chunker.push(delta):
                yield piece
        for piece in chunker.flush():
            yield piece
    finally:
        aclose = getattr(deltas, "aclose", None)
        if aclose is not None:
            with contextlib.suppress(Exception):
                await aclose()
