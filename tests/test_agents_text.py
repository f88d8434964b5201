"""The speakable-text chunker (agents/text.py): where an LLM's streamed answer is cut for TTS, and
what is cleaned out of it. Pure functions: each case feeds deltas the way an LLM streams them."""

from __future__ import annotations

import re

import pytest

from agents.text import Chunker, chunks, speakable

pytestmark = pytest.mark.fast  # unit tests: no process, no model (make test-fast)


def tokens(text: str) -> list[str]:
    """Deltas shaped like an LLM's: a word with the space before it (" world")."""
    return re.findall(r"\s*\S+|\s+$", text)


def feed(deltas: list[str], chunker: Chunker | None = None) -> list[tuple[int, str]]:
    """(index of the delta after which the piece left, piece); len(deltas) means flush()."""
    chunker = chunker or Chunker()
    out = [(i, piece) for i, delta in enumerate(deltas) for piece in chunker.push(delta)]
    return out + [(len(deltas), piece) for piece in chunker.flush()]


def pieces(text: str, **kw: int) -> list[str]:
    return [piece for _, piece in feed(tokens(text), Chunker(**kw))]


# ---------------------------------------------------------------- the first piece


def test_a_short_first_sentence_leaves_at_once() -> None:
    deltas = tokens("Sure. I can tell you all about the weather in Paris this week.")
    out = feed(deltas)
    assert out[0] == (1, "Sure.")  # as soon as the next delta confirms the full stop
    assert [p for _, p in out] == [
        "Sure.",
        ("I can tell you all about the weather in Paris this week."),
    ]


@pytest.mark.parametrize("first", ["Sure.", "Yes!", "Hmm?", "Okay...", "Hi there!", "No…"])
def test_any_short_first_sentence_is_a_piece(first: str) -> None:
    assert pieces(f"{first} The answer follows in a longer sentence here.")[0] == first


def test_a_long_first_sentence_is_cut_at_a_comma_once_it_has_a_few_words() -> None:
    out = feed(
        tokens(
            "The weather in Paris is mild, with light rain expected on Tuesday and "
            "sunshine for the rest of the week."
        )
    )
    assert out[0] == (6, "The weather in Paris is mild,")  # before the rest of the sentence
    assert out[1][1] == (
        "with light rain expected on Tuesday and sunshine for the rest of the week."
    )


def test_no_cut_at_a_comma_after_one_or_two_words() -> None:
    assert pieces("Well, I think it is going to rain today.") == [
        "Well, I think it is going to rain today."
    ]
    assert pieces("Yes, of course, I can help you with the booking right now.") == [
        "Yes, of course, I can help you with the booking right now."
    ]
    assert (
        pieces("Yes, of course, my friend, I can help you with the booking right now.")[0]
        == "Yes, of course, my friend,"
    )


@pytest.mark.parametrize(
    "text, first",
    [
        (
            "I looked at your calendar; tomorrow you have three meetings.",
            "I looked at your calendar;",
        ),
        (
            "There is one thing to remember: always carry an umbrella.",
            ("There is one thing to remember:"),
        ),
        (
            "The train leaves at noon - so you should hurry to the station.",
            "The train leaves at noon -",
        ),
        (
            "The museum opens at nine—arrive early to avoid the long queues.",
            ("The museum opens at nine—"),
        ),
    ],
)
def test_other_natural_breaks_cut_the_first_sentence(text: str, first: str) -> None:
    assert pieces(text)[0] == first


def test_a_long_first_sentence_is_cut_before_a_conjunction() -> None:
    assert pieces("Paris is the capital of France and the largest city in the country.") == [
        "Paris is the capital of France",
        "and the largest city in the country.",
    ]
    assert (
        pieces("You could take the train to Lyon because it is faster than driving.")[0]
        == "You could take the train to Lyon"
    )


def test_no_cut_before_a_conjunction_between_numbers() -> None:
    assert pieces("It usually takes between 3 and 5 days to arrive by post.") == [
        "It usually takes between 3 and 5 days to arrive by post."
    ]


def test_a_first_sentence_without_any_break_is_cut_after_enough_words_never_after_an_article() -> (
    None
):
    words = [
        "I",
        "think",
        "that",
        "learning",
        "to",
        "play",
        "the",
        "piano",
        "well",
        "takes",
        "many",
        "years",
        "of",
        "careful",
        "practice",
        "with",
        "a",
        "teacher",
        "who",
        "knows",
        "the",
        "instrument",
    ]
    out = pieces(" ".join(words) + " deeply.", first_max_words=8)
    assert len(out) == 2
    assert out[0].split()[-1].lower() not in {"a", "an", "the", "to", "of", "with", "that"}
    assert len(out[0].split()) <= 8
    assert " ".join(out) == " ".join(words) + " deeply."


