"""Alembic environment for the ledger. Only the programmatic, online path is supported:
``Ledger.migrate()`` passes an open connection (already inside a transaction) in
``config.attributes["connection"]``."""

from __future__ import annotations

from alembic import context

from gateway.ledger.models import VERSION_TABLE, metadata

connection = context.config.attributes.get("connection")
if connection is None:
    raise RuntimeError("run ledger migrations through `await Ledger(url).migrate()`")

context.configure(
    connection=connection,
    target_metadata=metadata,
    version_table=VERSION_TABLE,
    transaction_per_migration=False,
)
with context.begin_transaction():
    context.run_migrations()
