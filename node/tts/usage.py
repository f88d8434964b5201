"""Character usage per session, shared by every socket of the session.

A TTS token's ``limit_characters`` is one budget for its session (the token's ``jti``): parallel
sockets opened with one token, and a reconnect, draw from the same ``reserved``/``used`` counts,
so no socket starts from zero. ``used`` is saved (``node.outbox.SessionStore``, like the STT
billing clocks) at every report, so a restarted node resumes the count instead of handing the
characters out again. The usage report to the gateway is per session: cumulative ``usage`` while
sockets are open, ``complete`` once the last socket closed and no reconnect came within
``reconnect_grace`` (or the token expired); a session that settled is refused from then on.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

from node.outbox import Outbox, SessionStore

log = logging.getLogger("node.tts")


class SessionEnded(Exception):
    """The session was settled with the gateway; its token buys nothing more on this node."""


@dataclass
class TtsSession:
    session_id: str
    limit: int
    expires_at: float
    reserved: int = 0     # accepted characters of every socket (queued + started)
    used: int = 0         # characters whose synthesis started (billed)
    reported: int = -1
    completed: bool = False
    sockets: int = 0
    idle_since: float | None = None  # monotonic time the last socket closed

    def remaining(self) -> int:
        return max(0, self.limit - self.reserved)

    def extend(self, limit: int, expires_at: float) -> None:
        self.limit = max(self.limit, int(limit))
        self.expires_at = max(self.expires_at, float(expires_at))


class Sessions:
    """Every session this node serves, and their usage reports through the outbox."""

    def __init__(self, outbox: Outbox, store: Path | None, reconnect_grace: float) -> None:
        self.outbox = outbox
        self.sessions: dict[str, TtsSession] = {}
        self.reconnect_grace = reconnect_grace
        self._store = SessionStore(store, table="tts_usage")

    def attach(self, session_id: str, limit: int, expires_at: float) -> TtsSession:
        """The session of a newly authenticated socket (its count so far, if it had one)."""
        session = self.sessions.get(session_id)
        if session is None:
            session = TtsSession(session_id, int(limit), float(expires_at))
            saved = self._store.load(session_id)
            if saved is not None:
                session.used = session.reserved = int(saved[0])
                session.reported, session.completed = int(saved[0]), saved[1]
            self.sessions[session_id] = session
        else:
            session.extend(limit, expires_at)
        if session.completed:
            raise SessionEnded(f"session {session_id} has ended (its usage was settled); "
                               "open a new session through the gateway")
        session.sockets += 1
        session.idle_since = None
        return session

    def detach(self, session: TtsSession, released: int) -> None:
        """A socket closed; ``released`` = its accepted characters whose synthesis never started."""
        session.reserved -= released
        session.sockets -= 1
        if session.sockets == 0:
            session.idle_since = time.monotonic()
        self.report(session)

    def report(self, session: TtsSession, complete: bool = False) -> None:
        if session.completed or (not complete and session.used == session.reported):
            return
        try:
            self.outbox.report_usage(session.session_id, complete, used_characters=session.used)
        except Exception:  # the outbox is durable; a failure here is a local disk problem
            log.exception("could not record usage for session %s", session.session_id)
            return
        session.reported, session.completed = session.used, complete
        self._store.save(session.session_id, session.used, complete, session.expires_at)

    def sweep(self, report: bool = True, now: float | None = None) -> None:
        """Settle sessions left idle past the grace or expired; with ``report``, also report
        what the live ones used since. A settled session is remembered until its token expired,
        so its token stays refused even on a node without a state dir."""
        now = time.monotonic() if now is None else now
        wall = time.time()
        for sid, session in list(self.sessions.items()):
            if session.completed:
                if session.expires_at < wall - 60:
                    del self.sessions[sid]
                continue
            idle = session.sockets == 0 and session.idle_since is not None
            if idle and (now - session.idle_since >= self.reconnect_grace
                         or session.expires_at < wall):
                self.report(session, complete=True)
            elif report:
                self.report(session)

    def close(self) -> None:
        """At shutdown: settle every session (no socket survives the node)."""
        for session in list(self.sessions.values()):
            self.report(session, complete=True)
        self.sessions.clear()
        self._store.close()
