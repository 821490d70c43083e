"""The one way a hot statement runs: compiled once by SQLAlchemy Core, sent on the driver's cursor.

`Connection.execute` costs about 40 µs of client CPU per statement here (execution context, result
object, event plumbing); the same compiled SQL on the driver's own cursor (psycopg 3 with
`prepare=True, binary=True`, pymysql, sqlite3) about 27 µs (benchmarks/statement_paths.py). The
statements every request runs (load, compare-and-set, insert, touch, and their batches) go this way,
always: there is no second path to fall back to, and none to turn off.

- The connection is SQLAlchemy's, checked out of its pool (`Connection.connection.dbapi_connection`,
  a public attribute); the statement is the Core statement's own compiled SQL (`Compiled.string`,
  and `Compiled.positiontup` for a positional paramstyle); parameters are plain Python values every
  driver adapts itself (str, int, bytes, None, lists of them for PostgreSQL's arrays).
- A driver error becomes SQLAlchemy's (`DBAPIError.instance`, parameters hidden: they are session
  payloads), and a connection found dead (`Dialect.is_disconnect`, or a SQLSTATE saying the server
  ended it) is invalidated with the pool's older connections, as `Connection.execute` would. Nothing
  is sent twice here.
- What SQLAlchemy's `ConnectionEvents` see: not these statements (`before_cursor_execute`, `echo`,
  OpenTelemetry's SQLAlchemy instrumentation). Instrumentation at the driver's level does (psycopg's
  cursor, OpenTelemetry's psycopg instrumentation), and so does the server (`pg_stat_statements`).
  Every other statement (merges, blocking requests, GC, devices) runs through `Connection.execute`.
- A connection or engine with a `schema_translate_map` (a schema per tenant) runs them through
  `Connection.execute` instead, which renders the translated schema.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.sql.expression import Executable

from .prepared import PreparedSwitch

T = TypeVar("T")

#: Connection record `info` key: the psycopg cursor the hot statements run on, and its DBAPI connection.
_CURSOR = "sqla_sessions_cursor"
#: Connection record `info` key: when the connection was opened (unix time).
_OPENED = "sqla_sessions_opened"

#: SQLSTATEs of a connection the server ended (class 08, and operator intervention: `pg_terminate_backend`,
#: a shutdown). The error may arrive before the driver has read the end of the connection, so the
#: dialect does not see it dead yet; the next statement on it would fail again.
_CONNECTION_ENDED = ("08", "57P01", "57P02", "57P03")


class Compiled:
    """One statement compiled for one dialect: its SQL, and its parameters' order if positional."""

    __slots__ = ("names", "sql", "statement")

    def __init__(self, statement: Executable, engine: Engine) -> None:
        compiled = statement.compile(dialect=engine.dialect)  # type: ignore[attr-defined]
        self.statement = statement
        self.sql: str = compiled.string
        self.names: tuple[str, ...] | None = tuple(compiled.positiontup) if compiled.positional else None

    def parameters(self, values: Mapping[str, Any]) -> Any:
        if self.names is None:
            return values
        return tuple(values[name] for name in self.names)


class _Driver:
    """How statements go to one dialect's DBAPI connections."""

    __slots__ = ("dead_since", "dialect", "error", "prepared", "psycopg")

    def __init__(self, engine: Engine, prepared: PreparedSwitch) -> None:
        self.dialect = dialect = engine.dialect
        self.error: type[Exception] = dialect.loaded_dbapi.Error
        self.psycopg = dialect.driver == "psycopg"  # the sync driver: prepare and binary are its options
        self.prepared = prepared
        self.dead_since = 0.0  # when a connection was last found ended by the server (unix time)
        self.watch(engine)

    def watch(self, engine: Engine) -> None:
        """Replace, at checkout, each pooled connection opened before one was found ended by the
        server: the pool's own events, raising `DisconnectionError` (SQLAlchemy's documented way to
        have the pool connect afresh)."""

        def opened(_dbapi_connection: Any, record: Any) -> None:
            record.info[_OPENED] = time.time()

        def checked_out(_dbapi_connection: Any, record: Any, _proxy: Any) -> None:
            if record.info.get(_OPENED, 0.0) < self.dead_since:
                raise sa.exc.DisconnectionError("opened before the server ended another connection")

        sa.event.listen(engine, "connect", opened)
        sa.event.listen(engine, "checkout", checked_out)


