"""`prepared_statements="auto"`: the hot statements prepared until a pooler shows itself, then never again.

A pooler in transaction mode (PgBouncer before 1.21, or 1.21+ without `max_prepared_statements`)
hands each transaction to whichever server connection is free, so a statement prepared through one
client connection is missing on the next server ("prepared statement … does not exist", 26000), its
name is taken there by another client's ("… already exists", 42P05), or it names another client's
statement with other parameters (08P01 "bind message supplies 2 parameters, but prepared statement
… requires 5"). Worse, a name psycopg gave (`_pg3_0`, per client connection) can reach another
client's statement with the same parameters and run it, silently. So under "auto" an engine of ours
lets psycopg prepare nothing (`prepare_threshold=None`): only the hot statements of `handlers.libpq`
are prepared, under names derived from their SQL, the same statement on any server connection.
The port tells only when it is PgBouncer's 6432 (`engines.prepared_statements_on`): nothing is
prepared there. Everywhere else the first sign of a pooler (a statement this connection never
prepared already on the server, one missing right after it was prepared, a refusal of psycopg's on
an engine passed in) switches the engine to unnamed statements for good (on the connection that saw
it, every pooled one at its next checkout and every new one), says so once with a WARNING naming
the setting, and the statement is sent once more.

Why sending it once more is safe: each of these errors answers the Parse or Bind message, before
Execute, so the statement did not run. In autocommit (every statement but a blocking request's or a
merge's) nothing else happened either; a merge's transaction is rolled back whole by its caller
first, and is retried whole. A blocking request's transaction could not be: the error would abort
it, and its row lock and earlier saves with it (re-locking could not tell whether another request
wrote in between). So under "auto" it never carries a named statement: its connection sends unnamed
ones from its BEGIN to its end (`unprepared_while_held`; a parse per statement on a path that holds
a row lock for a whole request anyway). Explicit "on" detects nothing (the error is raised as it
is); "off" never prepares.
"""

from __future__ import annotations

import functools
import logging
import threading
import weakref
from collections.abc import Callable
from typing import Any, Concatenate, ParamSpec, TypeVar

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Dialect, Engine

from .libpq import NAMED, PreparedElsewhere, StatementFailed

logger = logging.getLogger("sqla_sessions")

P = ParamSpec("P")
T = TypeVar("T")
S = TypeVar("S")

#: SQLSTATEs of a prepared statement the server connection does not have, or has from someone else.
_MISSING_OR_TAKEN = ("26000", "42P05")
_PROTOCOL_VIOLATION = "08P01"
#: `Connection.info` key: the connection's psycopg threshold, kept while `unprepared_while_held`.
_THRESHOLD_WHILE_HELD = "sqla_sessions_prepare_threshold"


class _Switch:
    """One engine's prepared statements under "auto": on until the first refusal, then off for good."""

    __slots__ = ("lock", "off")

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.off = False

    def turn_off(self, engine: Engine, error: BaseException) -> None:
        with self.lock:
            if self.off:
                return
            self.off = True
            # Pool events, not engine events: an engine event would send every statement through
            # SQLAlchemy's slow path (`handlers.fastpath`). `recreate()` (after `dispose()`) keeps them.
            sa.event.listen(engine.pool, "connect", _unprepare_new)
            sa.event.listen(engine.pool, "checkout", _unprepare_checked_out)
        reason = str(getattr(error, "orig", error)).strip().splitlines()[0]
        logger.warning(
            "the database refused a prepared statement (%s): a pooler in transaction mode (PgBouncer < 1.21, or "
            "without max_prepared_statements) hands statements to other server connections; %s sends unnamed "
            'statements from now on. Set prepared_statements="off" (SQLA_SESSIONS_PREPARED_STATEMENTS=off) to '
            "start without them",
            reason,
            engine.url.render_as_string(hide_password=True),
        )


#: Engines (by dialect: an engine and its `execution_options()` copies share one, and keep it across
#: `dispose()`) whose prepared statements turn off at the first refusal.
_SWITCHES: weakref.WeakKeyDictionary[Dialect, _Switch] = weakref.WeakKeyDictionary()


def detect_refusals(engine: Engine, *, named_by_sql: bool = False) -> None:
    """Turn *engine*'s prepared statements off at the server's first refusal (`prepared_statements="auto"`).

    *named_by_sql*: the engine's psycopg prepares nothing by itself (`prepare_threshold=None`: its
    names, `_pg3_0`, `_pg3_1`…, are per client connection, so behind a pooler one client's name can
    reach another's statement with the same parameters and run it, silently), and only this
    library's own hot statements go prepared, under names derived from their SQL (`handlers.libpq`):
    the same name is the same statement on any server connection. Until the first refusal.

    Only psycopg 3 prepares statements by itself; other drivers are left alone."""
    if engine.dialect.driver != "psycopg":
        return
    switch = _SWITCHES.setdefault(engine.dialect, _Switch())
    if named_by_sql:

        def name_by_sql(_dbapi_connection: Any, record: Any) -> None:
            if not switch.off:
                record.info[NAMED] = True

        sa.event.listen(engine.pool, "connect", name_by_sql)


