"""`InTransactions`: what a database handler runs in an explicit transaction on its autocommit
connections: the merge of a save that lost its race, under the row's lock, and a blocking request's
lock (a row lock held to the request's end, or a lease where the database has none)."""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from ...core.records import Record
from ...errors import LockTimeout
from .base import BaseHandler, LockState, LockStrategy, Merged
from .dialects import Database
from .prepared import once_more_unprepared, prepared_again, refused, unprepared_while_held
from .statements import SessionStatements, record_of, row_values, write_values

#: How often a locked merge is tried when the database picks it as a deadlock victim.
_MERGE_ATTEMPTS = 5


class InTransactions(BaseHandler[Connection]):
    """The merge and the blocking requests' locks, on `statements` and the `database`'s own forms."""

    statements: SessionStatements
    database: Database

    @once_more_unprepared
    def _merge(
        self, conn: Connection, key: str, now: int, build: Callable[[Record], Merged], *, held: bool
    ) -> Merged | None:
        for attempt in range(1, _MERGE_ATTEMPTS + 1):
            try:
                return self._merge_once(conn, key, now, build, held=held)
            except sa.exc.DBAPIError as exc:
                if not held and self.database.is_lock_timeout(exc):
                    raise LockTimeout(self.config.write_wait_seconds) from None
                # A deadlock inside a blocking request's transaction ended that transaction: not retryable here.
                if held or attempt == _MERGE_ATTEMPTS or not self.database.is_transient_conflict(exc):
                    raise
                time.sleep(random.uniform(0, 0.005 * attempt))  # de-synchronise the retrying writers
        raise AssertionError("unreachable")

    def _merge_once(
        self, conn: Connection, key: str, now: int, build: Callable[[Record], Merged], *, held: bool
    ) -> Merged | None:
        with self._transaction(conn, held=held):
            row = conn.execute(self.statements.select_for_update, {"b_key": key}).first()
            if row is None:
                return None
            current = record_of(row)
            if current.expires_at <= now:
                return None
            merged = build(current)
            successor = merged[0]
            if successor.key == key:
                conn.execute(self.statements.update, write_values(successor))
            else:  # a change of privilege: the session moves to a new key, the old one is gone
                conn.execute(self.statements.delete, {"b_key": key})
                conn.execute(self.statements.insert, row_values(successor))
            return merged

    @contextmanager
    def _transaction(self, conn: Connection, *, held: bool) -> Iterator[None]:
        """An explicit transaction on an autocommit connection (row locks last until it ends), its wait
        for a lock bounded by `write_wait_seconds` (`Database.begin`). *held*: a blocking request's
        transaction is already open on *conn* and holds the row lock (its caller decides, never a flag
        left on the pooled connection)."""
        if held and self.lock_strategy is LockStrategy.ROW:
            yield
            return
        self.database.begin(conn)
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

    # -- blocking requests -------------------------------------------------------------------------

    def _acquire(
        self, conn: Connection, key: str, id_hash: str, owner: str, now: int
    ) -> tuple[LockState, Record | None]:
        values: dict[str, Any] = {"b_key": key, "b_id_hash": id_hash, "now": now}
        if self.lock_strategy is LockStrategy.LEASE:
            now_ms = int(self.clock() * 1000)
            until = now_ms + int(self.config.block_lock_seconds * 1000)
            lease = {**values, "now_ms": now_ms, "owner": owner, "until": until}
            found = conn.execute(self.statements.take_lease, lease).first()
            if found is not None:
                return LockState.LOCKED, record_of(found)
            exists = conn.execute(self.statements.exists_opened, values).first()
            return (LockState.BUSY if exists else LockState.MISSING), None
        if not self.database.may_lock(conn, values):
            return LockState.MISSING, None
        wait = self.config.block_wait_seconds
        unprepared_while_held(conn)  # until `_release`: a refusal in the transaction could not be retried
        try:
            self.database.open_lock(conn, wait, self.config.block_lock_seconds)
            row = conn.execute(self.statements.select_opened_for_update, values).first()
        except BaseException as exc:  # also a cancellation: nothing may stay open on a pooled connection
            # A connection the server ended has nothing to roll back (and fails to): the error that
            # ended it is the one to answer by (503), not the rollback's.
            with suppress(sa.exc.SQLAlchemyError):
                self._end_lock(conn, commit=False)
            if isinstance(exc, sa.exc.DBAPIError) and self.database.is_lock_timeout(exc):
                raise LockTimeout(wait) from None
            raise
        if row is None:
            self._end_lock(conn, commit=False)
            return LockState.MISSING, None
        return LockState.LOCKED, record_of(row)

    def _release(self, conn: Connection, key: str, owner: str, *, commit: bool) -> None:
        if self.lock_strategy is LockStrategy.LEASE:
            conn.execute(self.statements.drop_lease, {"b_key": key, "owner": owner})
            return
        self._end_lock(conn, commit=commit)

    def _end_lock(self, conn: Connection, *, commit: bool) -> None:
        try:
            self.database.end_lock(conn, commit=commit)
        finally:
            prepared_again(conn)
