"""node_events: the ids of node events the ledger has applied, so a replay applies nothing

Revision ID: 0004
Revises: 0003

An SFU retries a webhook it got no answer to, and anyone who captured a signed body can send it
again while its signature is valid. Each applied event's id is stored under the node that sent
it (the key is the pair: one node cannot use up another's ids), in the same transaction as the
usage it moved, so a repeated event changes nothing.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "node_events",
        sa.Column("node_pubkey", sa.String(64), primary_key=True),
        sa.Column("event_id", sa.String(128), primary_key=True),
        sa.Column("session_id", sa.String(36), sa.ForeignKey("sessions.id"), nullable=False),
        sa.Column("created_at", TS, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("node_events")