def test_the_first_piece_cut_is_the_same_however_the_text_is_split() -> None:
    text = "Sure, I can do that. The weather in Rome is warm, and the sea is calm today."
    by_word = [p for _, p in feed(tokens(text))]
    by_char = [p for _, p in feed(list(text))]
    whole = [p for _, p in feed([text])]
    assert by_word == by_char == whole


# ---------------------------------------------------------------- what is not a sentence end


@pytest.mark.parametrize(
    "text",
    [
        "The rate went up by 3.5 percent last year in the whole region.",
        "Dr. Smith will see you at the clinic tomorrow morning.",
        "Mr. and Mrs. Jones are arriving on the evening train.",
        "Bring something warm, e.g. a jacket or a thick sweater.",
        "That is, i.e. the old town near the river and the bridge.",
        "The book was written by J. R. R. Tolkien many years ago.",
        "It is Paris vs. London in the final game tonight.",
        "The price is 1,250 dollars for the whole week at the hotel.",
        "We meet at 10:30 in the lobby of the main building downtown.",
        "Version 2.0.1 of the app fixes the login problem for everyone.",
    ],
)
def test_numbers_and_abbreviations_do_not_end_a_sentence(text: str) -> None:
    out = pieces(text)
    assert " ".join(out) == text
    joined_cuts = [p.split()[-1] for p in out[:-1]]
    for last in joined_cuts:  # any cut is at a real break, never inside these tokens
        assert last.endswith((",", ";", ":", "-", "—")) or last.isalpha(), out


def test_a_decimal_is_never_split_across_deltas() -> None:
    assert pieces("Pi is about 3.14159, which is enough for most uses.") == [
        "Pi is about 3.14159,",
        "which is enough for most uses.",
    ]
    assert [p for _, p in feed(["It costs 3", ".", "5", " euros. Thanks!"])] == [
        "It costs 3.5 euros.",
        "Thanks!",
    ]


def test_soft_abbreviations_end_a_sentence_only_before_a_capital() -> None:
    assert pieces("Sure. Bring bread and fruit etc. Then we can have a picnic in the park.") == [
        "Sure.",
        "Bring bread and fruit etc.",
        "Then we can have a picnic in the park.",
    ]
    out = pieces("I will call you at 5 p.m. tomorrow if that works for you.")
    assert " ".join(out) == "I will call you at 5 p.m. tomorrow if that works for you."
    assert all(not p.endswith("p.m.") for p in out)


def test_a_soft_abbreviation_at_the_end_of_the_stream_waits_for_the_next_word() -> None:
    chunker = Chunker()
    assert chunker.push("See you at 5 p.m. ") == []  # "p.m." may or may not end the sentence
    assert chunker.push("Bye") == ["See you at 5 p.m."]
    assert chunker.flush() == ["Bye"]


# ---------------------------------------------------------------- later pieces


def test_later_pieces_are_whole_sentences() -> None:
    assert pieces(
        "Sure. Paris is lovely in spring. The museums are open late on Fridays. "
        "Book ahead for the Louvre."
    ) == [
        "Sure.",
        "Paris is lovely in spring.",
        "The museums are open late on Fridays.",
        "Book ahead for the Louvre.",
    ]


def test_later_commas_do_not_cut_a_sentence_of_ordinary_length() -> None:
    out = pieces("Yes. In spring, the weather is mild, the parks are green, and the days are long.")
    assert out == [
        "Yes.",
        ("In spring, the weather is mild, the parks are green, and the days are long."),
    ]


def test_short_later_sentences_join_the_next() -> None:
    assert pieces("Of course. Yes. No. I will book the table for eight people now.") == [
        "Of course.",
        "Yes. No. I will book the table for eight people now.",
    ]


def test_a_long_later_sentence_is_cut_at_a_clause_break() -> None:
    clause = (
        "the old town has narrow streets full of small shops that sell bread, cheese, wine "
        "and all kinds of local crafts from the region"
    )
    text = f"Sure. In the morning {clause}, while in the evening the squares fill with music."
    out = pieces(text)
    assert out[0] == "Sure."
    assert out[1] == f"In the morning {clause},"
    assert out[2] == "while in the evening the squares fill with music."


def test_a_piece_never_exceeds_max_chars() -> None:
    text = "Sure. " + " ".join(["word"] * 200) + "."
    out = pieces(text, clause_chars=80, max_chars=100)
    assert all(len(p) <= 100 + len("word") for p in out)
    assert " ".join(out) == text


def test_flush_returns_the_rest_once() -> None:
    chunker = Chunker()
    assert chunker.push("The answer is forty") == []
    assert chunker.push(" two") == []
    assert chunker.flush() == ["The answer is forty two"]
    assert chunker.flush() == []


