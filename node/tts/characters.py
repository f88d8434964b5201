"""The TTS meter: characters per session, shared by every socket of the session.

A TTS token's ``limit_characters`` is one budget for its session (the token's ``jti``): parallel
sockets opened with one token, and a reconnect, draw from the same ``reserved``/``used`` counts,
so no socket starts from zero. A text is *reserved* when accepted and *used* (billed) when its
synthesis starts. Reports, saving and settling are the node's session plumbing
(:mod:`node.session`).
"""

from __future__ import annotations

from dataclasses import dataclass

from node.session import Session


@dataclass
class CharacterCount(Session):
    unit = "used_characters"
    table = "tts_usage"
    store = "tts-usage"

    reserved: float = 0  # accepted characters of every socket (queued + started)

    def remaining(self) -> float:
        return max(0, self.limit - self.reserved)

    def restore(self, units: float, completed: bool) -> None:
        super().restore(int(units), completed)
        self.reserved = int(units)

    def reserve(self, chars: int) -> None:
        self.reserved += chars

    def release(self, chars: int) -> None:
        """Accepted characters whose synthesis never started (cleared, or their socket closed)."""
        self.reserved -= chars

    def bill(self, chars: int) -> None:
        """Characters whose synthesis started."""
        self.units += chars
