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

import threading
import time
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Dialect, Engine
from sqlalchemy.pool import StaticPool
from sqlalchemy.sql.expression import Executable

from .prepared import PreparedSwitch

try:
    from psycopg import ClientCursor
    from psycopg.pq import TransactionStatus
except ImportError:  # pragma: no cover - psycopg finds no libpq (neither the system's nor psycopg[binary]'s)
    ClientCursor = TransactionStatus = None  # type: ignore[assignment,misc]

T = TypeVar("T")

#: Connection record `info` key: the psycopg cursor the hot statements run on, with its DBAPI connection.
_CURSOR = "sqla_sessions_cursor"
#: Connection record `info` key: when the connection was opened (unix time).
_OPENED = "sqla_sessions_opened"

#: SQLSTATEs of a connection the server ended (class 08 but 08P01, a protocol violation such as a
#: refused Bind, which leaves the connection in good order; and operator intervention:
#: `pg_terminate_backend`, a shutdown). The error may arrive before the driver has read the end of
#: the connection, so the dialect does not see it dead yet; the next statement on it would fail again.
_OPERATOR_ENDED = ("57P01", "57P02", "57P03")

#: "cached plan must not change result type": a prepared statement's table changed under it.
_STALE_PLAN = "0A000"

Names = tuple[str, ...] | None


class Compiled:
    """One statement compiled for one dialect (and, on demand, for another engine's: an async engine of
    another driver): its SQL, and its parameters' order if positional."""

    __slots__ = ("_dialect", "_elsewhere", "names", "sql", "statement")

    def __init__(self, statement: Executable, engine: Engine) -> None:
        self.statement = statement
        self._dialect = engine.dialect
        self.sql, self.names = _compiled(statement, engine.dialect)
        self._elsewhere: dict[Dialect, tuple[str, Names]] = {}

    def for_dialect(self, dialect: Dialect) -> tuple[str, Names]:
        """The SQL and parameter order for *dialect*."""
        if dialect is self._dialect:
            return self.sql, self.names
        found = self._elsewhere.get(dialect)
        if found is None:
            found = self._elsewhere.setdefault(dialect, _compiled(self.statement, dialect))
        return found


def _compiled(statement: Executable, dialect: Dialect) -> tuple[str, Names]:
    compiled = statement.compile(dialect=dialect)  # type: ignore[attr-defined]
    return compiled.string, (tuple(compiled.positiontup) if compiled.positional else None)


def _parameters(values: Mapping[str, Any], names: Names) -> Any:
    return values if names is None else tuple(values[name] for name in names)


class _Driver:
    """How statements go to one engine's DBAPI connections."""

    __slots__ = ("dead_since", "dialect", "engine", "error", "keeps_cursor", "listeners", "lock", "prepared", "psycopg")

    def __init__(self, engine: Engine, prepared: PreparedSwitch) -> None:
        self.engine = engine
        self.dialect = dialect = engine.dialect
        self.error: type[Exception] = dialect.loaded_dbapi.Error
        # psycopg's sync driver: `prepare` and `binary` are its options (its async one, through
        # SQLAlchemy's adapter, takes neither).
        self.psycopg = dialect.driver == "psycopg" and not dialect.is_async
        # One cursor per connection, unless threads share a connection (StaticPool): then one each call.
        self.keeps_cursor = self.psycopg and not isinstance(engine.pool, StaticPool)
        self.prepared = prepared
        self.dead_since = 0.0  # when a connection was last found ended by the server (unix time)
        self.lock = threading.Lock()
        self.listeners = self._watch(engine)

    def _watch(self, engine: Engine) -> list[tuple[str, Callable[..., None]]]:
        """Note when each pooled connection opens; once one is found ended by the server
        (`found_dead`), replace at checkout each opened before it: the pool's own events, raising
        `DisconnectionError` (SQLAlchemy's documented way to have the pool connect afresh). The
        checkout listener is added then, not before: until a connection dies it would cost every
        checkout a call."""

        def opened(_dbapi_connection: Any, record: Any) -> None:
            record.info[_OPENED] = time.time()

        listeners: list[tuple[str, Callable[..., None]]] = [("connect", opened)]
        sa.event.listen(engine, "connect", opened)
        return listeners

    def found_dead(self) -> None:
        """A connection was found ended by the server: the pool's older ones are replaced at checkout."""
        with self.lock:
            self.dead_since = time.time()
            if any(name == "checkout" for name, _ in self.listeners):
                return

            def checked_out(_dbapi_connection: Any, record: Any, _proxy: Any) -> None:
                if record.info.get(_OPENED, 0.0) < self.dead_since:
                    raise sa.exc.DisconnectionError("opened before the server ended another connection")

            sa.event.listen(self.engine, "checkout", checked_out)
            self.listeners.append(("checkout", checked_out))

    def close(self) -> None:
        with self.lock:
            for name, listener in self.listeners:
                if sa.event.contains(self.engine, name, listener):
                    sa.event.remove(self.engine, name, listener)
            self.listeners.clear()


