"""Hot-path statements: SQLAlchemy Core compiled once, run straight on the DB-API cursor.

Why: on SQLite a ledger statement costs about 10 us in the driver but 60-100 us through
``Connection.execute`` (execution context, events, result objects), and the ledger's writer
thread runs four of them per session it opens, all under the GIL the event loop needs. A
``Prepared`` keeps the Core statement as the one definition of the SQL (same columns, same type
conversions: its bind and result processors are the column types' own), and skips the rest.
On PostgreSQL (asyncpg, where the round trip dominates) it simply runs through ``conn.execute``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Dialect

Row = dict[str, Any]
_REQUIRED = object()


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
            binds.append((name, bind.type.dialect_impl(dialect).bind_processor(dialect),
                          _REQUIRED if bind.required else bind.effective_value))
        columns = [(c.key, c.type.dialect_impl(dialect).result_processor(dialect, None))
                   for c in getattr(self.stmt, "exported_columns", ())]
        entry = (compiled.string, binds, columns)
        self._compiled[dialect] = entry
        return entry

    def rows(self, conn: sa.Connection, params: Mapping[str, Any]) -> list[Row]:
        if conn.dialect.name != "sqlite":
            result = conn.execute(self.stmt, dict(params))
            return [dict(r) for r in result.mappings()] if result.returns_rows else []
        sql, binds, columns = (self._compiled.get(conn.dialect)
                               or self._compile(conn.dialect))
        args = []
        for name, bind, literal in binds:
            value = params.get(name, literal)
            if value is _REQUIRED:
                raise KeyError(f"statement parameter {name!r} missing for: {sql}")
            args.append(value if bind is None else bind(value))
        fetched = conn.connection.driver_connection.execute(sql, args).fetchall()  # type: ignore[union-attr]
        return [{key: (value if proc is None else proc(value))
                 for (key, proc), value in zip(columns, row, strict=True)} for row in fetched]

    def first(self, conn: sa.Connection, params: Mapping[str, Any]) -> Row | None:
        found = self.rows(conn, params)
        return found[0] if found else None

    def one(self, conn: sa.Connection, params: Mapping[str, Any]) -> Row:
        found = self.rows(conn, params)
        if len(found) != 1:
            raise sa.exc.NoResultFound(f"expected one row, got {len(found)}")
        return found[0]
