"""What a voice agent buys and spends: ``Budget``.

An agent pays for its conversation with one agent-session bundle: room time, STT time and TTS
characters. The budget says how big a bundle it buys, when and by how much it extends it before
it runs out, and whether it tops up its credits from its wallet first. ``VoiceAgent`` reads it;
the numbers are the product's defaults for a five-minute call.
"""

from __future__ import annotations

from dataclasses import dataclass, fields


@dataclass(frozen=True)
class Budget:
    """``duration_minutes`` and ``tts_characters``: the bundle bought first. ``extend_minutes``
    and ``extend_characters``: what each extension adds, made ``extend_before`` seconds before the
    bundle expires, or when fewer than ``min_characters`` TTS characters are left (never, with
    ``auto_extend=False``). ``top_up_usd``: before buying or extending, buy credits for that many
    dollars when the balance is under ``min_credits`` microcredits (None: never)."""

    duration_minutes: float = 5
    tts_characters: int = 4000
    extend_minutes: float = 5
    extend_characters: int = 4000
    extend_before: float = 60
    min_characters: int = 600
    auto_extend: bool = True
    top_up_usd: float | None = None
    min_credits: int = 100_000

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool) or value is None:
                continue
            if value < 0 or (value == 0 and f.name in _POSITIVE):
                least = "above 0" if f.name in _POSITIVE else "0 or more"
                raise ValueError(f"Budget {f.name}={value!r}: give a number {least}")


_POSITIVE = {
    "duration_minutes",
    "tts_characters",
    "extend_minutes",
    "extend_characters",
    "top_up_usd",
}