class Runner:
    """Runs `Compiled` statements on the connections of one engine, or of the async engine made from
    the same URL (`AsyncSessionStore`: the same SQL, its connections through `run_sync`)."""

    def __init__(self, engine: Engine, prepared: PreparedSwitch) -> None:
        self._drivers = {engine.dialect: _Driver(engine, prepared)}

    def use_also(self, engine: Engine, prepared: PreparedSwitch) -> None:
        """Run the statements on *engine*'s connections too (an async engine's sync face)."""
        self._drivers[engine.dialect] = _Driver(engine, prepared)

    def first(self, conn: Connection, statement: Compiled, values: Mapping[str, Any]) -> Any:
        """The first row (a tuple) of a SELECT, or None."""
        return self._run(conn, statement, values, _first_row, lambda result: result.first())

    def all(self, conn: Connection, statement: Compiled, values: Mapping[str, Any]) -> list[Any]:
        """Every row of a SELECT (or of a RETURNING)."""
        return self._run(conn, statement, values, _all_rows, lambda result: list(result))

    def count(self, conn: Connection, statement: Compiled, values: Mapping[str, Any]) -> int:
        """The number of rows an INSERT, UPDATE or DELETE matched."""
        return int(self._run(conn, statement, values, _row_count, lambda result: result.rowcount))

    def _run(
        self,
        conn: Connection,
        statement: Compiled,
        values: Mapping[str, Any],
        from_cursor: Callable[[Any], T],
        from_result: Callable[[Any], T],
    ) -> T:
        driver = self._drivers.get(conn.dialect)
        if driver is None or "schema_translate_map" in conn.get_execution_options():
            return from_result(conn.execute(statement.statement, dict(values)))
        # The DBAPI connection: the driver's own for a sync engine, SQLAlchemy's adapter for an async one
        # (run through `AsyncConnection.run_sync`).
        dbapi_connection: Any = conn.connection.dbapi_connection
        if driver.psycopg:
            cursor = _cursor_of(conn, dbapi_connection)
            try:
                # Binary: no text escaping both ways (a bytea payload travels as it is).
                prepare = driver.prepared.prepares(conn)
                cursor.execute(statement.sql, statement.parameters(values), prepare=prepare, binary=True)
                return from_cursor(cursor)
            except driver.error as exc:
                raise _translated(conn, driver, statement, values, exc) from exc
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute(statement.sql, statement.parameters(values))
            return from_cursor(cursor)
        except driver.error as exc:
            raise _translated(conn, driver, statement, values, exc) from exc
        finally:
            cursor.close()


def _cursor_of(conn: Connection, dbapi_connection: Any) -> Any:
    """The psycopg cursor kept with *conn*'s pooled connection: a new cursor per statement costs
    ~6 µs of CPU (benchmarks/statement_paths.py). Kept beside the DBAPI connection it belongs to,
    so a connection the pool replaced never gets its predecessor's cursor."""
    info = conn.connection.info
    kept = info.get(_CURSOR)
    if kept is not None and kept[0] is dbapi_connection:
        return kept[1]
    cursor = dbapi_connection.cursor()
    info[_CURSOR] = (dbapi_connection, cursor)
    return cursor


def _translated(
    conn: Connection, driver: _Driver, statement: Compiled, values: Mapping[str, Any], error: Exception
) -> sa.exc.DBAPIError:
    """SQLAlchemy's error for a driver's, its connection invalidated if the dialect finds it dead."""
    dead = not conn.invalidated and (
        driver.dialect.is_disconnect(error, conn.connection.dbapi_connection, None)  # type: ignore[arg-type]
        or str(getattr(error, "sqlstate", None)).startswith(_CONNECTION_ENDED)
    )
    translated = sa.exc.DBAPIError.instance(
        statement.sql,
        dict(values),
        error,
        driver.error,
        hide_parameters=True,
        connection_invalidated=dead,
        dialect=driver.dialect,
    )
    assert isinstance(translated, sa.exc.DBAPIError)  # a DBAPI error is always one
    if dead:
        # As `Connection.execute` does: this connection is discarded, and so are the pool's older ones
        # at their next checkout (a restart or a failover ended them all: `_Driver.watch`).
        driver.dead_since = time.time()
        conn.invalidate(translated)
    return translated


def _first_row(cursor: Any) -> Any:
    return cursor.fetchone()


def _all_rows(cursor: Any) -> list[Any]:
    return list(cursor.fetchall())


def _row_count(cursor: Any) -> int:
    return int(cursor.rowcount)
