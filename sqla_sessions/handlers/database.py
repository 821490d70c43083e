"""`DatabaseHandler`: sessions in a SQL table through SQLAlchemy Core (PostgreSQL, MariaDB/MySQL, SQLite).

Every statement is built once, with bound parameters, so SQLAlchemy's compiled cache serves each
request. Connections run in autocommit: a read is one SELECT and one round trip, an uncontended save
is one compare-and-set UPDATE. Only a conflicting save opens an explicit transaction, locks the row
(`SELECT … FOR UPDATE`; on SQLite `BEGIN IMMEDIATE`), merges this save's keys onto what is stored
now and commits.
"""

from __future__ import annotations

import logging
import os
import random
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import DBAPIError

from ..config import DEFAULT_DATABASE_URL, SessionConfig
from ..errors import LockTimeout, StoreMisconfigured, StoreUnavailable, misconfiguration
from ..records import Record, StoreStats
from ..schema import sessions_table
from .base import BaseHandler, LockState, LockStrategy, Merged
from .engines import (
    create_session_engine,
    is_autocommit_engine,
    mysql_lock_wait_seconds,
    prepared_statements_on,
)
from .fastpath import FastStatement, fetch_all, fetch_one, not_run, row_count, run_prepared
from .libpq import BYTEA_ARRAY, INT8, INT8_ARRAY, VARCHAR_ARRAY, PreparedStatement, all_rows
from .prepared import detect_refusals, once_more_unprepared, prepared_again, refused, unprepared_while_held

logger = logging.getLogger("sqla_sessions")

#: How often a locked merge is tried when the database picks it as a deadlock victim.
_MERGE_ATTEMPTS = 5
_MYSQL_DEADLOCK_ERRNOS = (1213,)  # ER_LOCK_DEADLOCK

_COLUMNS = (
    "key",
    "id_hash",
    "user_id",
    "payload",
    "version",
    "created_at",
    "last_activity",
    "expires_at",
    "ip_address",
    "user_agent",
    "previous_id_hash",
    "idle_lifetime",
    "absolute_lifetime",
)

#: The columns a save of changes writes (all but the key it is found by).
_WRITABLE = tuple(name for name in _COLUMNS if name != "key")

#: Each column's array type, for the statements that write many rows from one array per column.
_ARRAY_KINDS = {
    "key": VARCHAR_ARRAY, "id_hash": VARCHAR_ARRAY, "user_id": VARCHAR_ARRAY, "payload": BYTEA_ARRAY,
    "version": INT8_ARRAY, "created_at": INT8_ARRAY, "last_activity": INT8_ARRAY, "expires_at": INT8_ARRAY,
    "ip_address": VARCHAR_ARRAY, "user_agent": VARCHAR_ARRAY, "previous_id_hash": VARCHAR_ARRAY,
    "idle_lifetime": INT8_ARRAY, "absolute_lifetime": INT8_ARRAY,
}  # fmt: skip


def _many_params(rows: list[tuple[Record, int]], columns: tuple[str, ...], now: int) -> dict[str, Any]:
    """The parameters of a `_pg_compare_and_set_many` statement: one array per column, each row's
    expected version, the time."""
    params: dict[str, Any] = {"b_expected": [expected for _, expected in rows], "now": now}
    for name in columns:
        params[f"v_{name}"] = [getattr(record, name) for record, _ in rows]
    return params


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


