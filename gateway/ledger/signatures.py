"""The replay guard on the ledger's database: every gateway process on one ledger (workers of one
``gateway serve --workers N``, or several gateways on one PostgreSQL) answers a signed request
once between them.

Same rules as ``gateway.auth.MemoryReplayGuard`` (the in-process guard one process on SQLite uses),
one row per signature id: a claim inserts it, or, if another process got there first, reads it
under a row lock and decides as the memory guard would. The insert is what nearly every request
does, so it is one prepared statement, on PostgreSQL a transaction by itself with no greenlet hop
(``Database.statement``): the guard costs one round trip per signed request. Rows are deleted once
their timestamp is out of the signing window (``prune``, run by the sweeper): the skew check
refuses the request from then on.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import sqlalchemy as sa

from gateway.auth import Claim

from .db import Database
from .models import used_signatures as t
from .prepared import Prepared


class LedgerReplayGuard:
    """A ``gateway.auth.ReplayGuard`` whose memory is the ``used_signatures`` table."""

    def __init__(self, db: Database, clock: Callable[[], float] = time.time) -> None:
        self.db, self._clock = db, clock
        self._fresh = Prepared(
            db.insert(t)
            .values(
                id=sa.bindparam("id"),
                expires_at=sa.bindparam("expires_at"),
                offered_body=None,
                repeat_until=sa.bindparam("repeat_until"),
            )
            .on_conflict_do_nothing(index_elements=["id"])
            .returning(t.c.id)
        )

    async def is_used(self, signature_id: str) -> bool:
        row = await self.db.read(_row, signature_id)
        return row is not None and row.offered_body is None and row.expires_at >= self._clock()

    async def claim(
        self, signature_id: str, expires_at: float, body_hash: str, repeat_for: float = 0.0
    ) -> Claim:
        fresh = {
            "id": signature_id,
            "expires_at": expires_at,
            "repeat_until": self._clock() + repeat_for,
        }
        if self.db.is_postgres:
            inserted = await self.db.statement(self._fresh, fresh, reads_only=False)
        else:
            inserted = await self.db.write(self._fresh.rows, fresh)
        if inserted:
            return Claim.GRANTED
        return await self.db.write(self._claim, signature_id, expires_at, body_hash, repeat_for)

    def _claim(
        self,
        conn: sa.Connection,
        signature_id: str,
        expires_at: float,
        body_hash: str,
        repeat_for: float,
    ) -> Claim:
        now = self._clock()
        new = {"expires_at": expires_at, "offered_body": None, "repeat_until": now + repeat_for}
        inserted = conn.execute(
            self.db.insert(t)
            .values(id=signature_id, **new)
            .on_conflict_do_nothing(index_elements=["id"])
        )
        if inserted.rowcount == 1:
            return Claim.GRANTED
        row = conn.execute(self.db.for_update(sa.select(t).where(t.c.id == signature_id))).one()
        if row.expires_at < now:  # left over from an earlier window: as good as absent
            conn.execute(sa.update(t).where(t.c.id == signature_id).values(**new))
            return Claim.GRANTED
        if row.offered_body is not None:
            if row.offered_body != body_hash:
                return Claim.OTHER_BODY
            conn.execute(sa.update(t).where(t.c.id == signature_id).values(offered_body=None))
            return Claim.GRANTED
        return Claim.GRANTED if now < row.repeat_until else Claim.REPLAYED

    async def release(self, signature_id: str, body_hash: str) -> None:
        await self.db.write(_release, signature_id, body_hash)

    async def prune(self) -> int:
        """Delete the ids whose window has passed; how many."""
        return await self.db.write(_prune, self._clock())


def _row(conn: sa.Connection, signature_id: str) -> sa.Row | None:
    return conn.execute(sa.select(t).where(t.c.id == signature_id)).first()


def _release(conn: sa.Connection, signature_id: str, body_hash: str) -> None:
    conn.execute(sa.update(t).where(t.c.id == signature_id).values(offered_body=body_hash))


def _prune(conn: sa.Connection, now: float) -> int:
    return conn.execute(sa.delete(t).where(t.c.expires_at < now)).rowcount


__all__ = ["LedgerReplayGuard"]
