"""`Database`: what every database does alike, and the questions each answers its own way."""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from ....config import SessionConfig
from ..statements import SessionStatements


class Database:
    """The default answers (SQLite's, and any database without row locks); subclasses override."""

    name = "sqlite"
    #: Whether a blocking request holds a row lock in a transaction (False: a lease it polls for).
    row_locks = False
    #: Whether many rows' writes go in one statement (`insert_many`, `update_many`, `touch_many`). Such a
    #: database's `compare_and_set` and `touch` must never wait for a row lock either: a batch of one
    #: runs them (PostgreSQL's skip a row another transaction holds).
    writes_in_batches = False

    def __init__(self, statements: SessionStatements, config: SessionConfig) -> None:
        self.statements = statements
        self.config = config
        #: The compare-and-set and touch a save runs alone.
        self.compare_and_set: sa.Update = statements.compare_and_set
        self.touch: sa.Update = statements.touch
        self.counts: sa.Select[Any] = statements.counts

    def select_by_keys(self, count: int) -> sa.Select[Any]:
        """The live rows of *count* keys, one statement."""
        return self.statements.select_by_keys(count)

    def keys_values(self, keys: list[str], now: int) -> dict[str, Any]:
        """The parameters of `select_by_keys(len(keys))`."""
        values: dict[str, Any] = {f"b_key_{i}": key for i, key in enumerate(keys)}
        values["now"] = now
        return values

    def gc(self, limit: int) -> sa.Delete:
        """Delete at most *limit* expired rows, oldest first, through the expiry index."""
        t = self.statements.table
        batch = sa.select(t.c.key).where(t.c.expires_at <= self.statements.now).order_by(t.c.expires_at).limit(limit)
        return sa.delete(t).where(t.c.key.in_(batch.scalar_subquery()))

    def table_bytes(self, conn: Connection) -> int | None:
        """The table's size on disk with its indexes, where the database tells."""
        name = self.statements.table.name
        try:  # SQLite's dbstat table exists only when compiled in
            size = conn.execute(
                sa.text("SELECT sum(pgsize) FROM dbstat WHERE name = :name OR name LIKE :indexes"),
                {"name": name, "indexes": f"%{name}%"},
            ).scalar()
        except sa.exc.OperationalError:
            return None
        return None if size is None else int(size)

    def in_autocommit(self, conn: Connection) -> bool:
        """Whether *conn*'s DBAPI connection is in autocommit (an engine passed in may open them so):
        sqlite3's `isolation_level` None, as SQLAlchemy sets it for "AUTOCOMMIT"."""
        dbapi_connection: Any = conn.connection.dbapi_connection
        return getattr(dbapi_connection, "isolation_level", "") is None

    def begin(self, conn: Connection) -> None:
        """Open a merge's transaction on an autocommit connection, its wait for the row's lock bounded.

        SQLite has no row locks: `BEGIN IMMEDIATE` takes the database write lock up front (waiting at
        most its busy timeout), so the read-modify-write cannot interleave with another writer."""
        if not getattr(conn.connection.driver_connection, "in_transaction", False):
            conn.exec_driver_sql("BEGIN IMMEDIATE")

    # -- blocking requests on a row lock (databases with `row_locks`) -------------------------------

    def may_lock(self, conn: Connection, values: dict[str, Any]) -> bool:
        """Whether to try the row lock for *values* (`b_key`, `b_id_hash`, `now`) at all."""
        return True

    def open_lock(self, conn: Connection, wait: float, hold: float) -> None:
        """Open a blocking request's transaction, its wait for the lock and its hold bounded."""
        raise NotImplementedError(f"{self.name} has no row locks: blocking requests lease the row")

    def end_lock(self, conn: Connection, *, commit: bool) -> None:
        """COMMIT or ROLLBACK a blocking request's transaction and reset what `open_lock` set."""
        conn.exec_driver_sql("COMMIT" if commit else "ROLLBACK")

    # -- errors ----------------------------------------------------------------------------------

    def is_transient_conflict(self, error: sa.exc.DBAPIError) -> bool:
        """A deadlock or serialization failure: the transaction was rolled back and may be retried."""
        return False

    def is_lock_timeout(self, error: sa.exc.DBAPIError) -> bool:
        """The database gave up waiting for a row lock."""
        return False

    # -- many rows in one statement (`writes_in_batches`) -----------------------------------------

    insert_many: sa.Executable | None = None
    update_many: sa.Executable | None = None
    touch_many: sa.Executable | None = None