class DatabaseHandler(BaseHandler[Connection]):
    """Sessions stored in the `config.table` table of a SQLAlchemy database."""

    def __init__(
        self,
        engine_or_url: Engine | str | None = None,
        config: SessionConfig | None = None,
        *,
        clock: Callable[[], float] = time.time,
        fast_path: bool = True,
    ) -> None:
        """*fast_path*: run the per-request statements on the DBAPI cursor (see `handlers.fastpath`)."""
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
        if config.prepared_statements == "auto":
            # An engine of ours never lets psycopg prepare under "auto" (create_session_engine): only
            # the hot statements, by names derived from their SQL, unless the port says PgBouncer.
            named = self._owns_engine and prepared_statements_on(self.engine.url, "auto")
            detect_refusals(self.engine, named_by_sql=named)
        self.table = sessions_table(config.table)
        # Single statements run in autocommit: one round trip each. An engine that is not in autocommit
        # already is switched per checkout, which is correct but slower (see create_session_engine).
        self._autocommit = (
            self.engine
            if is_autocommit_engine(self.engine)
            else self.engine.execution_options(isolation_level="AUTOCOMMIT")
        )
        dialect = self.engine.dialect.name
        self._dialect = "mysql" if dialect == "mariadb" else dialect
        self.lock_strategy = LockStrategy.LEASE if self._dialect == "sqlite" else LockStrategy.ROW
        self._build_statements()
        # What a MySQL/MariaDB connection's lock wait goes back to after a blocking request: the bound
        # its engine set when it opened (`create_session_engine`), or the server's for an engine passed in.
        self._mysql_write_wait = str(mysql_lock_wait_seconds(config)) if self._owns_engine else "DEFAULT"
        self._fast_path = fast_path
        dialect_ = self.engine.dialect
        self._fast_by_key = FastStatement(self._select_by_key, dialect_)
        self._fast_update = FastStatement(self._update_if_version, dialect_)
        self._fast_insert = FastStatement(self._insert_row, dialect_)
        self._fast_touch = FastStatement(self._touch_row, dialect_)
        self._fast_update_unless_locked = FastStatement(self._update_unless_locked, dialect_)
        self._fast_touch_unless_locked = FastStatement(self._touch_unless_locked, dialect_)
        on_libpq = self._fast_by_key.libpq is not None
        self._prepared_by_keys = self._pg_select_by_keys() if on_libpq else None
        self._prepared_update_many = self._pg_compare_and_set_many(_WRITABLE) if on_libpq else None
        self._prepared_touch_many = self._pg_compare_and_set_many(("last_activity", "expires_at")) if on_libpq else None
        self._prepared_insert_many = self._pg_insert_many() if on_libpq else None
        # Concurrent threads' loads share one SELECT on every database; their saves one UPDATE where
        # that is one statement (PostgreSQL), not a string of them on one connection.
        batching = fast_path and config.batch_requests
        self._writes_batch = batching and on_libpq
        self.batch_concurrent_calls(loads=batching, saves=self._writes_batch)

    @property
    def batches_writes(self) -> bool:
        """Whether `_update_many` writes many rows in one statement (PostgreSQL through libpq), so
        concurrent saves are worth batching (`sqla_sessions.batching`). Not while anything watches the
        engine's statements or it translates schemas: those run each statement through SQLAlchemy."""
        engine = self._autocommit
        return (
            self._writes_batch
            and not (engine._has_events or engine.echo)
            and "schema_translate_map" not in engine.get_execution_options()
        )

    def check(self) -> None:
        """Make sure the database answers and holds the sessions table at this version's schema.

        Raises `StoreMisconfigured` with one line saying what to fix (the table is missing or older
        than this version: run `sqla-sessions migrate`; the database, role or password is refused),
        or `StoreUnavailable` when the server cannot be reached. Call it at startup (or set
        `check_on_startup`) to fail once, clearly, instead of on every request.
        """
        where = f"table {self.table.name!r} in {self.engine.url.render_as_string(hide_password=True)}"
        try:
            with self.connect() as conn:
                inspector = sa.inspect(conn)
                if not inspector.has_table(self.table.name):
                    raise StoreMisconfigured(f"{where} not found: run `sqla-sessions migrate`")
                columns = {column["name"] for column in inspector.get_columns(self.table.name)}
                conn.execute(sa.select(self.table.c.key).limit(0))  # the role may read it
                if self._dialect == "postgresql":  # and write it (the catalog tells, nothing is written)
                    # has_table_privilege with a list is true when *any* is held: ask for each.
                    name = sa.func.quote_ident(self.table.name)
                    held = [sa.func.has_table_privilege(name, kind) for kind in ("INSERT", "UPDATE", "DELETE")]
                    if not all(conn.execute(sa.select(*held)).one()):
                        raise StoreMisconfigured(f"{where}: the role may not insert, update and delete rows")
        except DBAPIError as exc:
            what = misconfiguration(exc)
            reason = str(exc.orig).strip().splitlines()[0] if str(exc.orig).strip() else type(exc.orig).__name__
            if what is not None:
                raise StoreMisconfigured(f"{what} for {where}: {reason}") from exc
            raise StoreUnavailable(f"cannot reach the database for {where}: {reason}") from exc
        missing = sorted(set(self.table.c.keys()) - columns)
        if missing:
            raise StoreMisconfigured(f"{where} lacks columns {missing} (an older schema): run `sqla-sessions migrate`")

    def close(self) -> None:
        """Dispose of the engine if this handler created it."""
        if self._owns_engine:
            self.engine.dispose()

    def _build_statements(self) -> None:
        t = self.table
        cols = [t.c[name] for name in _COLUMNS]
        now = sa.bindparam("now", type_=sa.BigInteger)
        key = sa.bindparam("b_key", type_=t.c.key.type)
        self._select_by_key = sa.select(*cols).where(t.c.key == key, t.c.expires_at > now)
        self._select_for_update = sa.select(*cols).where(t.c.key == key).with_for_update()
        self._select_by_keys = sa.select(*cols).where(
            t.c.key.in_(sa.bindparam("b_keys", expanding=True)), t.c.expires_at > now
        )
        # Explicit columns: the lease columns stay NULL, and the compiled SQL names exactly these binds.
        self._insert_row = sa.insert(t).values({name: sa.bindparam(name) for name in _COLUMNS})
        writable = {name: sa.bindparam(f"v_{name}", type_=t.c[name].type) for name in _WRITABLE}
        self._update_row = sa.update(t).where(t.c.key == key).values(**writable)
        self._update_if_version = (
            sa.update(t)
            .where(t.c.key == key, t.c.version == sa.bindparam("b_version", type_=sa.BigInteger), t.c.expires_at > now)
            .values(**writable)
        )
        self._touch_row = (
            sa.update(t)
            .where(t.c.key == key, t.c.version == sa.bindparam("b_version", type_=sa.BigInteger), t.c.expires_at > now)
            .values(
                last_activity=sa.bindparam("v_last_activity", type_=sa.BigInteger),
                expires_at=sa.bindparam("v_expires_at", type_=sa.BigInteger),
            )
        )
        # The same two, for a batch of one (`_update_many`, `_touch_many`): never waiting for a row another
        # transaction holds (it is skipped, and saved alone), at the cost of a plain UPDATE (measured:
        # +3 µs a statement, against +80 µs for the many-row form with one row).
        unlocked = (
            t.c.key == sa.select(t.c.key).where(t.c.key == key).with_for_update(skip_locked=True).scalar_subquery()
        )
        self._update_unless_locked = self._update_if_version.where(unlocked)
        self._touch_unless_locked = self._touch_row.where(unlocked)
        if self._dialect == "postgresql":
            # A save alone skips a row another transaction holds too: it then merges, waiting at most
            # `write_wait_seconds`; a touch is left to the holder, which writes the row anyway. (A
            # row this connection's own transaction holds, a blocking request's, is written.)
            self._update_if_version, self._touch_row = self._update_unless_locked, self._touch_unless_locked
        self._delete_row = sa.delete(t).where(t.c.key == key)
        user = sa.bindparam("b_user_id", type_=t.c.user_id.type)
        # A device list shows no payload: an empty one is selected in its place (nothing TOASTed is read).
        listed = [sa.literal(b"", sa.LargeBinary).label("payload") if c.name == "payload" else c for c in cols]
        self._select_user = (
            sa.select(*listed).where(t.c.user_id == user, t.c.expires_at > now).order_by(t.c.last_activity.desc())
        )
        self._delete_user_rows = sa.delete(t).where(t.c.user_id == user)
        self._delete_user_except = sa.delete(t).where(t.c.user_id == user, t.c.key != key)

        # Blocking sessions: a row lock (PostgreSQL, MariaDB/MySQL) or a lease (SQLite). The secret's hash
        # is in the WHERE clause so a wrong secret locks nothing; comparing it in SQL leaks no timing worth
        # having: both sides are SHA-256 digests, and the bearer of a guess cannot steer a digest's bytes.
        id_hash = sa.bindparam("b_id_hash", type_=t.c.id_hash.type)
        opened = sa.or_(t.c.id_hash == id_hash, t.c.previous_id_hash == id_hash)
        self._select_by_id_for_update = (
            sa.select(*cols).where(t.c.key == key, opened, t.c.expires_at > now).with_for_update()
        )
        self._set_pg_lock_wait = sa.select(sa.func.set_config("lock_timeout", sa.bindparam("wait"), True))
        self._set_pg_timeouts = sa.select(
            sa.func.set_config("lock_timeout", sa.bindparam("wait"), True),
            sa.func.set_config("idle_in_transaction_session_timeout", sa.bindparam("hold"), True),
        )
        # lease_until is in milliseconds: whole seconds would cut a hold short by up to a second.
        free = sa.or_(t.c.lease_until.is_(None), t.c.lease_until <= sa.bindparam("now_ms", type_=sa.BigInteger))
        self._take_lease = (
            sa.update(t)
            .where(t.c.key == key, opened, t.c.expires_at > now, free)
            .values(lease_owner=sa.bindparam("owner"), lease_until=sa.bindparam("until", type_=sa.BigInteger))
            .returning(*cols)
        )
        self._exists_by_id = sa.select(t.c.key).where(t.c.key == key, opened, t.c.expires_at > now)
        self._drop_lease = (
            sa.update(t)
            .where(t.c.key == key, t.c.lease_owner == sa.bindparam("owner"))
            .values(lease_owner=None, lease_until=None)
        )

    def _gc_statement(self, limit: int) -> sa.Executable:
        t = self.table
        expired = t.c.expires_at <= sa.bindparam("now", type_=sa.BigInteger)
        if self._dialect == "mysql":
            # MySQL/MariaDB refuse LIMIT in an IN (subquery), but have DELETE … LIMIT on the index range.
            return sa.delete(t).where(expired).with_dialect_options(mysql_limit=limit)
        if self._dialect == "postgresql":
            # The batch is found through the expiry index and locked (SKIP LOCKED: concurrent sweeps
            # split the work), then deleted by its rows' physical addresses (a TID scan), not looked up
            # once more each through the primary key: about a third less time per batch on a large
            # table. A locked row cannot move, so its ctid stays valid to the end of the statement.
            # Core, not text: a `schema_translate_map` (a schema per tenant) must reach this statement too.
            found = t.alias("expired")
            located: sa.Select[Any] = (
                sa.select(sa.literal_column("expired.ctid"))
                .select_from(found)
                .where(found.c.expires_at <= sa.bindparam("now", type_=sa.BigInteger))
                .order_by(found.c.expires_at)
                .limit(limit)
                .with_for_update(skip_locked=True)
            )
            ctid: sa.ColumnClause[Any] = sa.literal_column(
                "ctid"
            )  # unqualified: the DELETE's own table (the subquery's is "expired")
            return sa.delete(t).where(ctid == sa.func.any(sa.func.array(located.scalar_subquery())))
        batch = sa.select(t.c.key).where(expired).order_by(t.c.expires_at).limit(limit)
        return sa.delete(t).where(t.c.key.in_(batch.scalar_subquery()))

    # -- primitives ------------------------------------------------------------------------------

    @contextmanager
    def connect(self) -> Iterator[Connection]:
        with self._autocommit.connect() as conn:
            yield conn

    @once_more_unprepared
    def _fetch(self, conn: Connection, key: str, now: int) -> Record | None:
        params = {"b_key": key, "now": now}
        if self._fast_path:
            row = fetch_one(conn, self._fast_by_key, params)
        else:
            row = conn.execute(self._select_by_key, params).first()
        return None if row is None else _record(row)

    @once_more_unprepared
    def _fetch_many(self, conn: Connection, keys: list[str], now: int) -> dict[str, Record]:
        prepared = self._prepared_by_keys if self._fast_path else None
        rows = fetch_all(conn, prepared, self._select_by_keys, {"b_keys": keys, "now": now})
        found = {}
        for row in rows:
            record = _record(row)
            found[record.key] = record
        return found

    def _pg_select_by_keys(self) -> PreparedStatement:
        """`_select_by_keys` for libpq: one array parameter instead of an IN list that changes with its length."""
        preparer = self.engine.dialect.identifier_preparer
        columns = ", ".join(preparer.quote(name) for name in _COLUMNS)
        sql = (
            f"SELECT {columns} FROM {preparer.format_table(self.table)} "
            f"WHERE {preparer.quote('key')} = ANY($1) AND expires_at > $2"
        )
        return PreparedStatement(sql, [("b_keys", VARCHAR_ARRAY), ("now", INT8)])

    def _update_many(self, conn: Connection, writes: list[tuple[Record, int]], now: int) -> set[str]:
        if not self.batches_writes:
            return set()  # one `_update` per row could wait for a lock: each saves alone instead
        if len(writes) == 1:
            record, expected = writes[0]
            one = _write_params(record)
            one["b_version"] = expected
            one["now"] = now
            return self._one_unless_locked(conn, self._fast_update_unless_locked, one)
        return self._keys_written(conn, self._prepared_update_many, _many_params(writes, _COLUMNS, now))

    def _keys_written(self, conn: Connection, prepared: PreparedStatement | None, params: dict[str, Any]) -> set[str]:
        """Run a statement that writes many rows and returns their keys. Not run (not for this
        connection) or refused as a whole (one value the server rejects), it wrote nothing (one
        statement, autocommit): each request saves alone, where its own error is raised."""
        rows = run_prepared(conn, prepared, params, all_rows)
        return set() if not_run(rows) else {row[0] for row in rows}

    def _one_unless_locked(self, conn: Connection, fast: FastStatement, params: dict[str, Any]) -> set[str]:
        """A batch of one: the row's key if the statement wrote it."""
        with _refusal_writes_nothing(conn):
            return {params["b_key"]} if row_count(conn, fast, params) == 1 else set()
        return set()

    def _insert_many(self, conn: Connection, records: list[Record]) -> set[str]:
        if not self.batches_writes:
            return set()
        if len(records) == 1:
            with _refusal_writes_nothing(conn):  # a new key waits for nothing: a plain INSERT
                self._insert(conn, records[0])
                return {records[0].key}
            return set()
        params = {f"v_{name}": [getattr(record, name) for record in records] for name in _COLUMNS}
        return self._keys_written(conn, self._prepared_insert_many, params)

    def _touch_many(self, conn: Connection, touches: list[tuple[Record, int]], now: int) -> set[str]:
        if not self.batches_writes:
            return set()
        if len(touches) == 1:
            record, version = touches[0]
            one = {
                "b_key": record.key,
                "b_version": version,
                "now": now,
                "v_last_activity": record.last_activity,
                "v_expires_at": record.expires_at,
            }
            return self._one_unless_locked(conn, self._fast_touch_unless_locked, one)
        params = _many_params(touches, ("key", "last_activity", "expires_at"), now)
        return self._keys_written(conn, self._prepared_touch_many, params)

    def _pg_insert_many(self) -> PreparedStatement:
        """New rows in one statement. A key taken already (never, for 128 random bits) is skipped, not
        an error, and its request inserts alone, where the error is raised."""
        preparer = self.engine.dialect.identifier_preparer
        parameters = [(f"v_{name}", _ARRAY_KINDS[name]) for name in _COLUMNS]
        arrays = ", ".join(f"${number}" for number in range(1, len(parameters) + 1))
        names = ", ".join(preparer.quote(name) for name in _COLUMNS)
        sql = (
            f"INSERT INTO {preparer.format_table(self.table)} ({names}) SELECT * FROM unnest({arrays}) "
            f"ON CONFLICT DO NOTHING RETURNING {preparer.quote('key')}"
        )
        return PreparedStatement(sql, parameters)

    def _pg_compare_and_set_many(self, written: tuple[str, ...]) -> PreparedStatement:
        """Compare-and-set of the *written* columns of many rows in one statement (one round trip, one
        commit): the changes of a save (every column), or a touch (activity and expiry).

        The rows are locked first, in key order, skipping any another transaction holds (a blocking
        request's row lock, a merge): those stay unwritten and their saves go alone, waiting for the
        lock as a single save does; nothing here ever waits, so no batch deadlocks with another. The
        UPDATE checks the version again: under READ COMMITTED it re-reads a row changed since the
        statement began."""
        preparer = self.engine.dialect.identifier_preparer
        q = preparer.quote
        table = preparer.format_table(self.table)
        columns = ("key", *written)
        parameters = [("b_expected", INT8_ARRAY)] + [(f"v_{name}", _ARRAY_KINDS[name]) for name in columns]
        now = f"${len(parameters) + 1}"
        parameters.append(("now", INT8))
        arrays = ", ".join(f"${number}" for number in range(1, len(parameters)))
        names = ", ".join(q(name) for name in ("b_expected", *columns))
        key = q("key")
        sql = (
            f"WITH v AS (SELECT * FROM unnest({arrays}) AS v({names})), "
            f"locked AS MATERIALIZED (SELECT s.{key} FROM {table} AS s JOIN v ON s.{key} = v.{key} "
            f"WHERE s.version = v.b_expected AND s.expires_at > {now} "
            f"ORDER BY s.{key} FOR UPDATE OF s SKIP LOCKED) "
            f"UPDATE {table} AS s SET {', '.join(f'{q(name)} = v.{q(name)}' for name in written)} FROM v "
            f"WHERE s.{key} = v.{key} AND s.{key} IN (SELECT {key} FROM locked) "
            f"AND s.version = v.b_expected AND s.expires_at > {now} RETURNING s.{key}"
        )
        return PreparedStatement(sql, parameters)

    @once_more_unprepared
    def _insert(self, conn: Connection, record: Record) -> None:
        values = {name: getattr(record, name) for name in _COLUMNS}
        if self._fast_path:
            row_count(conn, self._fast_insert, values)
        else:
            conn.execute(self._insert_row, values)

    @once_more_unprepared
    def _update(self, conn: Connection, record: Record, *, expected_version: int, now: int) -> bool:
        params = _write_params(record)
        params["b_version"] = expected_version
        params["now"] = now
        try:
            if self._fast_path:
                return row_count(conn, self._fast_update, params) == 1
            return conn.execute(self._update_if_version, params).rowcount == 1
        except sa.exc.DBAPIError as exc:
            if is_transient_conflict(exc):
                return False  # a deadlock victim is a lost race like any other: merge under the lock
            if is_lock_timeout(exc):
                raise LockTimeout(self.config.write_wait_seconds) from None
            raise

    @once_more_unprepared
    def _merge(
        self, conn: Connection, key: str, now: int, build: Callable[[Record], Merged], *, held: bool
    ) -> Merged | None:
        for attempt in range(1, _MERGE_ATTEMPTS + 1):
            try:
                return self._merge_once(conn, key, now, build, held=held)
            except sa.exc.DBAPIError as exc:
                if not held and is_lock_timeout(exc):
                    raise LockTimeout(self.config.write_wait_seconds) from None
                # A deadlock inside a blocking request's transaction ended that transaction: not retryable here.
                if held or attempt == _MERGE_ATTEMPTS or not is_transient_conflict(exc):
                    raise
                time.sleep(random.uniform(0, 0.005 * attempt))  # de-synchronise the retrying writers
        raise AssertionError("unreachable")

    def _merge_once(
        self, conn: Connection, key: str, now: int, build: Callable[[Record], Merged], *, held: bool
    ) -> Merged | None:
        with self._transaction(conn, held=held):
            if not held and self._dialect == "postgresql":
                # The wait for the row's lock ends with the transaction's setting (MySQL and MariaDB:
                # the connection's innodb_lock_wait_timeout, set when it opened; SQLite: busy timeout).
                conn.execute(self._set_pg_lock_wait, {"wait": f"{int(self.config.write_wait_seconds * 1000)}ms"})
            row = conn.execute(self._select_for_update, {"b_key": key}).first()
            if row is None:
                return None
            current = _record(row)
            if current.expires_at <= now:
                return None
            merged = build(current)
            successor = merged[0]
            if successor.key == key:
                conn.execute(self._update_row, _write_params(successor))
            else:  # a change of privilege: the session moves to a new key, the old one is gone
                conn.execute(self._delete_row, {"b_key": key})
                conn.execute(self._insert_row, {name: getattr(successor, name) for name in _COLUMNS})
            return merged

    @once_more_unprepared
    def _touch(
        self, conn: Connection, key: str, *, version: int, last_activity: int, expires_at: int, now: int
    ) -> bool:
        params = {
            "b_key": key,
            "b_version": version,
            "now": now,
            "v_last_activity": last_activity,
            "v_expires_at": expires_at,
        }
        if self._fast_path:
            return row_count(conn, self._fast_touch, params) == 1
        return conn.execute(self._touch_row, params).rowcount == 1

    @once_more_unprepared
    def _delete(self, conn: Connection, key: str) -> bool:
        return conn.execute(self._delete_row, {"b_key": key}).rowcount > 0

    @once_more_unprepared
    def _delete_expired(self, conn: Connection, now: int, limit: int) -> int:
        return conn.execute(self._gc_statement(limit), {"now": now}).rowcount

    @once_more_unprepared
    def _fetch_user(self, conn: Connection, user_id: str, now: int) -> list[Record]:
        return [_record(row) for row in conn.execute(self._select_user, {"b_user_id": user_id, "now": now})]

    @once_more_unprepared
    def _delete_user(self, conn: Connection, user_id: str, except_key: str | None) -> int:
        if except_key is None:
            return conn.execute(self._delete_user_rows, {"b_user_id": user_id}).rowcount
        return conn.execute(self._delete_user_except, {"b_user_id": user_id, "b_key": except_key}).rowcount

    @once_more_unprepared
    def _stats(self, conn: Connection, now: int) -> StoreStats:
        t = self.table
        live = t.c.expires_at > sa.bindparam("now", type_=sa.BigInteger)
        counts = sa.select(
            sa.func.count().filter(live),
            sa.func.count().filter(sa.not_(live)),
            sa.func.count(sa.distinct(t.c.user_id)).filter(live),
        )
        if self._dialect == "mysql":  # no FILTER clause there
            counts = sa.select(
                sa.func.coalesce(sa.func.sum(sa.case((live, 1), else_=0)), 0),
                sa.func.coalesce(sa.func.sum(sa.case((live, 0), else_=1)), 0),
                sa.func.count(sa.distinct(sa.case((live, t.c.user_id)))),
            )
        row = conn.execute(counts, {"now": now}).one()
        return StoreStats(int(row[0]), int(row[1]), int(row[2]), self._table_bytes(conn))

    def _table_bytes(self, conn: Connection) -> int | None:
        name = self.table.name
        if self._dialect == "postgresql":
            # A regclass from text folds case unless quoted: quote_ident keeps "Sessions" its own table.
            relation_size = sa.func.pg_total_relation_size(sa.func.quote_ident(sa.literal(name)))
            return int(conn.execute(sa.select(relation_size)).scalar_one())
        if self._dialect == "mysql":
            size = conn.execute(
                sa.text(
                    "SELECT data_length + index_length FROM information_schema.tables "
                    "WHERE table_schema = DATABASE() AND table_name = :name"
                ),
                {"name": name},
            ).scalar()
            return None if size is None else int(size)
        try:  # SQLite's dbstat table exists only when compiled in
            size = conn.execute(
                sa.text("SELECT sum(pgsize) FROM dbstat WHERE name = :name OR name LIKE :indexes"),
                {"name": name, "indexes": f"%{name}%"},
            ).scalar()
        except sa.exc.OperationalError:
            return None
        return None if size is None else int(size)

    def _acquire(
        self, conn: Connection, key: str, id_hash: str, owner: str, now: int
    ) -> tuple[LockState, Record | None]:
        if self.lock_strategy is LockStrategy.LEASE:
            now_ms = int(self.clock() * 1000)
            until = now_ms + int(self.config.block_lock_seconds * 1000)
            params = {"b_key": key, "b_id_hash": id_hash, "now": now, "now_ms": now_ms, "owner": owner, "until": until}
            row = conn.execute(self._take_lease, params).first()
            if row is not None:
                return LockState.LOCKED, _record(row)
            exists = conn.execute(self._exists_by_id, {"b_key": key, "b_id_hash": id_hash, "now": now}).first()
            return (LockState.BUSY if exists else LockState.MISSING), None
        wait, hold = self.config.block_wait_seconds, self.config.block_lock_seconds
        if (
            self._dialect == "mysql"
            and conn.execute(self._exists_by_id, {"b_key": key, "b_id_hash": id_hash, "now": now}).first() is None
        ):
            # InnoDB locks the primary-key record before it checks the rest of the WHERE clause: a known
            # key with a wrong secret would wait for (and then hold) the owner's lock. A plain read first.
            return LockState.MISSING, None
        unprepared_while_held(conn)  # until `_end_transaction`: a refusal in the transaction could not be retried
        try:
            if self._dialect == "mysql":
                # Session variables (whole seconds), reset when the lock ends.
                conn.exec_driver_sql(
                    f"SET SESSION innodb_lock_wait_timeout = {max(1, round(wait))}, "
                    f"{self._mysql_hold_variable(conn)} = {max(1, round(hold))}"
                )
            conn.exec_driver_sql("BEGIN")
            if self._dialect == "postgresql":
                # Both die with the transaction: the wait and the hold are bounded by the database itself.
                conn.execute(self._set_pg_timeouts, {"wait": f"{int(wait * 1000)}ms", "hold": f"{int(hold * 1000)}ms"})
            params = {"b_key": key, "b_id_hash": id_hash, "now": now}
            row = conn.execute(self._select_by_id_for_update, params).first()
        except BaseException as exc:  # also a cancellation: nothing may stay open on a pooled connection
            # A connection the server ended has nothing to roll back (and fails to): the error that
            # ended it is the one to answer by (503), not the rollback's.
            with suppress(sa.exc.SQLAlchemyError):
                self._end_transaction(conn, commit=False)
            if isinstance(exc, sa.exc.DBAPIError) and is_lock_timeout(exc):
                raise LockTimeout(wait) from None
            raise
        if row is None:
            self._end_transaction(conn, commit=False)
            return LockState.MISSING, None
        return LockState.LOCKED, _record(row)

    def _release(self, conn: Connection, key: str, owner: str, *, commit: bool) -> None:
        if self.lock_strategy is LockStrategy.LEASE:
            conn.execute(self._drop_lease, {"b_key": key, "owner": owner})
            return
        self._end_transaction(conn, commit=commit)

    def _end_transaction(self, conn: Connection, *, commit: bool) -> None:
        """COMMIT or ROLLBACK a blocking request's transaction and reset its session settings."""
        try:
            conn.exec_driver_sql("COMMIT" if commit else "ROLLBACK")
        finally:
            prepared_again(conn)
            # A connection the server ended (the hold outlived its bound) is discarded by the pool: there
            # is nothing to reset, and trying would hide why the transaction ended.
            if self._dialect == "mysql" and not conn.invalidated:
                with suppress(sa.exc.DBAPIError):
                    conn.exec_driver_sql(
                        f"SET SESSION innodb_lock_wait_timeout = {self._mysql_write_wait}, "
                        f"{self._mysql_hold_variable(conn)} = DEFAULT"
                    )

    def _mysql_hold_variable(self, conn: Connection) -> str:
        """The session variable that bounds a blocking request's hold on MySQL and MariaDB.

        MariaDB ends a connection idle in a transaction past `idle_transaction_timeout`. MySQL has no
        such variable, but ends any connection idle past `wait_timeout`: set for this connection only,
        while it holds the lock, it bounds the hold the same way (the server closes the connection,
        which rolls back and releases the row lock). Either way a crashed holder's lock cannot go stale.
        """
        return "idle_transaction_timeout" if getattr(conn.dialect, "is_mariadb", False) else "wait_timeout"

    @contextmanager
    def _transaction(self, conn: Connection, *, held: bool) -> Iterator[None]:
        """An explicit transaction on an autocommit connection (row locks last until it ends).

        SQLite has no row locks: `BEGIN IMMEDIATE` takes the database write lock up front, so the
        read-modify-write cannot interleave with another writer. *held*: a blocking request's
        transaction is already open on *conn* and holds the row lock (its caller decides, never a
        flag left on the pooled connection).
        """
        if held and self.lock_strategy is LockStrategy.ROW:
            yield
            return
        driver = conn.connection.driver_connection
        if self._dialect == "sqlite":
            begin = None if getattr(driver, "in_transaction", False) else "BEGIN IMMEDIATE"
        else:
            begin = "BEGIN"
        if begin is not None:
            conn.exec_driver_sql(begin)
        try:
            yield
            # A COMMIT refused before it ran (a pooler's missing prepared statement) leaves the transaction
            # open and aborted: it is rolled back like any other failure, and nothing was committed.
            conn.exec_driver_sql("COMMIT")
        except BaseException as exc:
            if isinstance(exc, sa.exc.DBAPIError):
                refused(conn, exc)  # a pooler's refusal ("auto"): the ROLLBACK goes unnamed
            with suppress(Exception):  # a dead connection must not hide the original error
                conn.exec_driver_sql("ROLLBACK")
            raise


