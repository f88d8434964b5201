"""The ledger's database layer: connections, transactions and dialect differences, SQLite or
PostgreSQL, behind one interface (``Database``) so the accounting above it reads as accounting.

What a caller sees: ``write(fn, *args)`` runs ``fn(conn)`` -- a plain function of a sync
``sa.Connection`` -- as one write transaction and returns once it has committed (rolled back if
``fn`` raises); ``read(fn, *args)`` runs one read-only transaction; ``first(stmt, params)`` and
``all(stmt)`` are one-statement reads; ``migrate()`` brings the schema to the newest revision.
``is_postgres``, ``insert(table)`` and ``for_update(stmt)`` carry the dialect differences the
accounting needs (the row lock, the ``ON CONFLICT`` insert).

Why it is built this way (the performance work lives here):

* PostgreSQL (asyncpg): a body runs through ``AsyncConnection.run_sync`` on a connection in
  autocommit, between the layer's own ``BEGIN`` and ``COMMIT`` (``_pg_transaction``), so that the
  ``Prepared`` statements sent straight to asyncpg belong to the transaction; a statement that is
  a transaction by itself (``statement``) goes straight from the event loop, with no ``Connection``
  and no greenlet hop. A connection the server closed is dropped and the work runs once more,
  unless it writes and may have committed.
* SQLite: the whole body runs in one hop on the database's single writer thread (its own pysqlite
  connection; reads on reader threads), so a transaction costs one thread hop instead of one per
  statement, one process never has two writers spinning on SQLite's busy handler, and bodies
  queued together commit together (``writer.py``). The file is in WAL mode; write transactions
  begin with ``BEGIN IMMEDIATE`` (one writer per database file, several processes allowed).
* The hot statements are ``Prepared`` (``prepared.py``).
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import Awaitable, Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from .models import VERSION_TABLE
from .prepared import Prepared
from .writer import GroupWriter

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"
_PG_MIGRATION_LOCK = 0x6C656467  # pg_advisory_xact_lock key: several gateways migrate at once
_SQLITE_READERS = 2  # reader threads (and pooled connections) per SQLite database

Row = Mapping[str, Any]
T = TypeVar("T")
S = TypeVar("S", bound=sa.Select[Any])


def normalize_url(url: str) -> str:
    """``sqlite:///path`` and ``postgresql://...`` get their async drivers."""
    u = make_url(url)
    backend, driver = u.get_backend_name(), u.get_driver_name()
    if backend == "sqlite" and driver != "aiosqlite":
        u = u.set(drivername="sqlite+aiosqlite")
    elif backend == "postgresql" and driver != "asyncpg":
        u = u.set(drivername="postgresql+asyncpg")
    elif backend not in ("sqlite", "postgresql"):
        raise ValueError(f"unsupported ledger database {backend!r}: use sqlite or postgresql")
    return u.render_as_string(hide_password=False)


def _ensure_wal(cur: Any, busy_ms: int) -> None:
    """Put the file in WAL mode (a property of the file: once is enough). The switch needs an
    exclusive lock, and when several connections switch a new file at once SQLite refuses some
    of them at once rather than wait (waiting could deadlock), so those try again until the busy
    timeout, by when the file is in WAL mode."""
    deadline = time.monotonic() + busy_ms / 1000
    while True:
        try:
            cur.execute("PRAGMA journal_mode")
            if str(cur.fetchone()[0]).lower() == "wal":
                return
            cur.execute("PRAGMA journal_mode=WAL")
            cur.fetchall()
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.01)