def test_flush_of_nothing_speakable_is_empty() -> None:
    chunker = Chunker()
    assert chunker.push("  ") == []
    assert chunker.push(" 😊 **") == []
    assert chunker.flush() == []


def test_a_line_break_ends_a_piece_and_list_items_become_sentences() -> None:
    text = "Here is what you need:\n- flour\n- two eggs\n- a cup of milk\nMix them well."
    assert pieces(text) == [
        "Here is what you need:",
        "flour.",
        "two eggs.",
        "a cup of milk.",
        "Mix them well.",
    ]


def test_numbered_list_items_do_not_split_at_their_number() -> None:
    text = "Do this:\n1. Open the app.\n2. Tap settings.\n3. Choose your language."
    assert pieces(text) == ["Do this:", "Open the app.", "Tap settings.", "Choose your language."]


@pytest.mark.parametrize(
    "text",
    [
        "Sure. The meeting is at noon, and lunch is after that. Bring your notes!",
        (
            "Well, the answer depends on the day; on Mondays the shop closes early. "
            "Otherwise it is "
            "open until eight, e.g. on Fridays."
        ),
        "Dr. Lee said 3.5 mg twice a day - no more. Call her if the pain gets worse.",
    ],
)
def test_no_word_is_lost_or_duplicated(text: str) -> None:
    for deltas in (tokens(text), list(text), [text]):
        out = [p for _, p in feed(deltas)]
        assert " ".join(out).split() == text.split(), (deltas[:3], out)


def test_bad_settings_name_the_value() -> None:
    with pytest.raises(ValueError, match="first_min_words=5"):
        Chunker(first_min_words=5, first_max_words=3)
    with pytest.raises(ValueError, match="clause_chars=500"):
        Chunker(clause_chars=500, max_chars=100)


# ---------------------------------------------------------------- speakable


@pytest.mark.parametrize(
    "raw, spoken",
    [
        ("**Great question!** Let me *explain*.", "Great question! Let me explain."),
        (
            "This is __very__ _important_ for snake_case names.",
            "This is very important for snake_case names.",
        ),
        ("Run `make setup` first.", "Run make setup first."),
        ("## Summary", "Summary"),
        ("- first item", "first item"),
        ("* second item", "second item"),
        ("• third item", "third item"),
        ("2) fourth item", "fourth item"),
        ("> a quoted line", "a quoted line"),
        ("Have a nice day 😊!", "Have a nice day!"),
        ("Well done 👍🏽 ✅ ⭐ 🇫🇷", "Well done"),
        ("I ❤️ Paris", "I Paris"),
        ("See https://www.example.com/path/to?page=2 for details.", "See example.com for details."),
        ("Go to www.python.org.", "Go to python.org."),
        ("Read [the docs](https://docs.example.com/guide) today.", "Read the docs today."),
        (
            "It is 25°C and the fee is 5 € - about 3.5 %.",
            ("It is 25°C and the fee is 5 € - about 3.5 %."),
        ),
        ("spaces   and\n\nnew lines", "spaces and new lines"),
        ("", ""),
    ],
)
def test_speakable_removes_what_is_not_spoken(raw: str, spoken: str) -> None:
    assert speakable(raw) == spoken


def test_markdown_split_across_deltas_is_still_cleaned() -> None:
    out = [
        p
        for _, p in feed(
            ["*", "*Sure", "!*", "* Here is ", "a [link](http", "s://x.org/a", ") ", "for you."]
        )
    ]
    assert out == ["Sure!", "Here is a link for you."]


def test_a_piece_made_only_of_emoji_is_dropped() -> None:
    assert pieces("Great! 🎉🎉 Let us begin with the first question now.") == [
        "Great!",
        "Let us begin with the first question now.",
    ]


# ---------------------------------------------------------------- the async view


async def test_chunks_streams_pieces_as_deltas_arrive() -> None:
    seen: list[str] = []

    async def llm() -> object:
        for delta in tokens("Sure. The train leaves at nine from platform four."):
            seen.append(delta)
            yield delta

    out = []
    async for piece in chunks(llm()):  # type: ignore[arg-type]
        out.append((len(seen), piece))
    assert out[0] == (2, "Sure.")  # before the LLM wrote the rest
    assert out[1][1] == "The train leaves at nine from platform four."


async def test_closing_chunks_closes_the_llm_stream() -> None:
    closed = []

    async def llm() -> object:
        try:
            for delta in tokens("Sure. " + "and more words " * 50):
                yield delta
        finally:
            closed.append(True)

    pieces_iter = chunks(llm())  # type: ignore[arg-type]
    assert await anext(pieces_iter) == "Sure."
    await pieces_iter.aclose()
    assert closed == [True]
