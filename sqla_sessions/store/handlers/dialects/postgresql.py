"""PostgreSQL: row locks never waited for past a bound, many rows written in one statement, GC by
physical address."""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql as pg
from sqlalchemy.engine import Connection

from ....config import SessionConfig
from ..statements import COLUMNS, WRITABLE, SessionStatements
from .base import Database

_TRANSIENT = ("40001", "40P01")  # serialization failure, deadlock detected
_LOCK_NOT_AVAILABLE = "55P03"


class PostgreSQL(Database):
    """PostgreSQL's row locks, `lock_timeout`, arrays (`unnest`) and `SKIP LOCKED`."""

    name = "postgresql"
    row_locks = True
    writes_in_batches = True

    def __init__(self, statements: SessionStatements, config: SessionConfig) -> None:
        super().__init__(statements, config)
        # A save alone skips a row another transaction holds: it then merges, waiting at most
        # `write_wait_seconds`; a touch is left to the holder, which writes the row anyway. (A row this
        # connection's own transaction holds, a blocking request's, is written.) Measured: +3 µs a
        # statement against the plain UPDATE.
        self.compare_and_set = statements.unless_locked(statements.compare_and_set)
        self.touch = statements.unless_locked(statements.touch)
        t = statements.table
        self._by_keys = sa.select(*statements.columns).where(
            t.c.key == sa.func.any(sa.bindparam("b_keys", type_=pg.ARRAY(t.c.key.type))),
            t.c.expires_at > statements.now,
        )
        self._merge_wait = sa.select(sa.func.set_config("lock_timeout", sa.bindparam("wait"), True))
        self._lock_bounds = sa.select(
            sa.func.set_config("lock_timeout", sa.bindparam("wait"), True),
            sa.func.set_config("idle_in_transaction_session_timeout", sa.bindparam("hold"), True),
        )
        # A regclass from text folds case unless quoted: quote_ident keeps "Sessions" its own table.
        self._size = sa.select(sa.func.pg_total_relation_size(sa.func.quote_ident(sa.literal(t.name))))
        self.insert_many = self._insert_many()
        self.update_many = self._compare_and_set_many(WRITABLE)
        self.touch_many = self._compare_and_set_many(("last_activity", "expires_at"))

    def select_by_keys(self, count: int) -> sa.Select[Any]:
        # One array parameter: one statement whatever the count (prepared once).
        return self._by_keys

    def keys_values(self, keys: list[str], now: int) -> dict[str, Any]:
        return {"b_keys": keys, "now": now}

    def gc(self, limit: int) -> sa.Delete:
        # The batch is found through the expiry index and locked (SKIP LOCKED: concurrent sweeps split
        # the work), then deleted by its rows' physical addresses (a TID scan), not looked up once more
        # each through the primary key: about a third less time per batch on a large table. A locked row
        # cannot move, so its ctid stays valid to the end of the statement.
        t = self.statements.table
        found = t.alias("expired")
        located: sa.Select[Any] = (
            sa.select(sa.literal_column("expired.ctid"))
            .where(found.c.expires_at <= self.statements.now)
            .order_by(found.c.expires_at)
            .limit(limit)
            .with_for_update(skip_locked=True)
        )
        ctid: sa.ColumnClause[Any] = sa.literal_column("ctid")  # the DELETE's own table's
        return sa.delete(t).where(ctid == sa.func.any(sa.func.array(located.scalar_subquery())))

    def table_bytes(self, conn: Connection) -> int | None:
        return int(conn.execute(self._size).scalar_one())

    def in_autocommit(self, conn: Connection) -> bool:
        dbapi_connection: Any = conn.connection.dbapi_connection
        return bool(getattr(dbapi_connection, "autocommit", False))  # psycopg's own flag

    def begin(self, conn: Connection) -> None:
        conn.exec_driver_sql("BEGIN")
        # The wait for the row's lock ends with the transaction's setting.
        conn.execute(self._merge_wait, {"wait": f"{int(self.config.write_wait_seconds * 1000)}ms"})

    def open_lock(self, conn: Connection, wait: float, hold: float) -> None:
        conn.exec_driver_sql("BEGIN")
        # Both die with the transaction: the wait and the hold are bounded by the database itself.
        conn.execute(self._lock_bounds, {"wait": f"{int(wait * 1000)}ms", "hold": f"{int(hold * 1000)}ms"})

    def is_transient_conflict(self, error: sa.exc.DBAPIError) -> bool:
        return getattr(error.orig, "sqlstate", None) in _TRANSIENT

    def is_lock_timeout(self, error: sa.exc.DBAPIError) -> bool:
        return getattr(error.orig, "sqlstate", None) == _LOCK_NOT_AVAILABLE

    def _arrays(self, names: tuple[str, ...]) -> list[Any]:
        """One array parameter per column (`v_<name>`), typed (an array of NULLs has no type of its own)."""
        t = self.statements.table
        return [sa.cast(sa.bindparam(f"v_{name}"), pg.ARRAY(t.c[name].type)) for name in names]

    def _insert_many(self) -> sa.Executable:
        """New rows in one statement. A key taken already (never, for 128 random bits) is skipped, not
        an error, and its request inserts alone, where the error is raised."""
        t = self.statements.table
        rows = sa.func.unnest(*self._arrays(COLUMNS)).table_valued(*COLUMNS).render_derived(name="v")
        return (
            pg.insert(t)
            .from_select(list(COLUMNS), sa.select(*(rows.c[name] for name in COLUMNS)))
            .on_conflict_do_nothing()
            .returning(t.c.key)
        )

    def _compare_and_set_many(self, written: tuple[str, ...]) -> sa.Executable:
        """Compare-and-set of the *written* columns of many rows in one statement (one round trip, one
        commit): the changes of a save (every column), or a touch (activity and expiry).

        The rows are locked first, in key order, skipping any another transaction holds (a blocking
        request's row lock, a merge): those stay unwritten and their saves go alone, waiting for the
        lock as a single save does; nothing here ever waits, so no batch deadlocks with another. The
        UPDATE checks the version again: under READ COMMITTED it re-reads a row changed since the
        statement began."""
        t = self.statements.table
        now = self.statements.now
        names = ("b_expected", "key", *written)
        expected = sa.cast(sa.bindparam("b_expected"), pg.ARRAY(sa.BigInteger))
        unnested = sa.func.unnest(expected, *self._arrays(names[1:])).table_valued(*names).render_derived(name="u")
        v = sa.select(*(unnested.c[name] for name in names)).cte("v")
        s = t.alias("s")
        locked = (
            sa.select(s.c.key)
            .join(v, s.c.key == v.c.key)
            .where(s.c.version == v.c.b_expected, s.c.expires_at > now)
            .order_by(s.c.key)
            .with_for_update(of=s, skip_locked=True)
            .cte("locked")
            .prefix_with("MATERIALIZED")
        )
        return (
            sa.update(t)
            .values({name: v.c[name] for name in written})
            .where(
                t.c.key == v.c.key,
                t.c.key.in_(sa.select(locked.c.key)),
                t.c.version == v.c.b_expected,
                t.c.expires_at > now,
            )
            .returning(t.c.key)
        )
