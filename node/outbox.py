"""A durable outbox for what nodes tell the gateway: usage events and SFU webhooks.

Billing must survive a gateway blip and a node crash: every event is written to a small SQLite
file (fsync'd, WAL) before it is sent, sent in order with a JWT signed by the node key over the
exact body bytes (``registry.tokens.sign_body``), retried with exponential backoff, and deleted
only once the gateway answered 2xx. A 4xx other than 408/429 means the gateway will never accept
it (unknown session, bad shape): it is moved to a dead-letter table and logged, not retried.

Usage reports are cumulative, so a newer report for the same session replaces an unsent older one
(``key``); a ``complete`` event is never replaced.

Each event names the issuer of its session's token: it goes to that gateway (``resolve``, the
node's ``GatewayBook``: the issuer's URL on the registry, or what a configured gateway says of
itself), else to ``gateway_url``. The URL is looked up when the event is sent, so events queued
for a gateway that moved follow it; events for one gateway keep their order, and a gateway that
is down holds back only its own.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
from solders.keypair import Keypair

from common.tasks import stop_tasks
from registry.tokens import sign_body

log = logging.getLogger("node.outbox")

SCHEMA = """
CREATE TABLE IF NOT EXISTS outbox (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    path TEXT NOT NULL,
    body BLOB NOT NULL,
    key TEXT,
    issuer TEXT,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_at REAL NOT NULL,
    created_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS outbox_key ON outbox(key);
CREATE INDEX IF NOT EXISTS outbox_issuer ON outbox(issuer, id);
CREATE TABLE IF NOT EXISTS dead (
    id INTEGER PRIMARY KEY, path TEXT, body BLOB, status INTEGER, reason TEXT, created_at REAL
);
"""


class Outbox:
    def __init__(
        self,
        path: Path,
        gateway_url: str | None,
        signer: Keypair,
        max_backoff: float = 60.0,
        timeout: float = 10.0,
    ) -> None:
        self.path = path
        self.gateway_url = gateway_url.rstrip("/") if gateway_url else None
        self.signer = signer
        self.max_backoff = max_backoff
        self.timeout = timeout
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        columns = {r[1] for r in self._db.execute("PRAGMA table_info(outbox)")}
        if columns and "issuer" not in columns:  # a file from before events named their issuer
            self._db.execute("ALTER TABLE outbox ADD COLUMN issuer TEXT")
        self._db.executescript(SCHEMA)
        self.resolve: Callable[[str | None], str | None] = lambda issuer: None
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._http: aiohttp.ClientSession | None = None
        self.sent = 0
        self.failures = 0

    # ------------------------------------------------------------ producer side

    def enqueue(
        self,
        path: str,
        payload: dict[str, Any],
        key: str | None = None,
        issuer: str | None = None,
    ) -> None:
        """Persist one event (durable when this returns); ``key`` replaces an unsent older one;
        ``issuer``: the key that signed the session's token (where the event goes)."""
        body = json.dumps(payload, separators=(",", ":"), sort_keys=True).encode()
        now = time.time()
        with self._db:
            self._db.execute("BEGIN IMMEDIATE")
            if key is not None:
                self._db.execute("DELETE FROM outbox WHERE key = ?", (key,))
            self._db.execute(
                "INSERT INTO outbox (path, body, key, issuer, next_at, created_at) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                (path, body, key, issuer, now, now),
            )
        self._wake.set()

    def report_usage(
        self,
        session_id: str,
        complete: bool,
        *,
        duration_seconds: float | None = None,
        used_characters: int | None = None,
        issuer: str | None = None,
    ) -> None:
        """The gateway's ``/internal/events`` body: cumulative usage, ``complete`` settles."""
        usage: dict[str, Any] = {}
        if duration_seconds is not None:
            usage["duration_seconds"] = round(duration_seconds, 3)
        if used_characters is not None:
            usage["used_characters"] = int(used_characters)
        event = "complete" if complete else "usage"
        self.enqueue(
            "/internal/events",
            {"session_id": session_id, "event": event, "usage": usage},
            key=None if complete else f"usage:{session_id}",
            issuer=issuer,
        )

    def pending(self) -> int:
        return self._db.execute("SELECT COUNT(*) FROM outbox").fetchone()[0]

    def queued(self) -> list[dict[str, Any]]:
        """The unsent events' bodies, oldest first (a node without a gateway keeps them all)."""
        rows = self._db.execute("SELECT body FROM outbox ORDER BY id").fetchall()
        return [json.loads(row[0]) for row in rows]

    def dead(self) -> list[tuple[str, int, str]]:
        return [tuple(r) for r in self._db.execute("SELECT path, status, reason FROM dead")]

    # ------------------------------------------------------------ sender side

    async def start(self) -> None:
        if self.gateway_url is None:
            log.warning(
                "no gateway_url configured: usage events of issuers without a URL on the "
                "registry are kept in %s, not sent",
                self.path,
            )
        self._http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.timeout))
        self._task = asyncio.create_task(self._run())

    async def stop(self, flush_timeout: float = 5.0) -> None:
        """Try to deliver what is queued for up to ``flush_timeout``; the rest stays on disk."""
        if self._task is not None:
            deadline = time.monotonic() + flush_timeout
            while self.pending() and time.monotonic() < deadline and self._due_now():
                self._wake.set()
                await asyncio.sleep(0.05)
            await stop_tasks(self._task)
        if self._http is not None:
            await self._http.close()
        self._db.close()

    def _due_now(self) -> bool:
        row = self._next()
        return row is not None and row[5] <= time.time() + 0.5

    def _next(self) -> tuple[Any, ...] | None:
        """The next event to send: the oldest of each issuer's that has somewhere to go, the one
        due first (so a gateway that is down holds back only its own events)."""
        rows = self._db.execute(
            "SELECT id, issuer, path, body, attempts, next_at FROM outbox "
            "WHERE id IN (SELECT MIN(id) FROM outbox GROUP BY issuer) ORDER BY next_at, id"
        ).fetchall()
        return next((r for r in rows if self._url(r[1]) is not None), None)

    def _url(self, issuer: str | None) -> str | None:
        url = self.resolve(issuer) if issuer else None
        return (url or self.gateway_url or "").rstrip("/") or None

    async def _run(self) -> None:
        while True:
            row = self._next()
            if row is None:
                self._wake.clear()
                try:  # new events wake it; a gateway found on the registry is looked for again
                    await asyncio.wait_for(self._wake.wait(), 5.0)
                except TimeoutError:
                    pass
                continue
            event_id, issuer, path, body, attempts, next_at = row
            delay = next_at - time.time()
            if delay > 0:
                self._wake.clear()
                try:
                    await asyncio.wait_for(self._wake.wait(), delay)
                except TimeoutError:
                    pass
                continue
            raw = body if isinstance(body, bytes) else str(body).encode()  # TEXT in a hand-made row
            try:
                await self._deliver(event_id, self._url(issuer), path, raw, attempts)
            except Exception:  # a bug must not stop the sender for good: this event waits
                log.exception("sending %s failed; retrying it later", path)
                self._postpone(event_id, attempts)

    async def _deliver(
        self, event_id: int, url: str | None, path: str, body: bytes, attempts: int
    ) -> None:
        assert self._http is not None and url is not None
        headers = {
            "Authorization": f"Bearer {sign_body(self.signer, body)}",
            "Content-Type": "application/json",
        }
        try:
            async with self._http.post(url + path, data=body, headers=headers) as resp:
                status, text = resp.status, (await resp.text())[:300]
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            status, text = 0, str(exc) or type(exc).__name__
        if 200 <= status < 300:
            self._db.execute("DELETE FROM outbox WHERE id = ?", (event_id,))
            self.sent += 1
            return
        if 400 <= status < 500 and status not in (408, 429):
            log.error(
                "gateway %s refused %s (HTTP %d: %s); moved to dead letters",
                url,
                path,
                status,
                text,
            )
            with self._db:
                self._db.execute("BEGIN IMMEDIATE")
                self._db.execute(
                    "INSERT INTO dead SELECT id, path, body, ?, ?, created_at "
                    "FROM outbox WHERE id = ?",
                    (status, text, event_id),
                )
                self._db.execute("DELETE FROM outbox WHERE id = ?", (event_id,))
            return
        self.failures += 1
        log.warning(
            "could not deliver %s to %s (%s); retry %d in %.1fs",
            path,
            url,
            f"HTTP {status}: {text}" if status else text,
            attempts + 1,
            self._postpone(event_id, attempts),
        )

    def _postpone(self, event_id: int, attempts: int) -> float:
        """Try the event again later (exponential backoff); the delay."""
        backoff = min(self.max_backoff, 0.5 * 2**attempts)
        self._db.execute(
            "UPDATE outbox SET attempts = attempts + 1, next_at = ? WHERE id = ?",
            (time.time() + backoff, event_id),
        )
        return backoff


