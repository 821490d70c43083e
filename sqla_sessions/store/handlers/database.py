"""`DatabaseHandler`: sessions in a SQL table through SQLAlchemy Core (PostgreSQL, MariaDB/MySQL, SQLite).

Every statement is built once, with bound parameters (`handlers.statements`, and what differs per
database in `handlers.dialects`). Connections run in autocommit: a read is one SELECT and one round
trip, an uncontended save is one compare-and-set UPDATE, each sent on the driver's cursor
(`handlers.runner`). Only a conflicting save opens an explicit transaction, locks the row
(`SELECT … FOR UPDATE`; on SQLite `BEGIN IMMEDIATE`), merges this save's keys onto what is stored
now and commits.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from ...config import DEFAULT_DATABASE_URL, SessionConfig
from ...core.records import Record, StoreStats
from ...errors import LockTimeout
from ..schema import sessions_table
from .base import LockStrategy
from .checks import check_table
from .dialects import database_for
from .engines import create_session_engine
from .prepared import once_more_unprepared, refused, switch_for
from .runner import Compiled, Runner
from .statements import COLUMNS, WRITABLE, SessionStatements, record_of, row_values, write_values
from .transactions import InTransactions

logger = logging.getLogger(__name__)


class DatabaseHandler(InTransactions):
    """Sessions stored in the `config.table` table of a SQLAlchemy database."""

    def __init__(
        self,
        engine_or_url: Engine | str | None = None,
        config: SessionConfig | None = None,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        config = config or SessionConfig()
        super().__init__(config, clock=clock)
        if isinstance(engine_or_url, Engine):
            self.engine = engine_or_url
            self._owns_engine = False
        else:
            url = engine_or_url or config.database_url
            if url == DEFAULT_DATABASE_URL:
                # Said once per handler, at startup: a deployment that forgot its URL otherwise writes
                # to a file nobody backs up, or answers every request with "table not found".
                logger.warning(
                    "no database configured: sessions are stored in %s (in %s); set SQLA_SESSIONS_DATABASE_URL "
                    "or SessionConfig(database_url=...)",
                    url,
                    os.getcwd(),
                )
            self.engine = create_session_engine(url, autocommit=True, config=config)
            self._owns_engine = True
        # Single statements run in autocommit: one round trip each. An engine passed in is switched per
        # checkout (correct, a little slower) unless its connections are in autocommit already: asked
        # of its first connection (`_autocommit_engine`).
        self._autocommit: Engine | None = self.engine if self._owns_engine else None
        # Prepared unless "off": psycopg then prepares what it is asked to unless its threshold is None
        # (an engine of ours on PgBouncer's port, or an engine passed in set so: `handlers.prepared`).
        setting = config.prepared_statements
        self.prepared = switch_for(self.engine, named=setting != "off", detects=setting == "auto")
        self.runner = Runner(self.engine, self.prepared)
        self.table = sessions_table(config.table)
        self.statements = statements = SessionStatements(self.table)
        self.database = database = database_for(self.engine, statements, config, owns_engine=self._owns_engine)
        self.lock_strategy = LockStrategy.ROW if database.row_locks else LockStrategy.LEASE
        compiled = {
            name: Compiled(statement, self.engine)
            for name, statement in (
                ("by_key", statements.select_by_key),
                ("insert", statements.insert),
                ("compare_and_set", database.compare_and_set),
                ("touch", database.touch),
            )
        }
        self._by_key, self._insert_one = compiled["by_key"], compiled["insert"]
        self._compare_and_set, self._touch_one = compiled["compare_and_set"], compiled["touch"]
        self._by_keys: dict[int, Compiled] = {}
        self._many = {
            name: Compiled(statement, self.engine)
            for name, statement in (
                ("insert", database.insert_many),
                ("update", database.update_many),
                ("touch", database.touch_many),
            )
            if statement is not None
        }
        # Concurrent threads' loads share one SELECT on every database; their saves one UPDATE where
        # that is one statement (PostgreSQL), not a string of them on one connection.
        self._writes_batch = config.batch_requests and database.writes_in_batches
        self.batch_concurrent_calls(loads=config.batch_requests, saves=self._writes_batch)

    @property
    def batches_writes(self) -> bool:
        """Whether `_update_many` writes many rows in one statement (PostgreSQL), so concurrent saves
        are worth batching (`sqla_sessions.store.batching`)."""
        return self._writes_batch

    def check(self) -> None:
        """Make sure the database answers and holds the sessions table at this version's schema.

        Raises `StoreMisconfigured` with one line saying what to fix (the table is missing or older
        than this version: run `sqla-sessions migrate`; the database, role or password is refused),
        or `StoreUnavailable` when the server cannot be reached. Call it at startup (or set
        `check_on_startup`) to fail once, clearly, instead of on every request.
        """
        check_table(self.connect, self.table, self.engine.url)

    def close(self) -> None:
        """Dispose of the engine if this handler created it."""
        self.runner.close()
        if self._owns_engine:
            self.engine.dispose()

    @contextmanager
    def connect(self) -> Iterator[Connection]:
        engine = self._autocommit or self._autocommit_engine()
        try:
            with engine.connect() as conn:
                yield conn
        except sa.exc.StatementError as exc:
            # Bound values are session payloads and secrets' hashes: never in a message or a log line,
            # also on an engine passed in without `hide_parameters=True`.
            exc.hide_parameters = True
            raise

    def _autocommit_engine(self) -> Engine:
        """The engine passed in, as is if its connections open in autocommit (`create_engine(…,
        isolation_level="AUTOCOMMIT")`), else switched to it per checkout."""
        engine = self.engine
        if engine.get_execution_options().get("isolation_level") != "AUTOCOMMIT":
            with engine.connect() as conn:
                if not self.database.in_autocommit(conn):
                    engine = engine.execution_options(isolation_level="AUTOCOMMIT")
        self._autocommit = engine
        return engine

    # -- reads -----------------------------------------------------------------------------------

    @once_more_unprepared
    def _fetch(self, conn: Connection, key: str, now: int) -> Record | None:
        row = self.runner.first(conn, self._by_key, {"b_key": key, "now": now})
        return None if row is None else record_of(row)

    @once_more_unprepared
    def _fetch_many(self, conn: Connection, keys: list[str], now: int) -> dict[str, Record]:
        statement = self._by_keys.get(len(keys))
        if statement is None:
            statement = Compiled(self.database.select_by_keys(len(keys)), self.engine)
            if len(self._by_keys) < 256:  # a count per batch size: bounded by the batches' size
                self._by_keys[len(keys)] = statement
        rows = self.runner.all(conn, statement, self.database.keys_values(keys, now))
        return {record.key: record for record in map(record_of, rows)}

    @once_more_unprepared
    def _fetch_user(self, conn: Connection, user_id: str, now: int) -> list[Record]:
        return [record_of(row) for row in conn.execute(self.statements.select_user, {"b_user_id": user_id, "now": now})]

    @once_more_unprepared
    def _stats(self, conn: Connection, now: int) -> StoreStats:
        row = conn.execute(self.database.counts, {"now": now}).one()
        return StoreStats(int(row[0]), int(row[1]), int(row[2]), self.database.table_bytes(conn))

    # -- writes ----------------------------------------------------------------------------------

    @once_more_unprepared
    def _insert(self, conn: Connection, record: Record) -> None:
        self.runner.count(conn, self._insert_one, row_values(record))

    @once_more_unprepared
    def _update(self, conn: Connection, record: Record, *, expected_version: int, now: int) -> bool:
        values = write_values(record)
        values["b_version"] = expected_version
        values["now"] = now
        try:
            return self.runner.count(conn, self._compare_and_set, values) == 1
        except sa.exc.DBAPIError as exc:
            if self.database.is_transient_conflict(exc):
                return False  # a deadlock victim is a lost race like any other: merge under the lock
            if self.database.is_lock_timeout(exc):
                raise LockTimeout(self.config.write_wait_seconds) from None
            raise

    @once_more_unprepared
    def _touch(
        self, conn: Connection, key: str, *, version: int, last_activity: int, expires_at: int, now: int
    ) -> bool:
        values = {"b_key": key, "b_version": version, "now": now, "v_last_activity": last_activity}
        values["v_expires_at"] = expires_at
        return self.runner.count(conn, self._touch_one, values) == 1

    @once_more_unprepared
    def _delete(self, conn: Connection, key: str) -> bool:
        return conn.execute(self.statements.delete, {"b_key": key}).rowcount > 0

    @once_more_unprepared
    def _delete_expired(self, conn: Connection, now: int, limit: int) -> int:
        return conn.execute(self.database.gc(limit), {"now": now}).rowcount

    @once_more_unprepared
    def _delete_user(self, conn: Connection, user_id: str, except_key: str | None) -> int:
        if except_key is None:
            return conn.execute(self.statements.delete_user, {"b_user_id": user_id}).rowcount
        values = {"b_user_id": user_id, "b_key": except_key}
        return conn.execute(self.statements.delete_user_except, values).rowcount

    # -- many rows at once (a batch of concurrent requests' saves; never waits for a lock) ----------

    def _insert_many(self, conn: Connection, records: list[Record]) -> set[str]:
        if not self._writes_batch:
            return set()
        if len(records) == 1:  # a new key waits for nothing: a plain INSERT
            with _refusal_writes_nothing(conn):
                self.runner.count(conn, self._insert_one, row_values(records[0]))
                return {records[0].key}
            return set()
        values = {f"v_{name}": [getattr(record, name) for record in records] for name in COLUMNS}
        return self._keys_written(conn, self._many["insert"], values)

    def _update_many(self, conn: Connection, writes: list[tuple[Record, int]], now: int) -> set[str]:
        if not self._writes_batch:
            return set()  # one `_update` per row could wait for a lock: each saves alone instead
        if len(writes) == 1:
            record, expected = writes[0]
            values = write_values(record)
            values["b_version"] = expected
            values["now"] = now
            return self._one_unless_locked(conn, self._compare_and_set, values)
        return self._keys_written(conn, self._many["update"], _arrays(writes, WRITABLE, now))

    def _touch_many(self, conn: Connection, touches: list[tuple[Record, int]], now: int) -> set[str]:
        if not self._writes_batch:
            return set()
        if len(touches) == 1:
            record, version = touches[0]
            values = {"b_key": record.key, "b_version": version, "now": now}
            values.update(v_last_activity=record.last_activity, v_expires_at=record.expires_at)
            return self._one_unless_locked(conn, self._touch_one, values)
        return self._keys_written(conn, self._many["touch"], _arrays(touches, ("last_activity", "expires_at"), now))

    def _keys_written(self, conn: Connection, statement: Compiled, values: dict[str, Any]) -> set[str]:
        """Run a statement that writes many rows and returns their keys. Refused as a whole (one value
        the server rejects), it wrote nothing (one statement, autocommit): each request saves alone,
        where its own error is raised."""
        with _refusal_writes_nothing(conn):
            return {row[0] for row in self.runner.all(conn, statement, values)}
        return set()

    def _one_unless_locked(self, conn: Connection, statement: Compiled, values: dict[str, Any]) -> set[str]:
        """A batch of one: the row's key if the statement wrote it."""
        with _refusal_writes_nothing(conn):
            return {values["b_key"]} if self.runner.count(conn, statement, values) == 1 else set()
        return set()


@contextmanager
def _refusal_writes_nothing(conn: Connection) -> Iterator[None]:
    """Swallow the database's refusal of one autocommit statement (it wrote nothing: the request
    saves alone, where its error is raised); let a broken connection's error through, since the
    server may have committed before the reply was lost, and nothing may then be written again."""
    try:
        yield
    except sa.exc.DBAPIError as exc:
        if exc.connection_invalidated or conn.invalidated:
            raise
        refused(conn, exc)  # a pooler's refusal ("auto"): the saves alone go unnamed


def _arrays(rows: list[tuple[Record, int]], columns: tuple[str, ...], now: int) -> dict[str, Any]:
    """The parameters of a compare-and-set of many rows: one array per column (the key's too), each
    row's expected version, the time."""
    values: dict[str, Any] = {"b_expected": [expected for _, expected in rows], "now": now}
    values["v_key"] = [record.key for record, _ in rows]
    for name in columns:
        values[f"v_{name}"] = [getattr(record, name) for record, _ in rows]
    return values
