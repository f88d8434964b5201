"""used_signatures: wallet request signatures already answered, shared by every gateway process

Revision ID: 0005
Revises: 0004

A signed request is answered once (gateway/auth.py). Remembered in one process only, a copy of a
request that spends credits would be answered again by another gateway process on the same
ledger (a second worker, a second gateway). The ids live here while their timestamp is inside the
signing window, then the sweeper deletes them.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "used_signatures",
        sa.Column("id", sa.String(128), primary_key=True),
        sa.Column("expires_at", sa.Float, nullable=False),
        sa.Column("offered_body", sa.String(64), nullable=True),
        sa.Column("repeat_until", sa.Float, nullable=False),
    )
    op.create_index("used_signatures_expires_at", "used_signatures", ["expires_at"])


def downgrade() -> None:
    op.drop_index("used_signatures_expires_at", "used_signatures")
    op.drop_table("used_signatures")