def refused(conn: Connection, error: BaseException) -> bool:
    """Whether *error* is a pooler's refusal of a prepared statement on an engine that detects them.

    If so the engine is switched to unnamed statements (once, with the warning) and so is *conn*'s
    own connection at once: the statement may be sent again, and goes unnamed."""
    switch = _SWITCHES.get(conn.dialect)
    if switch is None or not _is_refusal(error):
        return False
    switch.turn_off(conn.engine, error)
    if not conn.invalidated:
        _unprepare(conn.connection.driver_connection)
        conn.connection.info[NAMED] = False
    return True


def once_more_unprepared(
    primitive: Callable[Concatenate[S, Connection, P], T],
) -> Callable[Concatenate[S, Connection, P], T]:
    """Run a handler primitive (one statement in autocommit, or one transaction it rolls back on an
    error) once more when the server refused a prepared statement of it (see the module docstring).

    Inside a transaction left open nothing can be run again: the error is raised (a blocking request's
    transaction sends no named statement under "auto", see `unprepared_while_held`)."""

    @functools.wraps(primitive)
    def run(self: S, conn: Connection, /, *args: P.args, **kwargs: P.kwargs) -> T:
        try:
            return primitive(self, conn, *args, **kwargs)
        except sa.exc.DBAPIError as exc:
            if not refused(conn, exc) or not _idle(conn):
                raise
        return primitive(self, conn, *args, **kwargs)

    return run


def unprepared_while_held(conn: Connection) -> None:
    """Under "auto" (before any refusal), send unnamed statements on *conn* until `prepared_again`:
    a blocking request's transaction, which a refusal would abort beyond retrying."""
    switch = _SWITCHES.get(conn.dialect)
    if switch is None or switch.off:
        return
    driver: Any = conn.connection.driver_connection
    if driver.prepare_threshold is None:
        return
    conn.info[_THRESHOLD_WHILE_HELD] = driver.prepare_threshold
    driver.prepare_threshold = None


def prepared_again(conn: Connection) -> None:
    """End `unprepared_while_held` (unless the engine turned prepared statements off meanwhile)."""
    switch = _SWITCHES.get(conn.dialect)
    if switch is None or conn.invalidated:  # an invalidated connection is never used again
        return
    threshold = conn.info.pop(_THRESHOLD_WHILE_HELD, None)
    if threshold is not None and not switch.off:
        conn.connection.driver_connection.prepare_threshold = threshold  # type: ignore[union-attr]


def _idle(conn: Connection) -> bool:
    """Whether *conn* works and has no transaction open (psycopg's view of the server's)."""
    if conn.invalidated:
        return False
    info: Any = getattr(conn.connection.driver_connection, "info", None)
    if info is None or not hasattr(info, "transaction_status"):
        return False
    from psycopg import pq

    return bool(info.status == pq.ConnStatus.OK and info.transaction_status == pq.TransactionStatus.IDLE)


def _is_refusal(error: BaseException) -> bool:
    orig = error.orig if isinstance(error, sa.exc.DBAPIError) else error
    if isinstance(orig, StatementFailed):
        # Our own statements are named by a hash of their SQL: a name on any server is the same statement,
        # and a missing one may have been deallocated meanwhile (psycopg runs DEALLOCATE ALL after a
        # ROLLBACK). Only one missing right after it was prepared tells of a pooler.
        return isinstance(orig, PreparedElsewhere)
    sqlstate = getattr(orig, "sqlstate", None)
    if sqlstate in _MISSING_OR_TAKEN:
        return True
    return sqlstate == _PROTOCOL_VIOLATION and "prepared statement" in str(orig)


def _unprepare(driver_connection: Any) -> None:
    if getattr(driver_connection, "prepare_threshold", None) is not None:
        driver_connection.prepare_threshold = None  # psycopg: never prepare, never use what it prepared


def _unprepare_new(_dbapi_connection: Any, record: Any) -> None:
    _unprepare(record.driver_connection)
    record.info[NAMED] = False


def _unprepare_checked_out(_dbapi_connection: Any, record: Any, _proxy: Any) -> None:
    _unprepare(record.driver_connection)
    record.info[NAMED] = False
