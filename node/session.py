"""Session plumbing for the roles that bill a token's session: STT (seconds), TTS (characters).

A session is the token's ``jti``: every socket opened with one session key, and a reconnect, draw
on one limit. The roles share what each used to write on its own: the check of a client's session
key (:func:`verify_session_key`), ``extend`` with a newer key of the same session, expiry warnings
(:meth:`Session.due_warning`), the cumulative usage reports to the gateway through the agent's
durable outbox, and settling: once a session's last socket closed and no reconnect with the same
key came within ``reconnect_grace`` seconds (at once when its token expired or its units ran out),
it is reported ``complete`` (once) and refused from then on. What each session used is saved
(``node.outbox.SessionStore``) at every report, so a restarted node resumes the count instead of
handing the units out again.

A role supplies the meter, a :class:`Session` subclass saying what ``used`` means: TTS counts
characters as their synthesis starts, STT runs a clock while a socket is connected.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Generic, TypeVar

from node.outbox import Outbox, SessionStore
from node.roles import RoleContext
from registry.tokens import Claims, TokenError

log = logging.getLogger("node.session")


class SessionRefused(Exception):
    """A session key (or its session) this node does not serve; ``code`` is the error code the
    role's protocol answers with."""

    def __init__(self, code: str, message: str) -> None:
        self.code = code
        super().__init__(message)


class SessionEnded(SessionRefused):
    """The session was settled with the gateway; its token buys nothing more on this node."""

    def __init__(self, session_id: str) -> None:
        super().__init__(
            "session_ended",
            f"session {session_id} has ended (its usage was "
            "settled); open a new session through the gateway",
        )


async def verify_session_key(context: RoleContext, token: Any) -> Claims:
    """The claims of a client's session key for this node and role, with a limit to spend.

    A key routed to another node is refused with ``wrong_node`` (the client should ask the
    gateway again rather than retry here); any other bad key with ``invalid_token``."""
    if not isinstance(token, str) or not token:
        raise SessionRefused("invalid_token", "session_key is required")
    try:
        claims = await context.verify(token)
    except TokenError as exc:
        code = "wrong_node" if exc.code == "wrong_node" else "invalid_token"
        raise SessionRefused(code, f"{exc.code}: {exc}") from None
    if claims.service != context.role or not claims.limit:
        raise SessionRefused("invalid_token", f"the session key carries no {context.role} grant")
    return claims


@dataclass
class Session:
    """One token session on this node: its limit and expiry (raised by ``extend``), its open
    sockets and what was reported. Subclasses define :meth:`used` (the billed units) and name
    what they meter: ``unit``, the usage key of the gateway's event; ``table`` and ``store``, where
    the node keeps the counts across restarts."""

    unit: ClassVar[str]
    table: ClassVar[str]
    store: ClassVar[str]

    session_id: str
    limit: float
    expires_at: float  # unix time the token (and so the session) expires
    units: float = 0.0  # units metered (restored from the store when a node restarted)
    reported: float = -1.0
    completed: bool = False
    sockets: int = 0
    idle_since: float | None = None  # monotonic time the last socket closed
    warned: set[int] = field(default_factory=set)
    issuer: str | None = None  # the gateway key that signed its token: its usage goes there

    def used(self) -> float:
        """The units to bill so far."""
        return self.units

    def restore(self, units: float, completed: bool) -> None:
        """The counts a previous run of this node saved."""
        self.units = self.reported = units
        self.completed = completed

    def remaining(self) -> float:
        return max(0.0, self.limit - self.used())

    def exhausted(self, wall: float | None = None) -> bool:
        """Nothing more to serve: the token expired (or the units ran out, where the meter says)."""
        return self.expires_at <= (time.time() if wall is None else wall)

    def extend(self, limit: float, expires_at: float) -> None:
        self.limit = max(self.limit, limit)
        self.expires_at = max(self.expires_at, expires_at)
        self.warned.clear()

    def due_warning(self, thresholds: list[int], left: float | None = None) -> int | None:
        """The smallest not-yet-sent threshold the remaining units (``left``, by default now)
        have fallen to, if any (each threshold is warned once; ``extend`` re-arms them)."""
        left = self.remaining() if left is None else left
        due = [t for t in thresholds if left <= t and t not in self.warned]
        self.warned.update(due)
        return min(due) if due else None

    def opened(self) -> None:
        """The first socket of the session is open (again)."""

    def closed(self) -> None:
        """The last socket of the session closed."""


