"""Hot-path statements: SQLAlchemy Core compiled once, run straight on the driver connection.

Why: a ledger statement costs about 10 us in pysqlite and 50 us in asyncpg, but 60-150 us more
through ``Connection.execute`` (execution context, events, result objects, and on asyncpg
SQLAlchemy's cursor adapter), and a session open runs four or five of them. A ``Prepared`` keeps
the Core statement as the one definition of the SQL (same columns, same type conversions: its bind
and result processors are the column types' own for the dialect), and skips the rest. On asyncpg
``rows`` goes through ``run_async`` on the pooled connection of a transaction body (the ledger's
PostgreSQL connections run in autocommit with the ledger's own ``BEGIN``/``COMMIT`` around each
body, so the statement is inside the body's transaction), and ``fetch`` runs a statement that is
a transaction by itself straight from the event loop. asyncpg's statement cache prepares each
statement once per connection.

A constraint violation raises SQLAlchemy's ``IntegrityError`` (its ``orig`` the driver's), as
``Connection.execute`` would; other driver errors propagate as the driver raised them.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Mapping
from typing import Any

import asyncpg
import sqlalchemy as sa
from sqlalchemy.engine import Dialect

Row = dict[str, Any]
_REQUIRED = object()
_INTEGRITY_ERRORS = (sqlite3.IntegrityError, asyncpg.IntegrityConstraintViolationError)


class Prepared:
    """One Core statement; ``rows(conn, params)`` runs it and returns its rows as dicts."""

    def __init__(self, stmt: sa.Executable) -> None:
        self.stmt = stmt
        self._compiled: dict[Dialect, tuple[str, list[Any], list[Any]]] = {}

    def _compile(self, dialect: Dialect) -> tuple[str, list[Any], list[Any]]:
        compiled = self.stmt.compile(dialect=dialect)  # type: ignore[attr-defined]
        binds = []
        for name in compiled.positiontup or ():
            bind = compiled.binds[name]  # a literal of the statement carries its own value
            binds.append(
                (
                    name,
                    bind.type.dialect_impl(dialect).bind_processor(dialect),
                    _REQUIRED if bind.required else bind.effective_value,
                )
            )
        columns = [
            (c.key, c.type.dialect_impl(dialect).result_processor(dialect, None))
            for c in getattr(self.stmt, "exported_columns", ())
        ]
        entry = (compiled.string, binds, columns)
        self._compiled[dialect] = entry
        return entry

    def rows(self, conn: sa.Connection, params: Mapping[str, Any]) -> list[Row]:
        """Run on a Connection's driver connection (asyncpg: from the greenlet of ``run_sync``)."""
        sql, args, columns = self._bind(conn.dialect, params)
        driver = conn.connection.dbapi_connection
        try:
            if conn.dialect.driver == "asyncpg":
                fetched = driver.run_async(lambda c: c.fetch(sql, *args))  # type: ignore[union-attr]
            else:
                fetched = driver.execute(sql, args).fetchall()  # type: ignore[union-attr]
        except _INTEGRITY_ERRORS as exc:
            raise sa.exc.IntegrityError(sql, args, exc) from exc
        return _converted(columns, fetched)

    async def fetch(
        self, driver: asyncpg.Connection, dialect: Dialect, params: Mapping[str, Any]
    ) -> list[Row]:
        """Run on a bare asyncpg connection, from the event loop (no Connection, no greenlet:
        for a statement that is a transaction by itself)."""
        sql, args, columns = self._bind(dialect, params)
        try:
            fetched = await driver.fetch(sql, *args)
        except _INTEGRITY_ERRORS as exc:
            raise sa.exc.IntegrityError(sql, args, exc) from exc
        return _converted(columns, fetched)

    def _bind(self, dialect: Dialect, params: Mapping[str, Any]) -> tuple[str, list[Any], Any]:
        sql, binds, columns = self._compiled.get(dialect) or self._compile(dialect)
        args = []
        for name, bind, literal in binds:
            value = params.get(name, literal)
            if value is _REQUIRED:
                raise KeyError(f"statement parameter {name!r} missing for: {sql}")
            args.append(value if bind is None else bind(value))
        return sql, args, columns

    def first(self, conn: sa.Connection, params: Mapping[str, Any]) -> Row | None:
        found = self.rows(conn, params)
        return found[0] if found else None

    def one(self, conn: sa.Connection, params: Mapping[str, Any]) -> Row:
        found = self.rows(conn, params)
        if len(found) != 1:
            raise sa.exc.NoResultFound(f"expected one row, got {len(found)}")
        return found[0]


def _converted(columns: list[Any], fetched: Any) -> list[Row]:
    return [
        {
            key: (value if proc is None else proc(value))
            for (key, proc), value in zip(columns, row, strict=True)
        }
        for row in fetched
    ]


class PreparedInsert:
    """``INSERT INTO table (...) VALUES (...), (...)``: several rows in one statement (one round
    trip), compiled once per row count. Rows go in in the order given (serial ids follow it)."""

    def __init__(self, table: sa.Table, columns: list[str]) -> None:
        self.table = table
        self.columns = columns
        self._by_count: dict[int, Prepared] = {}

    def run(self, conn: sa.Connection, rows: list[Mapping[str, Any]]) -> None:
        if not rows:
            return
        stmt = self._by_count.get(len(rows))
        if stmt is None:
            types = {c.key: c.type for c in self.table.c}
            stmt = self._by_count[len(rows)] = Prepared(
                sa.insert(self.table).values(
                    [
                        {key: sa.bindparam(f"{key}_{i}", type_=types[key]) for key in self.columns}
                        for i in range(len(rows))
                    ]
                )
            )
        stmt.rows(
            conn, {f"{key}_{i}": row[key] for i, row in enumerate(rows) for key in self.columns}
        )
