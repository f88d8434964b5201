"""payments table; accounts.held_microcredits (backfilled from active sessions)

Revision ID: 0002
Revises: 0001

The amount held by active sessions was a SUM over sessions at every availability check; it is now
kept on the account row, under the same row lock as credit_balance, so the check is one row read.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.add_column(
        "accounts",
        sa.Column("held_microcredits", sa.BigInteger, nullable=False, server_default="0"),
    )
    op.execute(
        """
        UPDATE accounts SET held_microcredits = (
            SELECT COALESCE(SUM(s.reserved_microcredits), 0) FROM sessions s
            WHERE s.account_id = accounts.id AND s.status = 'active'
        )
        """
    )
    op.create_table(
        "payments",
        sa.Column("id", sa.String(36), primary_key=True),
        sa.Column("chain", sa.String(16), nullable=False),
        sa.Column("signature", sa.String(256), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("amount_microcredits", sa.BigInteger, nullable=False),
        sa.Column("wallet_address", sa.String(128), nullable=False),
        sa.Column("account_id", sa.String(36), sa.ForeignKey("accounts.id"), nullable=True),
        sa.Column("detail", sa.JSON, nullable=True),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("updated_at", TS, nullable=False),
        sa.UniqueConstraint("signature", name="uq_payments_signature"),
    )
    op.create_index("ix_payments_status", "payments", ["status"])


def downgrade() -> None:
    op.drop_index("ix_payments_status", table_name="payments")
    op.drop_table("payments")
    op.drop_column("accounts", "held_microcredits")