S = TypeVar("S", bound=Session)


class Sessions(Generic[S]):
    """Every session this node serves, their usage reports and their settling.

    ``meter`` builds a new session and names its unit; ``store`` the SQLite file of the counts,
    None to keep nothing."""

    def __init__(
        self,
        outbox: Outbox,
        store: Path | None,
        *,
        meter: type[S],
        reconnect_grace: float,
        report_interval: float,
    ) -> None:
        self.outbox = outbox
        self.sessions: dict[str, S] = {}
        self.meter = meter
        self.unit = meter.unit
        self.reconnect_grace = reconnect_grace
        self.report_interval = report_interval
        self._store = SessionStore(store, table=meter.table)
        self._task: asyncio.Task[None] | None = None

    @classmethod
    def of(
        cls, context: RoleContext, meter: type[S], reconnect_grace: float, report_interval: float
    ) -> Sessions[S]:
        """A role's sessions, kept in its state directory and reported through its outbox."""
        return cls(
            context.outbox,
            context.state_file(meter.store),
            meter=meter,
            reconnect_grace=reconnect_grace,
            report_interval=report_interval,
        )

    def attach(self, claims: Claims) -> S:
        """The session of a newly authenticated socket (its counts so far, if it had one); a
        settled session is refused with :class:`SessionEnded`."""
        session = self.sessions.get(claims.session_id)
        if session is None:
            session = self.meter(claims.session_id, claims.limit or 0, float(claims.expires_at))
            session.issuer = claims.issuer
            saved = self._store.load(claims.session_id)
            if saved is not None:
                session.restore(*saved)
            self.sessions[claims.session_id] = session
        else:
            session.extend(claims.limit or 0, float(claims.expires_at))
        if session.completed:
            raise SessionEnded(claims.session_id)
        session.sockets += 1
        session.idle_since = None
        if session.sockets == 1:
            session.opened()
        return session

    def extend(self, session: Session, claims: Claims) -> None:
        """A newer key of the same session raises its limit and expiry."""
        if claims.session_id != session.session_id:
            raise SessionRefused("invalid_token", "the new session_key is for another session")
        session.extend(claims.limit or 0, float(claims.expires_at))

    def detach(self, session: Session) -> None:
        """A socket closed: report what the session used; a session with nothing left settles at
        once, one with no socket left waits ``reconnect_grace`` for a reconnect (``sweep``)."""
        session.sockets -= 1
        if session.sockets == 0:
            session.idle_since = time.monotonic()
            session.closed()
        self.report(session, complete=session.sockets == 0 and session.exhausted())

    def report(self, session: Session, complete: bool = False) -> None:
        """Tell the gateway the session's cumulative usage (when it changed), or settle it."""
        used = round(min(session.used(), session.limit), 3)
        if session.completed or (not complete and used == session.reported):
            return
        try:
            self.outbox.report_usage(
                session.session_id, complete, issuer=session.issuer, **{self.unit: used}
            )
        except Exception:  # the outbox is durable; a failure here is a local disk problem
            log.exception("could not record usage for session %s", session.session_id)
            return
        session.reported, session.completed = used, complete
        self._store.save(session.session_id, used, complete, session.expires_at)

    def sweep(self, report: bool = True, now: float | None = None) -> None:
        """Settle sessions left idle past the grace or exhausted; with ``report``, also report
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
            if idle and (
                now - session.idle_since >= self.reconnect_grace or session.exhausted(wall)
            ):
                self.report(session, complete=True)
            elif report:
                self.report(session)

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        """Usage of every session every ``report_interval``; idle sessions settle within 0.5 s
        of their reconnect grace."""
        tick = min(0.5, self.report_interval)
        last = time.monotonic()
        while True:
            await asyncio.sleep(tick)
            due = time.monotonic() - last >= self.report_interval
            if due:
                last = time.monotonic()
            self.sweep(report=due)

    def close(self) -> None:
        """At shutdown: settle every session (no socket survives the node)."""
        if self._task is not None:
            self._task.cancel()
        for session in list(self.sessions.values()):
            self.report(session, complete=True)
        self.sessions.clear()
        self._store.close()