def _install_sqlite_hooks(
    sync_engine: sa.Engine, busy_ms: int, *, auto_checkpoint: bool = True
) -> None:
    pragmas = ["foreign_keys=ON", "synchronous=NORMAL", f"busy_timeout={busy_ms}"]
    if not auto_checkpoint:  # the GroupWriter's own thread checkpoints
        pragmas.append("wal_autocheckpoint=0")

    @event.listens_for(sync_engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        dbapi_conn.isolation_level = None  # SQLAlchemy emits BEGIN itself (below)
        cur = dbapi_conn.cursor()
        _ensure_wal(cur, busy_ms)
        for pragma in pragmas:
            cur.execute(f"PRAGMA {pragma}")
        cur.close()

    @event.listens_for(sync_engine, "begin")
    def _on_begin(conn: sa.Connection) -> None:
        write = conn.get_execution_options().get("ledger_write")
        conn.exec_driver_sql("BEGIN IMMEDIATE" if write else "BEGIN")


class _StaleConnection(Exception):
    """Carries (as ``__cause__``) an error met on a connection the server had closed;
    ``maybe_done``: the body's changes may have been committed (COMMIT, or its one statement,
    was sent), so it must not run again."""

    def __init__(self, maybe_done: bool) -> None:
        super().__init__()
        self.maybe_done = maybe_done


def _raise_if_closed(
    driver: Any,
    invalidate: Callable[[], None],
    maybe_done: bool,
    cause: BaseException | None = None,
) -> None:
    """A connection the server closed is invalidated (the pool drops it) and reported as
    ``_StaleConnection``; an open one is left alone."""
    if driver.is_closed():
        invalidate()
        raise _StaleConnection(maybe_done) from cause


def _pg_transaction(
    conn: sa.Connection, begin: str, fn: Callable[..., T], args: tuple[Any, ...]
) -> T:
    """``fn(conn, *args)`` between ``begin`` and COMMIT on an autocommit asyncpg connection.
    Whatever ``fn`` raises rolls back; a connection that cannot roll back is invalidated, so the
    pool never hands out one left in a transaction."""
    driver = conn.connection.dbapi_connection
    assert driver is not None
    run = driver.run_async  # type: ignore[attr-defined]
    raw = driver.driver_connection  # type: ignore[attr-defined]
    _raise_if_closed(raw, conn.invalidate, maybe_done=False)  # nothing sent yet
    committing = False
    try:
        run(lambda c: c.execute(begin))
        result = fn(conn, *args)
        committing = True
        run(lambda c: c.execute("COMMIT"))
        return result
    except BaseException as exc:
        _raise_if_closed(raw, conn.invalidate, maybe_done=committing, cause=exc)
        if raw.is_in_transaction():
            try:
                run(lambda c: c.execute("ROLLBACK"))
            except BaseException:  # noqa: BLE001 -- whatever stopped it (a cancel included),
                conn.invalidate()  # the connection is not reused; the body's error is raised
        raise


class Database:
    """``Database(url)``: the ledger's connections; ``await close()`` at shutdown.

    ``url``: ``sqlite:///path/to/ledger.db`` (the work runs on pysqlite threads; ``engine`` is an
    aiosqlite engine on the same file, for tools and tests that want an ``AsyncConnection``) or
    ``postgresql://user@host/db`` (asyncpg).
    """

    def __init__(
        self,
        url: str,
        *,
        sqlite_busy_timeout: float = 30.0,
        pool_size: int = 16,
        idle_transaction_timeout: float = 60.0,
        echo: bool = False,
    ) -> None:
        self.url = normalize_url(url)
        u = make_url(self.url)
        self.backend = u.get_backend_name()
        self.is_postgres = self.backend == "postgresql"
        kwargs: dict[str, Any] = {"echo": echo}
        if self.is_postgres:
            # a fixed pool: an overflow connection would be opened and closed around single
            # requests under load (a TCP connect, a PostgreSQL backend fork and an SSL attempt,
            # each time); requests beyond it wait for a connection. Autocommit (asyncpg's
            # setting is client-side): the layer sends BEGIN and COMMIT itself (_pg_run), so
            # the statements ``Prepared`` sends straight to asyncpg are inside the transaction,
            # and a one-statement call needs no transaction at all.
            if isinstance(pool_size, bool) or not isinstance(pool_size, int) or pool_size < 1:
                raise ValueError(f"pool_size must be a positive int, got {pool_size!r}")
            kwargs.update(pool_size=pool_size, max_overflow=0, isolation_level="AUTOCOMMIT")
            # A connection left idle inside a transaction (a bug, a process stopped mid-way)
            # would hold its row locks for good, and every later write to those accounts would
            # wait for ever: the server ends such a session instead (the pool then replaces the
            # connection, as after a restart). The ledger's transactions never idle that long.
            if not idle_transaction_timeout > 0:
                raise ValueError(
                    f"idle_transaction_timeout must be > 0 s, got {idle_transaction_timeout!r}"
                )
            idle_ms = str(max(1, round(idle_transaction_timeout * 1000)))
            kwargs["connect_args"] = {
                "server_settings": {"idle_in_transaction_session_timeout": idle_ms}
            }
        else:
            db = u.database
            if not db or db == ":memory:" or u.query.get("mode") == "memory":
                raise ValueError("the SQLite ledger needs a file (sqlite:///path/ledger.db)")
            Path(db).expanduser().parent.mkdir(parents=True, exist_ok=True)
            kwargs["connect_args"] = {"timeout": sqlite_busy_timeout}
        self.engine: AsyncEngine = create_async_engine(self.url, **kwargs)
        self._sync_engine: sa.Engine | None = None
        self.writer: GroupWriter | None = None  # SQLite only: the group-commit writer thread
        self._reader: ThreadPoolExecutor | None = None
        if not self.is_postgres:
            busy_ms = int(sqlite_busy_timeout * 1000)
            # the aiosqlite engine stays for tools and tests; the work runs on the sync engine
            _install_sqlite_hooks(self.engine.sync_engine, busy_ms)
            self._sync_engine = sa.create_engine(
                u.set(drivername="sqlite+pysqlite"),
                echo=echo,
                pool_size=_SQLITE_READERS + 1,
                connect_args={"timeout": sqlite_busy_timeout, "check_same_thread": False},
            )
            _install_sqlite_hooks(self._sync_engine, busy_ms, auto_checkpoint=False)
            self.writer = GroupWriter(self._sync_engine.execution_options(ledger_write=True))
            self._reader = ThreadPoolExecutor(
                _SQLITE_READERS, thread_name_prefix="ledger-sqlite-reader"
            )

    async def close(self) -> None:
        """Finish every write already submitted, then close every connection."""
        await self.engine.dispose()
        if self._sync_engine is not None:
            await asyncio.to_thread(self._close_sqlite)

    def _close_sqlite(self) -> None:
        assert self.writer is not None and self._reader is not None
        assert self._sync_engine is not None
        self.writer.close()
        self._reader.shutdown(wait=True)
        self._sync_engine.dispose()

    # ---------------------------------------------------------------- dialect differences

    def insert(self, table: sa.Table) -> Any:
        """The dialect's ``INSERT`` (it has ``on_conflict_do_nothing``)."""
        return (postgresql.insert if self.is_postgres else sqlite.insert)(table)

    def for_update(self, stmt: S) -> S:
        """``stmt`` locking the rows it reads until the transaction ends. SQLite needs no row
        lock: a write transaction holds the whole file from its ``BEGIN IMMEDIATE``."""
        return stmt.with_for_update() if self.is_postgres else stmt

    # ---------------------------------------------------------------- schema

    async def migrate(self, revision: str = "head") -> None:
        """Create or upgrade the schema (Alembic, in one transaction; safe from several
        processes at once)."""
        pg = self.is_postgres

        def body(conn: sa.Connection) -> None:
            if pg:
                conn.execute(sa.text("SELECT pg_advisory_xact_lock(:k)"), {"k": _PG_MIGRATION_LOCK})
            _alembic_upgrade(conn, revision)

        await self.write(body, alone=True)

    async def schema_revision(self) -> str | None:
        return await self.read(_alembic_current)

    # ---------------------------------------------------------------- transactions

    async def write(self, fn: Callable[..., T], *args: Any, alone: bool = False) -> T:
        """Run ``fn(conn, *args)`` as one write transaction (committed when this returns;
        rolled back if ``fn`` raises). On SQLite it may share its COMMIT with other bodies queued
        at the same time, unless ``alone``. A cancelled caller does not cancel its transaction
        (queued or running): it commits or rolls back as if the caller had waited."""
        if self.is_postgres:
            return await asyncio.shield(self._pg_run(fn, args, reads_only=False))
        assert self.writer is not None
        return await asyncio.shield(self.writer.submit(fn, args, alone=alone))

    async def read(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn(conn, *args)`` in one read-only transaction."""
        if self.is_postgres:
            return await self._pg_run(fn, args, reads_only=True)
        return await asyncio.get_running_loop().run_in_executor(
            self._reader, self._sqlite_read, fn, args
        )

    async def all(self, stmt: sa.Select[Any]) -> list[Row]:
        """Every row of one read."""
        return await self.read(lambda conn: list(conn.execute(stmt).mappings().all()))

    async def first(self, stmt: Prepared, params: dict[str, Any]) -> Row | None:
        """The first row of a one-statement read."""
        if self.is_postgres:
            found = await self.statement(stmt, params, reads_only=True)
            return found[0] if found else None
        return await self.read(stmt.first, params)

    async def statement(
        self, stmt: Prepared, params: Mapping[str, Any], *, reads_only: bool
    ) -> list[Row]:
        """PostgreSQL: one statement, a transaction by itself, on a pooled connection straight
        from the event loop: no ``Connection`` and no greenlet hop (half the client's cost of a
        read). A writing one is not cancelled with its caller."""
        if not self.is_postgres:
            raise RuntimeError("Database.statement runs on PostgreSQL only; use write or read")

        async def attempt() -> list[Row]:
            pooled = await self.engine.raw_connection()
            try:
                driver = pooled.driver_connection
                _raise_if_closed(driver, pooled.invalidate, maybe_done=False)  # nothing sent yet
                try:
                    return await stmt.fetch(driver, self.engine.dialect, params)
                except BaseException as exc:
                    _raise_if_closed(driver, pooled.invalidate, maybe_done=True, cause=exc)
                    if isinstance(exc, asyncio.CancelledError):  # asyncpg may be mid-query
                        pooled.invalidate()
                    raise
            finally:
                pooled.close()  # back to the pool

        if reads_only:
            return await self._pg_retrying(attempt, reads_only)
        return await asyncio.shield(self._pg_retrying(attempt, reads_only))

    async def _pg_run(self, fn: Callable[..., T], args: tuple[Any, ...], *, reads_only: bool) -> T:
        """``fn(conn, *args)`` in one transaction (``reads_only``: a read-only one)."""
        begin = "BEGIN READ ONLY" if reads_only else "BEGIN"

        async def attempt() -> T:
            async with self.engine.connect() as conn:
                return await conn.run_sync(_pg_transaction, begin, fn, args)

        return await self._pg_retrying(attempt, reads_only)

    async def _pg_retrying(self, attempt: Callable[[], Awaitable[T]], reads_only: bool) -> T:
        for n in (1, 2):
            try:
                return await attempt()
            except _StaleConnection as stale:
                # the server closed the connection (a restart, say): the pool's other
                # connections are as old, so they are all replaced, as SQLAlchemy does on a
                # disconnect. The work runs once more on a new connection unless it writes and
                # may have committed (the caller then gets the error and can look).
                await self.engine.dispose(close=False)
                if n == 2 or (stale.maybe_done and not reads_only):
                    if stale.__cause__ is None:
                        raise ConnectionError(
                            "the ledger's database closed the connection"
                        ) from stale
                    raise stale.__cause__ from None
        raise AssertionError("unreachable")

    def _sqlite_read(self, fn: Callable[..., T], args: tuple[Any, ...]) -> T:
        assert self._sync_engine is not None
        with self._sync_engine.connect() as conn:
            return fn(conn, *args)


def _alembic_config(connection: sa.Connection) -> Any:
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    cfg.attributes["connection"] = connection
    return cfg


def _alembic_upgrade(connection: sa.Connection, revision: str) -> None:
    from alembic import command

    command.upgrade(_alembic_config(connection), revision)


def _alembic_current(connection: sa.Connection) -> str | None:
    from alembic.runtime.migration import MigrationContext

    ctx = MigrationContext.configure(connection, opts={"version_table": VERSION_TABLE})
    return ctx.get_current_revision()
