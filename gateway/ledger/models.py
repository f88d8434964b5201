"""Tables (SQLAlchemy Core). The migrations in ``migrations/versions`` create exactly this schema;
a test compares the two, so change both together (new revision, never an edited old one)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Dialect

metadata = sa.MetaData()

# Alembic's version table for the ledger (a name of its own: the database may be shared).
VERSION_TABLE = "ledger_alembic_version"

# SQLite has INTEGER PRIMARY KEY autoincrement only for the exact type INTEGER (64-bit anyway).
BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


class UTCDateTime(sa.TypeDecorator[datetime]):
    """Timezone-aware UTC in and out. PostgreSQL stores timestamptz; SQLite stores naive UTC text
    (fixed width, so comparisons in SQL order correctly). Naive datetimes are refused."""

    impl = sa.DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None or value.utcoffset() is None:
            raise ValueError(f"naive datetime {value!r}: the ledger stores timezone-aware UTC")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: Any, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)


accounts = sa.Table(
    "accounts",
    metadata,
    sa.Column("id", sa.String(36), primary_key=True),
    sa.Column("wallet_chain", sa.String(16), nullable=False),
    sa.Column("wallet_address", sa.String(128), nullable=False),
    # purchases + grants - charges; == sum(transactions.amount)
    sa.Column("credit_balance", sa.BigInteger, nullable=False, server_default="0"),
    sa.Column("max_concurrent_sessions", sa.Integer, nullable=False, server_default="10"),
    sa.Column("max_api_rate", sa.Integer, nullable=False, server_default="50"),
    sa.Column("created_at", UTCDateTime, nullable=False),
    # revision 0002: the part of credit_balance held by active sessions; == sum(transactions.hold)
    sa.Column("held_microcredits", sa.BigInteger, nullable=False, server_default="0"),
    # revision 0003: the account's active sessions, a bundle counted once (the concurrency limit)
    sa.Column("active_sessions", sa.Integer, nullable=False, server_default="0"),
    sa.UniqueConstraint("wallet_chain", "wallet_address", name="uq_accounts_wallet"),
    sa.CheckConstraint("credit_balance >= 0", name="ck_accounts_credit_balance_nonneg"),
)

sessions = sa.Table(
    "sessions",
    metadata,
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
    sa.Column("token_expires_at", UTCDateTime, nullable=False),
    sa.Column("started_at", UTCDateTime, nullable=False),
    sa.Column("ended_at", UTCDateTime, nullable=True),
    sa.Column("metadata", sa.JSON, nullable=True),
    sa.Index("ix_sessions_account_status", "account_id", "status"),
    sa.Index("ix_sessions_status_expires", "status", "token_expires_at"),
    sa.Index("ix_sessions_bundle", "bundle_id"),
)

transactions = sa.Table(
    "transactions",
    metadata,
    sa.Column("id", BigId, primary_key=True, autoincrement=True),
    sa.Column("account_id", sa.String(36), sa.ForeignKey("accounts.id"), nullable=False),
    sa.Column("kind", sa.String(16), nullable=False),
    # change of credit_balance (signed)
    sa.Column("amount", sa.BigInteger, nullable=False),
    # change of the amount held for active sessions (signed)
    sa.Column("hold", sa.BigInteger, nullable=False, server_default="0"),
    sa.Column("balance_after", sa.BigInteger, nullable=False),
    sa.Column("available_after", sa.BigInteger, nullable=False),
    sa.Column("session_id", sa.String(36), sa.ForeignKey("sessions.id"), nullable=True),
    sa.Column("reference", sa.String(256), nullable=True),
    sa.Column("memo", sa.Text, nullable=True),
    sa.Column("created_at", UTCDateTime, nullable=False),
    sa.Index("ix_transactions_account", "account_id", "id"),
    sa.Index("ix_transactions_session", "session_id"),
    sa.Index(
        "uq_transactions_purchase_reference",
        "reference",
        unique=True,
        sqlite_where=sa.text("kind = 'purchase'"),
        postgresql_where=sa.text("kind = 'purchase'"),
    ),
)

# revision 0002; filled by the payments issue.
payments = sa.Table(
    "payments",
    metadata,
    sa.Column("id", sa.String(36), primary_key=True),
    sa.Column("chain", sa.String(16), nullable=False),
    sa.Column("signature", sa.String(256), nullable=False),
    sa.Column("status", sa.String(16), nullable=False),  # pending|confirmed|credited|failed
    sa.Column("amount_microcredits", sa.BigInteger, nullable=False),
    sa.Column("wallet_address", sa.String(128), nullable=False),
    sa.Column("account_id", sa.String(36), sa.ForeignKey("accounts.id"), nullable=True),
    sa.Column("detail", sa.JSON, nullable=True),
    sa.Column("created_at", UTCDateTime, nullable=False),
    sa.Column("updated_at", UTCDateTime, nullable=False),
    sa.UniqueConstraint("signature", name="uq_payments_signature"),
    sa.Index("ix_payments_status", "status"),
)

# revision 0004: node events already applied (SFU webhooks), so a replayed one applies nothing.
node_events = sa.Table(
    "node_events",
    metadata,
    sa.Column("node_pubkey", sa.String(64), primary_key=True),
    sa.Column("event_id", sa.String(128), primary_key=True),
    sa.Column("session_id", sa.String(36), sa.ForeignKey("sessions.id"), nullable=False),
    sa.Column("created_at", UTCDateTime, nullable=False),
)

# revision 0005: wallet request signatures already answered, for every gateway process on this
# ledger (gateway/ledger/signatures.py); unix seconds, deleted once out of the signing window.
used_signatures = sa.Table(
    "used_signatures",
    metadata,
    sa.Column("id", sa.String(128), primary_key=True),
    sa.Column("expires_at", sa.Float, nullable=False),
    sa.Column("offered_body", sa.String(64), nullable=True),
    sa.Column("repeat_until", sa.Float, nullable=False),
    sa.Index("used_signatures_expires_at", "expires_at"),
)
