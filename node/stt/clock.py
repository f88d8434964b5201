"""The STT meter, clock-pause billing: a session's paid seconds run only while a socket is open.

One ``SessionClock`` per token session (the token's ``jti``), kept across connections so that a
reconnect with the same ``session_key`` within the reconnect grace resumes with the time left.
Remaining time is the paid limit less the connected time, and never past the token's expiry.
Reports, saving, warnings and settling are the node's session plumbing (:mod:`node.session`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from node.session import Session


@dataclass
class SessionClock(Session):
    unit = "duration_seconds"
    table = "clocks"
    store = "stt-clocks"

    connected_since: float | None = None  # monotonic; ``units`` holds finished connections

    def used(self, now: float | None = None) -> float:
        now = time.monotonic() if now is None else now
        live = (now - self.connected_since) if self.connected_since is not None else 0.0
        return self.units + live

    def remaining(self, now: float | None = None, wall: float | None = None) -> float:
        wall = time.time() if wall is None else wall
        return max(min(self.limit - self.used(now), self.expires_at - wall), 0.0)

    def due_warning(self, thresholds: list[int], now: float | None = None) -> int | None:
        return super().due_warning(thresholds, self.remaining(now))

    def exhausted(self, wall: float | None = None) -> bool:
        return self.remaining(wall=wall) <= 0

    def opened(self) -> None:
        self.connect()

    def closed(self) -> None:
        self.disconnect()

    def connect(self, now: float | None = None) -> None:
        if self.connected_since is None:
            self.connected_since = time.monotonic() if now is None else now

    def disconnect(self, now: float | None = None) -> None:
        if self.connected_since is not None:
            now = time.monotonic() if now is None else now
            self.units += now - self.connected_since
            self.connected_since = None
