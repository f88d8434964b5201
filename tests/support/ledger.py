"""Moving a session back in time, for tests of billing that is capped by the time that passed."""

from __future__ import annotations

from datetime import timedelta

import sqlalchemy as sa

from gateway.ledger import Ledger
from gateway.ledger.models import sessions


async def backdate(ledger: Ledger, session_id: str, seconds: float) -> None:
    """Make a session look ``seconds`` older, as if it had been created that long ago: the gateway
    bills no more time than a session has existed, and a test cannot wait 90 s for each report."""
    record = await ledger.get_session(session_id)
    assert record is not None, f"no session {session_id}"
    async with ledger.db.engine.begin() as conn:
        await conn.execute(
            sa.update(sessions)
            .where(sessions.c.id == session_id)
            .values(started_at=record.started_at - timedelta(seconds=seconds))
        )
