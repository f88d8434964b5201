"""Voices and speed: what a client may ask the engine for, checked before any synthesis.

A :class:`VoiceSpec` is one Kokoro voice or a blend (``"af_heart,af_bella"``, averaged) in one of
Kokoro's languages; a bad name, blend or speed is an :class:`EngineError` whose message is for the
client.
"""

from __future__ import annotations

from dataclasses import dataclass

from node.models.kokoro import ALL_VOICES, LANGUAGES

SPEED_RANGE = (0.5, 2.0)
MAX_BLEND = 8


class EngineError(ValueError):
    """A request the engine cannot serve (unknown voice, language...).

    The message is for clients.
    """


@dataclass(frozen=True)
class VoiceSpec:
    """One voice or a blend (``"af_heart,af_bella"`` averages the voice tensors) in a language."""

    names: tuple[str, ...]
    lang_code: str

    @staticmethod
    def parse(voice: str, lang_code: str | None = None) -> VoiceSpec:
        if not isinstance(voice, str) or not voice.strip():
            raise EngineError(
                "voice must be a voice id such as 'af_heart' or a blend 'af_heart,af_bella'"
            )
        names = tuple(n.strip() for n in voice.split(","))
        if len(names) > MAX_BLEND:
            raise EngineError(f"a blend takes at most {MAX_BLEND} voices, got {len(names)}")
        for n in names:
            if n not in ALL_VOICES:
                raise EngineError(
                    f"unknown voice {n!r}: expected one of the 54 Kokoro voices, "
                    "e.g. af_heart, bf_emma, ef_dora, ff_siwis, jf_alpha, zf_xiaoxiao"
                )
        lang = names[0][0] if lang_code is None else lang_code
        if lang not in LANGUAGES:
            raise EngineError(
                f"unknown lang_code {lang!r}: expected one of "
                f"{', '.join(LANGUAGES)} (a=en-us b=en-gb e=es f=fr h=hi i=it j=ja "
                "p=pt-br z=zh)"
            )
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
