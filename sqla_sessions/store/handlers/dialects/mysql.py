"""MySQL and MariaDB (InnoDB): row locks, waits bounded per connection, GC by `DELETE … LIMIT`."""

from __future__ import annotations

from contextlib import suppress
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from ....config import SessionConfig
from ..engines import mysql_lock_wait_seconds
from ..statements import SessionStatements
from .base import Database

_DEADLOCK = 1213  # ER_LOCK_DEADLOCK
_LOCK_WAIT_TIMEOUTS = (1205, 3572)  # ER_LOCK_WAIT_TIMEOUT, ER_LOCK_NOWAIT

#: The session variable that bounds a blocking request's hold, on MariaDB (True) and MySQL.
_HOLD_VARIABLE = {True: "idle_transaction_timeout", False: "wait_timeout"}
#: A blocking request's bounds, set on its connection; and what they go back to after it: the
#: engine's own lock wait (an engine of ours), or the server's (an engine passed in).
_BOUND = {
    "idle_transaction_timeout": sa.text(
        "SET SESSION innodb_lock_wait_timeout = :wait, idle_transaction_timeout = :hold"
    ),
    "wait_timeout": sa.text("SET SESSION innodb_lock_wait_timeout = :wait, wait_timeout = :hold"),
}
_RESET_TO_OURS = {
    "idle_transaction_timeout": sa.text(
        "SET SESSION innodb_lock_wait_timeout = :wait, idle_transaction_timeout = DEFAULT"
    ),
    "wait_timeout": sa.text("SET SESSION innodb_lock_wait_timeout = :wait, wait_timeout = DEFAULT"),
}
_RESET_TO_SERVERS = {
    "idle_transaction_timeout": sa.text(
        "SET SESSION innodb_lock_wait_timeout = DEFAULT, idle_transaction_timeout = DEFAULT"
    ),
    "wait_timeout": sa.text("SET SESSION innodb_lock_wait_timeout = DEFAULT, wait_timeout = DEFAULT"),
}


class MySQL(Database):
    """InnoDB's row locks; its lock wait is a session variable (`innodb_lock_wait_timeout`, whole
    seconds), set for every connection when it opens (`engines.engine_options`)."""

    name = "mysql"
    row_locks = True

    def __init__(self, statements: SessionStatements, config: SessionConfig, *, owns_engine: bool) -> None:
        super().__init__(statements, config)
        t = statements.table
        live = t.c.expires_at > statements.now
        self.counts = sa.select(  # no FILTER clause here
            sa.func.coalesce(sa.func.sum(sa.case((live, 1), else_=0)), 0),
            sa.func.coalesce(sa.func.sum(sa.case((live, 0), else_=1)), 0),
            sa.func.count(sa.distinct(sa.case((live, t.c.user_id)))),
        )
        self._size = sa.text(
            "SELECT data_length + index_length FROM information_schema.tables "
            "WHERE table_schema = DATABASE() AND table_name = :name"
        )
        # A blocking request's bounds, and what its connection goes back to: the wait its engine set
        # when it opened, or the server's own for an engine passed in. The hold's variable: MariaDB ends
        # a connection idle in a transaction past `idle_transaction_timeout`; MySQL has no such
        # variable, but ends any connection idle past `wait_timeout`: set for this connection only while
        # it holds the lock, it bounds the hold the same way (the server closes the connection, which
        # rolls back and releases the lock). Either way a crashed holder's lock cannot go stale.
        reset = _RESET_TO_OURS if owns_engine else _RESET_TO_SERVERS
        self._bounds = {mariadb: (_BOUND[hold], reset[hold]) for mariadb, hold in _HOLD_VARIABLE.items()}
        self._write_wait = mysql_lock_wait_seconds(config)

    def gc(self, limit: int) -> sa.Delete:
        # MySQL/MariaDB refuse LIMIT in an IN (subquery), but have DELETE … LIMIT on the index range.
        t = self.statements.table
        return sa.delete(t).where(t.c.expires_at <= self.statements.now).with_dialect_options(mysql_limit=limit)

    def table_bytes(self, conn: Connection) -> int | None:
        size = conn.execute(self._size, {"name": self.statements.table.name}).scalar()
        return None if size is None else int(size)

    def in_autocommit(self, conn: Connection) -> bool:
        dbapi_connection: Any = conn.connection.dbapi_connection
        get_autocommit = getattr(dbapi_connection, "get_autocommit", None)  # pymysql's own
        return bool(get_autocommit()) if get_autocommit is not None else False

    def begin(self, conn: Connection) -> None:
        conn.exec_driver_sql("BEGIN")

    def may_lock(self, conn: Connection, values: dict[str, Any]) -> bool:
        # InnoDB locks the primary-key record before it checks the rest of the WHERE clause: a known
        # key with a wrong secret would wait for (and then hold) the owner's lock. A plain read first.
        return conn.execute(self.statements.exists_opened, values).first() is not None

    def open_lock(self, conn: Connection, wait: float, hold: float) -> None:
        bound, _ = self._bounds[_is_mariadb(conn)]
        conn.execute(bound, {"wait": max(1, round(wait)), "hold": max(1, round(hold))})
        conn.exec_driver_sql("BEGIN")

    def end_lock(self, conn: Connection, *, commit: bool) -> None:
        try:
            super().end_lock(conn, commit=commit)
        finally:
            # A connection the server ended (the hold outlived its bound) is discarded by the pool: there
            # is nothing to reset, and trying would hide why the transaction ended.
            if not conn.invalidated:
                _, reset = self._bounds[_is_mariadb(conn)]
                with suppress(sa.exc.DBAPIError):
                    conn.execute(reset, {"wait": self._write_wait})

    def is_transient_conflict(self, error: sa.exc.DBAPIError) -> bool:
        # InnoDB can pick a single-row UPDATE as a deadlock victim when many writers contend for one
        # row (secondary-index locks).
        return _errno(error) == _DEADLOCK

    def is_lock_timeout(self, error: sa.exc.DBAPIError) -> bool:
        return _errno(error) in _LOCK_WAIT_TIMEOUTS


def _is_mariadb(conn: Connection) -> bool:
    return bool(getattr(conn.dialect, "is_mariadb", False))


def _errno(error: sa.exc.DBAPIError) -> int | None:
    args: tuple[Any, ...] = getattr(error.orig, "args", ())
    return args[0] if args and isinstance(args[0], int) else None
