"""`prepared_statements="auto"`: the hot statements prepared until a pooler shows itself, then never again.

A pooler in transaction mode (PgBouncer before 1.21, or 1.21+ without `max_prepared_statements`)
hands each transaction to whichever server connection is free, so a statement prepared through one
client connection is missing on the next server ("prepared statement … does not exist", 26000), its
name is taken there by another client's ("… already exists", 42P05), or it names another client's
statement with other parameters (08P01 "bind message supplies 2 parameters, but prepared statement
… requires 5").

So under "auto" an engine of ours lets psycopg prepare only what it is asked to (`prepare=True`:
the hot statements of `handlers.runner`; its own threshold is out of reach), and nothing at all on
PgBouncer's port, 6432 (`engines.prepared_statements_on`). Everywhere else the first sign of a
pooler (any of the refusals above) switches the engine to unnamed statements for good (every
connection, at once), says so once with a WARNING naming the setting, and the statement is sent once
more. An engine passed in keeps psycopg's own threshold, and is switched off the same way.

Why sending it once more is safe: each of these errors answers the Parse or Bind message, before
Execute, so the statement did not run. In autocommit (every statement but a blocking request's or a
merge's) nothing else happened either; a merge's transaction is rolled back whole by its caller
first, and is retried whole. A blocking request's transaction could not be: the error would abort
it, and its row lock and earlier saves with it (re-locking could not tell whether another request
wrote in between). So under "auto" it never carries a named statement: its connection sends unnamed
ones from its BEGIN to its end (`unprepared_while_held`; a parse per statement on a path that holds
a row lock for a whole request anyway). Explicit "on" detects nothing (the error is raised as it
is); "off" never prepares.

The names are psycopg's (`_pg3_0`, `_pg3_1`… per client connection): behind a pooler that passes
prepared statements on unchecked, one client's name could reach another client's statement with the
same parameter types. The refusals above make that rare for this library's own statements (their
parameter lists differ), not impossible for another application's: behind such a pooler, set
`prepared_statements="off"` (the README's PgBouncer section says so).
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

logger = logging.getLogger(__name__)

P = ParamSpec("P")
T = TypeVar("T")
S = TypeVar("S")

#: SQLSTATEs of a prepared statement the server connection does not have, or has from someone else.
_MISSING_OR_TAKEN = ("26000", "42P05")
_PROTOCOL_VIOLATION = "08P01"
#: `Connection.info` key, while a blocking request's transaction is open: the connection's psycopg
#: threshold to go back to (None: it had none).
_HELD = "sqla_sessions_unprepared_while_held"


class PreparedSwitch:
    """One engine's prepared statements: on (unless *named* is False) until the first refusal under "auto"."""

    __slots__ = ("detects", "lock", "named", "off")

    def __init__(self, *, named: bool, detects: bool) -> None:
        self.named = named
        self.detects = detects
        self.lock = threading.Lock()
        self.off = False

    def prepares(self, info: dict[Any, Any]) -> bool:
        """Whether a hot statement goes prepared now on the pooled connection whose `info` this is."""
        return self.named and not self.off and _HELD not in info

    def turn_off(self, engine: Engine, error: BaseException) -> None:
        with self.lock:
            if self.off:
                return
            self.off = True
            # Pool events (`recreate()`, after `dispose()`, keeps them): psycopg's own threshold too.
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


#: Switches by dialect: an engine and its `execution_options()` copies share one, and keep it across
#: `dispose()`; an async engine made from the same URL has a pool, and a switch, of its own.
_SWITCHES: weakref.WeakKeyDictionary[Dialect, PreparedSwitch] = weakref.WeakKeyDictionary()


def switch_for(engine: Engine, *, named: bool, detects: bool) -> PreparedSwitch:
    """The switch of *engine* (made on first use). *named*: the hot statements go prepared (psycopg 3's
    sync driver only); *detects*: the first refusal turns them, and psycopg's own, off ("auto")."""
    named = named and engine.dialect.driver == "psycopg"
    detects = detects and engine.dialect.driver in ("psycopg", "psycopg_async")
    switch = _SWITCHES.get(engine.dialect)
    if switch is None:
        switch = _SWITCHES.setdefault(engine.dialect, PreparedSwitch(named=named, detects=detects))
    return switch


def refused(conn: Connection, error: BaseException) -> bool:
    """Whether *error* is a pooler's refusal of a prepared statement on an engine that detects them.

    If so the engine is switched to unnamed statements (once, with the warning) and so is *conn*'s
    own connection at once: the statement may be sent again, and goes unnamed."""
    switch = _SWITCHES.get(conn.dialect)
    if switch is None or not switch.detects or not _is_refusal(error):
        return False
    switch.turn_off(conn.engine, error)
    if not conn.invalidated:
        _unprepare(conn.connection.driver_connection)
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
    if switch is None or not switch.detects or switch.off:
        return
    driver: Any = conn.connection.driver_connection
    conn.info[_HELD] = driver.prepare_threshold
    driver.prepare_threshold = None


def prepared_again(conn: Connection) -> None:
    """End `unprepared_while_held` (unless the engine turned prepared statements off meanwhile)."""
    if conn.invalidated or _HELD not in conn.info:  # an invalidated connection is never used again
        return
    threshold = conn.info.pop(_HELD)
    switch = _SWITCHES.get(conn.dialect)
    if switch is not None and not switch.off:
        conn.connection.driver_connection.prepare_threshold = threshold  # type: ignore[union-attr]


def _idle(conn: Connection) -> bool:
    """Whether *conn* works and has no transaction open on the server (psycopg's view of it)."""
    if conn.invalidated:
        return False
    info: Any = getattr(conn.connection.driver_connection, "info", None)
    if info is None or not hasattr(info, "transaction_status"):
        return False
    from psycopg import pq

    return bool(info.status == pq.ConnStatus.OK and info.transaction_status == pq.TransactionStatus.IDLE)


def _is_refusal(error: BaseException) -> bool:
    orig = error.orig if isinstance(error, sa.exc.DBAPIError) else error
    # A protocol violation answers a Bind that does not fit the statement the name reached ("bind
    # message supplies 2 parameters…", "insufficient data left in message"): before Execute, so
    # nothing ran, and the connection is in good order.
    return getattr(orig, "sqlstate", None) in (*_MISSING_OR_TAKEN, _PROTOCOL_VIOLATION)


def _unprepare(driver_connection: Any) -> None:
    if getattr(driver_connection, "prepare_threshold", None) is not None:
        driver_connection.prepare_threshold = None  # psycopg: never prepare by itself again


def _unprepare_new(_dbapi_connection: Any, record: Any) -> None:
    _unprepare(record.driver_connection)


def _unprepare_checked_out(_dbapi_connection: Any, record: Any, _proxy: Any) -> None:
    _unprepare(record.driver_connection)
