"""`RowStore`: the row primitives a concrete handler supplies (memory, database), on its own connections."""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Generic, TypeVar

from ...core.records import Record, StoreStats
from .contract import LockState, LockStrategy, Merged

logger = logging.getLogger(__name__)

C = TypeVar("C")


class RowStore(ABC, Generic[C]):
    """Row primitives running on a connection of type `C`; each is atomic by itself."""

    @abstractmethod
    def connect(self) -> AbstractContextManager[C]:
        """Open a connection for one operation (each primitive on it is atomic by itself)."""

    @abstractmethod
    def _fetch(self, conn: C, key: str, now: int) -> Record | None:
        """Return the unexpired row with this key."""

    def _fetch_many(self, conn: C, keys: list[str], now: int) -> dict[str, Record]:
        """The unexpired rows with these (distinct) keys, by key: one statement where the handler can."""
        found = {}
        for key in keys:
            record = self._fetch(conn, key, now)
            if record is not None:
                found[key] = record
        return found

    @abstractmethod
    def _insert(self, conn: C, record: Record) -> None:
        """Insert a new row."""

    @abstractmethod
    def _update(self, conn: C, record: Record, *, expected_version: int, now: int) -> bool:
        """Compare-and-set: write *record* if the row still has *expected_version* and is unexpired."""

    def _update_many(self, conn: C, writes: list[tuple[Record, int]], now: int) -> set[str]:
        """`_update` for rows of distinct keys, each with its expected version; the keys written.

        Must never wait for a row lock (a batch would wait with it, see `sqla_sessions.store.batching`): a
        row another transaction holds is left unwritten, and so is any row whose write failed (its
        request then saves alone, and waits or raises there). Never raises after writing a row.
        Here (no row locks: the memory handler) one `_update` per row."""
        return _one_by_one(
            writes, lambda record, expected: self._update(conn, record, expected_version=expected, now=now)
        )

    def _insert_many(self, conn: C, records: list[Record]) -> set[str]:
        """`_insert` for new rows; the keys inserted (as `_update_many`: never waits, never raises
        after writing a row; a row not inserted is saved alone). Here one `_insert` per row."""

        def insert(record: Record, _: int) -> bool:
            self._insert(conn, record)
            return True

        return _one_by_one([(record, 0) for record in records], insert)

    def _touch_many(self, conn: C, touches: list[tuple[Record, int]], now: int) -> set[str]:
        """`_touch` for rows of distinct keys (each its touched record and expected version); the keys
        touched (as `_update_many`: never waits, never raises after writing a row). Here one `_touch` per row."""

        def touch(record: Record, version: int) -> bool:
            return self._touch(
                conn, record.key, version=version, last_activity=record.last_activity,
                expires_at=record.expires_at, now=now,
            )  # fmt: skip

        return _one_by_one(touches, touch)

    @abstractmethod
    def _merge(self, conn: C, key: str, now: int, build: Callable[[Record], Merged], *, held: bool) -> Merged | None:
        """Lock the unexpired row, let *build* compute its successor from it, write that; None if gone.

        A successor with another key replaces the row (delete and insert in the same transaction).
        *held*: *conn* is a blocking request's, already in the transaction holding the row lock.
        """

    @abstractmethod
    def _touch(self, conn: C, key: str, *, version: int, last_activity: int, expires_at: int, now: int) -> bool:
        """Refresh activity and expiry of the unexpired row if it still has *version*; False otherwise.

        The version guard: the expiry was computed from the row as loaded (its own lifetime), and a
        write since may have changed that lifetime; a stale touch must not undo it."""

    @abstractmethod
    def _delete(self, conn: C, key: str) -> bool:
        """Delete a row by key."""

    @abstractmethod
    def _delete_expired(self, conn: C, now: int, limit: int) -> int:
        """Delete at most *limit* expired rows through the expiry index; return how many."""

    @abstractmethod
    def _fetch_user(self, conn: C, user_id: str, now: int) -> list[Record]:
        """Return a user's unexpired rows, most recently active first."""

    @abstractmethod
    def _delete_user(self, conn: C, user_id: str, except_key: str | None) -> int:
        """Delete a user's rows, except *except_key*."""

    @abstractmethod
    def _stats(self, conn: C, now: int) -> StoreStats:
        """Count live and expired rows and users with a live session; the table's size if known."""

    lock_strategy: LockStrategy = LockStrategy.LEASE

    @abstractmethod
    def _acquire(self, conn: C, key: str, id_hash: str, owner: str, now: int) -> tuple[LockState, Record | None]:
        """Lock the live row with this key and secret hash for a blocking request (a wrong secret locks nothing).

        A row lock waits in the database up to `block_wait_seconds` and raises `LockTimeout` past it;
        on failure nothing is left open on *conn*.
        """

    @abstractmethod
    def _release(self, conn: C, key: str, owner: str, *, commit: bool) -> None:
        """End what a successful `_acquire` started: commit or roll back the lock's transaction, or drop the lease."""


def _one_by_one(rows: list[tuple[Record, int]], write: Callable[[Record, int], bool]) -> set[str]:
    """The keys of the rows *write* wrote, one call each (the `*_many` primitives of a handler whose
    rows have no locks to wait for); a row whose write failed is left to its request, which saves it
    alone and gets the error there."""
    written = set()
    for record, expected in rows:
        try:
            if write(record, expected):
                written.add(record.key)
        except Exception:
            logger.debug("a batched write failed; its request saves alone", exc_info=True)
    return written
