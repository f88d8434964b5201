"""accounts, sessions, transactions

Revision ID: 0001
Revises:
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "accounts",
        sa.Column("id", sa.String(36), primary_key=True),
        sa.Column("wallet_chain", sa.String(16), nullable=False),
        sa.Column("wallet_address", sa.String(128), nullable=False),
        sa.Column("credit_balance", sa.BigInteger, nullable=False, server_default="0"),
        sa.Column("max_concurrent_sessions", sa.Integer, nullable=False, server_default="10"),
        sa.Column("max_api_rate", sa.Integer, nullable=False, server_default="50"),
        sa.Column("created_at", TS, nullable=False),
        sa.UniqueConstraint("wallet_chain", "wallet_address", name="uq_accounts_wallet"),
        sa.CheckConstraint("credit_balance >= 0", name="ck_accounts_credit_balance_nonneg"),
    )
    op.create_table(
        "sessions",
        sa.Column("id", sa.String(36), primary_key=True),
        sa.Column("account_id", sa.String(36), sa.ForeignKey("accounts.id"), nullable=False),
        sa.Column("service", sa.String(16), nullable=False),
        sa.Column("bundle_id", sa.String(36), nullable=True),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("room_name", sa.String(256), nullable=True),
        sa.Column("participant_identity", sa.String(256), nullable=True),
        sa.Column("server_url", sa.String(512), nullable=False),
        sa.Column("node_pubkey", sa.String(64), nullable=False),
        sa.Column("reserved_microcredits", sa.BigInteger, nullable=False),
        sa.Column("charged_microcredits", sa.BigInteger, nullable=False, server_default="0"),
        sa.Column("usage_units", sa.BigInteger, nullable=False, server_default="0"),
        sa.Column("limit_units", sa.BigInteger, nullable=False),
        sa.Column("token_expires_at", TS, nullable=False),
        sa.Column("started_at", TS, nullable=False),
        sa.Column("ended_at", TS, nullable=True),
        sa.Column("metadata", sa.JSON, nullable=True),
    )
    op.create_index("ix_sessions_account_status", "sessions", ["account_id", "status"])
    op.create_index("ix_sessions_status_expires", "sessions", ["status", "token_expires_at"])
    op.create_index("ix_sessions_bundle", "sessions", ["bundle_id"])
    op.create_table(
        "transactions",
        sa.Column("id", BigId, primary_key=True, autoincrement=True),
        sa.Column("account_id", sa.String(36), sa.ForeignKey("accounts.id"), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("amount", sa.BigInteger, nullable=False),
        sa.Column("hold", sa.BigInteger, nullable=False, server_default="0"),
        sa.Column("balance_after", sa.BigInteger, nullable=False),
        sa.Column("available_after", sa.BigInteger, nullable=False),
        sa.Column("session_id", sa.String(36), sa.ForeignKey("sessions.id"), nullable=True),
        sa.Column("reference", sa.String(256), nullable=True),
        sa.Column("memo", sa.Text, nullable=True),
        sa.Column("created_at", TS, nullable=False),
    )
    op.create_index("ix_transactions_account", "transactions", ["account_id", "id"])
    op.create_index("ix_transactions_session", "transactions", ["session_id"])
    op.create_index(
        "uq_transactions_purchase_reference",
        "transactions",
        ["reference"],
        unique=True,
        sqlite_where=sa.text("kind = 'purchase'"),
        postgresql_where=sa.text("kind = 'purchase'"),
    )


def downgrade() -> None:
    op.drop_table("transactions")
    op.drop_table("sessions")
    op.drop_table("accounts")
