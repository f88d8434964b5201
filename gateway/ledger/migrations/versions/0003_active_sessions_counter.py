"""accounts.active_sessions (backfilled): the concurrency limit reads a counter, not a COUNT

Revision ID: 0003
Revises: 0002

Opening a session counted the account's active sessions (a bundle once) with a query over
``sessions``. On PostgreSQL that query is a prepared statement, planned generically after five
runs; planned while the table was small, the generic plan could take the (status, expiry) index and
filter every active session of every account on each open (seen: 2.9 ms a count at 12,000 active
sessions, and growing). The count now lives on the account row, under the lock the open already
holds: opening adds the new sessions (a bundle once), settling the last active session of a key
subtracts it.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column(
        "accounts",
        sa.Column("active_sessions", sa.Integer, nullable=False, server_default="0"),
    )
    op.execute(
        """
        UPDATE accounts SET active_sessions = (
            SELECT COUNT(DISTINCT COALESCE(s.bundle_id, s.id)) FROM sessions s
            WHERE s.account_id = accounts.id AND s.status = 'active'
        )
        """
    )


def downgrade() -> None:
    op.drop_column("accounts", "active_sessions")
