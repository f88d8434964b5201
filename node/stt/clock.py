"""Clock-pause billing: a session's paid seconds run only while a socket is connected.

One ``SessionClock`` per token session (the token's ``jti``), kept across connections so that a
reconnect with the same ``session_key`` before expiry resumes with the time left. Remaining time is
the paid limit less the connected time, and never past the token's expiry.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from node.outbox import SessionStore


@dataclass
class SessionClock:
    session_id: str
    limit: float  # paid seconds
    expires_at: float  # unix time the token (and so the session) expires
    used_before: float = 0.0  # connected seconds in finished connections
    connected_since: float | None = None  # monotonic
    completed: bool = False
    last_reported: float = -1.0
    warned: set[int] = field(default_factory=set)

    def used(self, now: float | None = None) -> float:
        now = time.monotonic() if now is None else now
        live = (now - self.connected_since) if self.connected_since is not None else 0.0
        return self.used_before + live

    def remaining(self, now: float | None = None, wall: float | None = None) -> float:
        wall = time.time() if wall is None else wall
        return max(min(self.limit - self.used(now), self.expires_at - wall), 0.0)

    def connect(self, now: float | None = None) -> None:
        if self.connected_since is None:
            self.connected_since = time.monotonic() if now is None else now

    def disconnect(self, now: float | None = None) -> None:
        if self.connected_since is not None:
            now = time.monotonic() if now is None else now
            self.used_before += now - self.connected_since
            self.connected_since = None

    def extend(self, limit: float, expires_at: float) -> None:
        self.limit = max(self.limit, limit)
        self.expires_at = max(self.expires_at, expires_at)
        self.warned.clear()

    def due_warning(self, thresholds: list[int], now: float | None = None) -> int | None:
        """The largest not-yet-sent threshold the remaining time has fallen to, if any."""
        left = self.remaining(now)
        due = [t for t in thresholds if left <= t and t not in self.warned]
        if not due:
            return None
        for t in thresholds:
            if left <= t:
                self.warned.add(t)
        return min(due)


class Clocks:
    """All sessions this node has seen; finished ones are dropped once settled.

    With a ``store`` (a SQLite file under the node's state dir, ``node.outbox.SessionStore``) the
    seconds used are saved at every usage report, so a node restart does not hand a reconnecting
    client its time again: the clock resumes from the last report (at most one report interval is
    lost, as with billing).
    """

    def __init__(self, store: Path | None = None) -> None:
        self.sessions: dict[str, SessionClock] = {}
        self._store = SessionStore(store, table="clocks")

    def save(self, clock: SessionClock, used: float) -> None:
        self._store.save(clock.session_id, used, clock.completed, clock.expires_at)

    def _restore(self, clock: SessionClock) -> None:
        saved = self._store.load(clock.session_id)
        if saved is not None:
            clock.used_before, clock.completed = saved
            clock.last_reported = saved[0]

    def close(self) -> None:
        self._store.close()

    def get_or_create(self, session_id: str, limit: float, expires_at: float) -> SessionClock:
        clock = self.sessions.get(session_id)
        if clock is None:
            clock = SessionClock(session_id, float(limit), float(expires_at))
            self._restore(clock)
            self.sessions[session_id] = clock
        else:
            clock.extend(float(limit), float(expires_at))
        return clock