class Runner:
    """Runs `Compiled` statements on the connections of one engine, and of the async engine an
    `AsyncSessionStore` runs the handler on (its connections through `run_sync`)."""

    def __init__(self, engine: Engine, prepared: PreparedSwitch) -> None:
        self._drivers = {engine.dialect: _Driver(engine, prepared)}

    def use_also(self, engine: Engine, prepared: PreparedSwitch) -> None:
        """Run the statements on *engine*'s connections too (an async engine's sync face)."""
        self._drivers[engine.dialect] = _Driver(engine, prepared)

    def close(self) -> None:
        """Remove what the runner attached to its engines' pools (the engines stay the caller's)."""
        for driver in self._drivers.values():
            driver.close()

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
        sql, names = statement.for_dialect(driver.dialect)
        # The DBAPI connection: the driver's own for a sync engine, SQLAlchemy's adapter for an async one
        # (run through `AsyncConnection.run_sync`).
        pooled = conn.connection
        dbapi_connection: Any = pooled.dbapi_connection
        if driver.psycopg:
            info = pooled.info
            cursor, binds_on_server = _psycopg_cursor(info, dbapi_connection, keep=driver.keeps_cursor)
            prepare = binds_on_server and driver.prepared.prepares(info)
            try:
                if binds_on_server:
                    # Binary: no text escaping both ways (a bytea payload travels as it is).
                    try:
                        cursor.execute(sql, _parameters(values, names), prepare=prepare, binary=True)
                    except driver.error as exc:
                        if not (prepare and _stale(exc, dbapi_connection)):
                            raise
                        # The table changed under the prepared statement (a migration): it did not run.
                        # Unnamed this once; the connection, whose statements are all stale, is
                        # replaced when it goes back to the pool.
                        pooled.invalidate(soft=True)
                        cursor.execute(sql, _parameters(values, names), prepare=False, binary=True)
                else:  # a `ClientCursor` factory (some PgBouncer setups): psycopg binds on the client
                    cursor.execute(sql, _parameters(values, names))
                return from_cursor(cursor)
            except driver.error as exc:
                raise _translated(conn, driver, sql, values, exc) from exc
            finally:
                if not driver.keeps_cursor:
                    cursor.close()
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute(sql, _parameters(values, names))
            return from_cursor(cursor)
        except driver.error as exc:
            raise _translated(conn, driver, sql, values, exc) from exc
        finally:
            cursor.close()


def _stale(error: Exception, dbapi_connection: Any) -> bool:
    """Whether *error* is PostgreSQL's refusal of a prepared statement whose table changed since it
    was prepared ("cached plan must not change result type"), on an idle connection: the statement
    did not run, and may be sent again."""
    if getattr(error, "sqlstate", None) != _STALE_PLAN:
        return False
    return bool(dbapi_connection.info.transaction_status == TransactionStatus.IDLE)


def _psycopg_cursor(info: dict[Any, Any], dbapi_connection: Any, *, keep: bool) -> tuple[Any, bool]:
    """A psycopg cursor for the hot statements, and whether it binds on the server (not a
    `ClientCursor`). Kept with the pooled connection when *keep* (a new cursor per statement costs
    ~6 µs of CPU: benchmarks/statement_paths.py), beside the DBAPI connection it belongs to, so a
    connection the pool replaced never gets its predecessor's cursor. (psycopg types an integer by
    its size: behind a pooler, another client's statement of the same SQL may have been prepared
    with wider types, which the server refuses at Bind, 08P01: `handlers.prepared` then turns
    prepared statements off.)"""
    kept = info.get(_CURSOR) if keep else None
    if kept is not None and kept[0] is dbapi_connection:
        return kept[1], kept[2]
    cursor = dbapi_connection.cursor()
    binds_on_server = not isinstance(cursor, ClientCursor)
    if keep:
        info[_CURSOR] = (dbapi_connection, cursor, binds_on_server)
    return cursor, binds_on_server


def _translated(
    conn: Connection, driver: _Driver, sql: str, values: Mapping[str, Any], error: Exception
) -> sa.exc.DBAPIError:
    """SQLAlchemy's error for a driver's, its connection invalidated if the dialect finds it dead.

    SQLAlchemy's `handle_error` listeners are not called for these statements (they take an
    execution context only `Connection.execute` builds): a listener that decides what counts as a
    disconnect sees the other statements only."""
    sqlstate = str(getattr(error, "sqlstate", None))
    dead = not conn.invalidated and (
        driver.dialect.is_disconnect(error, conn.connection.dbapi_connection, None)  # type: ignore[arg-type]
        or (sqlstate.startswith("08") and sqlstate != "08P01")
        or sqlstate in _OPERATOR_ENDED
    )
    translated = sa.exc.DBAPIError.instance(
        sql,
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
        # at their next checkout (a restart or a failover ended them all: `_Driver._watch`).
        driver.found_dead()
        conn.invalidate(translated)
    return translated


def _first_row(cursor: Any) -> Any:
    return cursor.fetchone()


def _all_rows(cursor: Any) -> list[Any]:
    return list(cursor.fetchall())


def _row_count(cursor: Any) -> int:
    return int(cursor.rowcount)
