"""The hot statements, compiled once by SQLAlchemy and executed on the DBAPI cursor.

SQLAlchemy Core costs about 80 µs per `Connection.execute` here (execution context, result object,
event plumbing) on top of a ~75 µs PostgreSQL round trip: more than the query itself. The handful of
statements every request runs (load by id hash, compare-and-set update, insert, touch) therefore
run on the DBAPI cursor with the SQL and bind processing SQLAlchemy compiled for this dialect.

What stays SQLAlchemy's:
- the engine's `before_cursor_execute` / `after_cursor_execute` events fire around each statement,
  so statement counting, tracing and logging hooks keep working (with `context=None`);
- on any driver error the statement is run again through `Connection.execute`, which maps the
  error to `sqlalchemy.exc` and invalidates a dead connection, exactly as without the fast path.
  Re-running is safe for these statements: a failed SELECT has no effect, and the UPDATEs are
  compare-and-set or idempotent.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from sqlalchemy.engine import Connection, Dialect
from sqlalchemy.sql.expression import Executable


class FastStatement:
    """One statement compiled for one dialect, ready for `cursor.execute`."""

    __slots__ = ("names", "processors", "sql", "statement")

    def __init__(self, statement: Executable, dialect: Dialect) -> None:
        compiled = statement.compile(dialect=dialect)  # type: ignore[attr-defined]
        self.statement = statement
        self.sql: str = str(compiled)
        self.names: tuple[str, ...] | None = tuple(compiled.positiontup) if compiled.positional else None
        # Bind processors (e.g. psycopg's binary wrapper for the payload); private but stable in 2.x.
        self.processors: dict[str, Callable[[Any], Any]] = dict(compiled._bind_processors)

    def parameters(self, values: Mapping[str, Any]) -> Any:
        if self.processors:
            values = {k: (self.processors[k](v) if k in self.processors else v) for k, v in values.items()}
        if self.names is not None:
            return tuple(values[name] for name in self.names)
        return values


def fetch_one(conn: Connection, fast: FastStatement, values: Mapping[str, Any]) -> Any:
    """Run a SELECT and return its first row (a tuple) or None."""
    try:
        return _execute(conn, fast, values, lambda cursor: cursor.fetchone())
    except Exception:
        return conn.execute(fast.statement, dict(values)).first()


def row_count(conn: Connection, fast: FastStatement, values: Mapping[str, Any]) -> int:
    """Run an INSERT/UPDATE/DELETE and return the number of rows it matched."""
    try:
        return int(_execute(conn, fast, values, lambda cursor: cursor.rowcount))
    except Exception:
        return int(conn.execute(fast.statement, dict(values)).rowcount)


def _execute(conn: Connection, fast: FastStatement, values: Mapping[str, Any], read: Callable[[Any], Any]) -> Any:
    engine = conn.engine
    events = getattr(engine, "_has_events", True) or getattr(conn, "_has_events", True)
    parameters = fast.parameters(values)
    cursor = conn.connection.dbapi_connection.cursor()  # type: ignore[union-attr]
    try:
        if events:
            conn.dispatch.before_cursor_execute(conn, cursor, fast.sql, parameters, None, False)
        cursor.execute(fast.sql, parameters)
        result = read(cursor)
        if events:
            conn.dispatch.after_cursor_execute(conn, cursor, fast.sql, parameters, None, False)
        return result
    finally:
        cursor.close()