def is_transient_conflict(exc: sa.exc.DBAPIError) -> bool:
    """True for a deadlock or serialization failure: the transaction was rolled back and may be retried.

    InnoDB can pick a single-row UPDATE as a deadlock victim when many writers contend for one row
    (secondary-index locks); PostgreSQL reports 40P01/40001.
    """
    orig = exc.orig
    if getattr(orig, "sqlstate", None) in ("40001", "40P01"):
        return True
    args: tuple[Any, ...] = getattr(orig, "args", ())
    return bool(args) and args[0] in _MYSQL_DEADLOCK_ERRNOS


def is_lock_timeout(exc: sa.exc.DBAPIError) -> bool:
    """True when the database gave up waiting for a row lock (PostgreSQL 55P03, MySQL/MariaDB 1205/3572)."""
    orig = exc.orig
    if getattr(orig, "sqlstate", None) == "55P03":
        return True
    args: tuple[Any, ...] = getattr(orig, "args", ())
    return bool(args) and args[0] in (1205, 3572)


def _record(row: Any) -> Record:
    payload = row[3]
    return Record(
        key=row[0],
        id_hash=row[1],
        user_id=row[2],
        payload=bytes(payload) if not isinstance(payload, bytes) else payload,
        version=row[4],
        created_at=row[5],
        last_activity=row[6],
        expires_at=row[7],
        ip_address=row[8],
        user_agent=row[9],
        previous_id_hash=row[10],
        idle_lifetime=row[11],
        absolute_lifetime=row[12],
    )


def _write_params(record: Record) -> dict[str, Any]:
    return {
        "b_key": record.key,
        "v_id_hash": record.id_hash,
        "v_user_id": record.user_id,
        "v_payload": record.payload,
        "v_version": record.version,
        "v_created_at": record.created_at,
        "v_last_activity": record.last_activity,
        "v_expires_at": record.expires_at,
        "v_ip_address": record.ip_address,
        "v_user_agent": record.user_agent,
        "v_previous_id_hash": record.previous_id_hash,
        "v_idle_lifetime": record.idle_lifetime,
        "v_absolute_lifetime": record.absolute_lifetime,
    }
