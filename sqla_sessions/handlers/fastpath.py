"""The hot statements, compiled once by SQLAlchemy and run below `Connection.execute`.

SQLAlchemy Core costs about 80 µs per `Connection.execute` here (execution context, result object,
event plumbing) on top of a ~75 µs PostgreSQL round trip: more than the query itself. The handful of
statements every request runs (load by id hash, compare-and-set update, insert, touch) therefore
run on the DBAPI connection directly:

- PostgreSQL with psycopg 3: prepared once per connection and run through libpq (`handlers.libpq`);
- other drivers: on a DBAPI cursor, with the SQL and bind processing SQLAlchemy compiled for the dialect.

What stays SQLAlchemy's:
- an engine that anything listens to (`before_cursor_execute` and friends: statement counters,
  tracing, OpenTelemetry) or that echoes SQL runs every statement through `Connection.execute`, so
  each hook sees the real cursor and execution context; the statements are the same ones;
- an engine or connection with a `schema_translate_map` (a schema per tenant, say) runs them
  through `Connection.execute` too, which renders the translated schema;
- on any driver error the statement is run again through `Connection.execute`, which maps the
  error to `sqlalchemy.exc` and invalidates a dead connection, exactly as without the fast path.
  Re-running is safe for these statements: a failed SELECT has no effect, and the UPDATEs are
  compare-and-set or idempotent;
- a prepared statement a pooler refused (`handlers.prepared`, `prepared_statements="auto"`) turns the
  engine's prepared statements off first, so that run through `Connection.execute` is the one retry
  and goes unnamed (the refusal came before the statement ran, in autocommit: nothing ran).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from sqlalchemy.engine import Connection, Dialect
from sqlalchemy.sql.expression import Executable

from .libpq import PreparedStatement, StatementFailed, affected_rows, all_rows, connection_ok, first_row
from .prepared import refused


class FastStatement:
    """One statement compiled for one dialect, ready for `cursor.execute` (and libpq where it applies)."""

    __slots__ = ("libpq", "names", "processors", "sql", "statement")

    def __init__(self, statement: Executable, dialect: Dialect) -> None:
        compiled = statement.compile(dialect=dialect)  # type: ignore[attr-defined]
        self.statement = statement
        self.sql: str = str(compiled)
        self.names: tuple[str, ...] | None = tuple(compiled.positiontup) if compiled.positional else None
        # Bind processors (e.g. psycopg's binary wrapper for the payload); private but stable in 2.x.
        self.processors: dict[str, Callable[[Any], Any]] = dict(compiled._bind_processors)
        self.libpq: PreparedStatement | None = PreparedStatement.for_dialect(statement, dialect)

    def parameters(self, values: Mapping[str, Any]) -> Any:
        if self.processors:
            values = {k: (self.processors[k](v) if k in self.processors else v) for k, v in values.items()}
        if self.names is not None:
            return tuple(values[name] for name in self.names)
        return values


def fetch_one(conn: Connection, fast: FastStatement, values: Mapping[str, Any]) -> Any:
    """Run a SELECT and return its first row (a tuple) or None."""
    row = _run_below(conn, fast, values, first_row, lambda cursor: cursor.fetchone())
    if row is _NOT_RUN:
        return conn.execute(fast.statement, dict(values)).first()
    return row


def row_count(conn: Connection, fast: FastStatement, values: Mapping[str, Any]) -> int:
    """Run an INSERT/UPDATE/DELETE and return the number of rows it matched."""
    count = _run_below(conn, fast, values, affected_rows, lambda cursor: cursor.rowcount)
    if count is _NOT_RUN:
        return int(conn.execute(fast.statement, dict(values)).rowcount)
    return int(count)


def fetch_all(
    conn: Connection, prepared: PreparedStatement | None, statement: Executable, values: Mapping[str, Any]
) -> list[tuple[Any, ...]]:
    """Run a SELECT (written for libpq as *prepared*, for SQLAlchemy as *statement*) and return its rows."""
    rows = run_prepared(conn, prepared, values, all_rows)
    if rows is _NOT_RUN:
        return [tuple(row) for row in conn.execute(statement, dict(values))]
    return list(rows)


def run_prepared(
    conn: Connection, prepared: PreparedStatement | None, values: Mapping[str, Any], from_result: Callable[[Any], Any]
) -> Any:
    """Run *prepared* through libpq and return `from_result(result)`.

    `_NOT_RUN` when it certainly wrote nothing: this connection (or anything watching it) is not for
    libpq, or the server refused the statement and the connection is fine. When the outcome is
    unknown (the connection broke: the server may have committed before the reply was lost), it
    raises SQLAlchemy's error for the broken connection, which SQLAlchemy invalidates: nothing may
    then be written again as if it had not been (a retried compare-and-set would merge a save onto
    itself).
    """
    if prepared is None or not _below_allowed(conn):
        return _NOT_RUN
    fairy = conn.connection
    for attempt in (1, 2):
        try:
            result = prepared.execute(fairy.dbapi_connection, fairy.info, values)
            break
        except Exception as exc:
            if not _wrote_nothing(fairy.dbapi_connection, exc):
                conn.exec_driver_sql("SELECT 1")  # raises the broken connection's error, as SQLAlchemy maps it
                raise  # pragma: no cover - the connection answered after all; the outcome is still unknown
            # A pooler's refusal ("auto"): it came before the statement ran (autocommit: nothing else
            # did either), and the connection now sends unnamed statements: once more.
            if attempt == 2 or not refused(conn, exc):
                return _NOT_RUN
    return _NOT_RUN if result is None else from_result(result)


def _wrote_nothing(dbapi_connection: Any, error: Exception) -> bool:
    """Whether the statement that failed with *error* certainly wrote nothing: the connection is still
    fine, and the server refused it (an error with a SQLSTATE; libpq's own, for a lost connection,
    has none) or it failed on this side before anything was sent (a value libpq would not take)."""
    if not connection_ok(dbapi_connection):
        return False
    if isinstance(error, StatementFailed):
        return error.sqlstate is not None
    return True


def not_run(outcome: Any) -> bool:
    """Whether `run_prepared` left the statement to SQLAlchemy."""
    return outcome is _NOT_RUN


def _below_allowed(conn: Connection) -> bool:
    """Whether a statement may run below `Connection.execute` on *conn*."""
    if conn._has_events or conn.engine._has_events or conn._echo:
        return False  # something watches the statements: it must see them through SQLAlchemy
    # A schema decided per connection: SQLAlchemy compiles it in.
    return "schema_translate_map" not in conn._execution_options


#: `_run_below` did not run the statement (or it failed): the caller runs it through SQLAlchemy.
_NOT_RUN: Any = object()


def _run_below(
    conn: Connection,
    fast: FastStatement,
    values: Mapping[str, Any],
    from_result: Callable[[Any], Any],
    from_cursor: Callable[[Any], Any],
) -> Any:
    """Run *fast* through libpq or on a DBAPI cursor; `_NOT_RUN` when SQLAlchemy must do it."""
    if not _below_allowed(conn):
        return _NOT_RUN
    try:
        fairy = conn.connection
        if fast.libpq is not None:
            result = fast.libpq.execute(fairy.dbapi_connection, fairy.info, values)
            if result is not None:
                return from_result(result)
        cursor = fairy.dbapi_connection.cursor()  # type: ignore[union-attr]
        try:
            cursor.execute(fast.sql, fast.parameters(values))
            return from_cursor(cursor)
        finally:
            cursor.close()
    except Exception as exc:
        refused(conn, exc)  # a pooler's refusal ("auto"): SQLAlchemy's path below is the retry, unnamed
    return _NOT_RUN  # SQLAlchemy's path raises the error properly (and invalidates a dead connection)