class SessionStore:
    """What each session used on this node and whether it settled, in a SQLite file that survives
    a restart, so a client reconnecting to a restarted node cannot get its session's units again.

    One row per session (``used`` in the role's unit: seconds for STT, characters for TTS;
    ``completed``: settled with the gateway); rows are dropped a day after the session expired.
    Without a path it keeps nothing (tests, tools). Shared by the roles that bill by session.
    """

    def __init__(self, path: Path | None, table: str = "sessions") -> None:
        if not table.isidentifier():
            raise ValueError(f"table name {table!r} is not an identifier")
        self._table = table
        self._db: sqlite3.Connection | None = None
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute(
                f"CREATE TABLE IF NOT EXISTS {table} (session_id TEXT PRIMARY KEY, "
                "used REAL NOT NULL, completed INTEGER NOT NULL, expires_at REAL)"
            )

    def save(self, session_id: str, used: float, completed: bool, expires_at: float) -> None:
        if self._db is not None:
            self._db.execute(
                f"INSERT OR REPLACE INTO {self._table} VALUES (?, ?, ?, ?)",
                (session_id, used, int(completed), expires_at),
            )
            self._db.execute(
                f"DELETE FROM {self._table} WHERE expires_at < ?", (time.time() - 86_400,)
            )

    def load(self, session_id: str) -> tuple[float, bool] | None:
        """(used, completed) as last saved, or None for a session this node never saved."""
        if self._db is None:
            return None
        row = self._db.execute(
            f"SELECT used, completed FROM {self._table} WHERE session_id = ?", (session_id,)
        ).fetchone()
        return None if row is None else (float(row[0]), bool(row[1]))

    def completed_since(self, since: float) -> dict[str, float]:
        """Settled sessions whose ``expires_at`` is after ``since``: session id -> expires_at."""
        if self._db is None:
            return {}
        rows = self._db.execute(
            f"SELECT session_id, expires_at FROM {self._table} "
            "WHERE completed = 1 AND expires_at >= ?",
            (since,),
        )
        return {str(sid): float(exp) for sid, exp in rows}

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None
