"""`MemoryHandler`: the same contract as the database handler, in a dict. For tests and demos."""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from ...config import SessionConfig
from ...core.records import Record, StoreStats
from .base import BaseHandler, LockState, Merged


class MemoryHandler(BaseHandler[None]):
    """Sessions in process memory; one lock makes every primitive atomic, as a row lock would."""

    def __init__(self, config: SessionConfig | None = None, *, clock: Callable[[], float] = time.time) -> None:
        super().__init__(config, clock=clock)
        self._rows: dict[str, Record] = {}
        self._lock = threading.RLock()
        self._leases: dict[str, tuple[str, int]] = {}  # key -> (owner, until in milliseconds)

    def with_config(self, config: SessionConfig) -> MemoryHandler:
        """Return a handler with another config over the same stored sessions (e.g. new encryption keys)."""
        other = MemoryHandler(config, clock=self._clock)
        other._rows, other._lock, other._leases = self._rows, self._lock, self._leases
        return other

    def __len__(self) -> int:
        """The number of stored rows, expired or not (handy in tests)."""
        return len(self._rows)

    @contextmanager
    def connect(self) -> Iterator[None]:
        yield None

    def _fetch(self, conn: None, key: str, now: int) -> Record | None:
        with self._lock:
            row = self._rows.get(key)
            return dataclasses.replace(row) if row is not None and row.expires_at > now else None

    def _insert(self, conn: None, record: Record) -> None:
        with self._lock:
            if record.key in self._rows:
                raise KeyError("duplicate session key")
            self._put(record)

    def _update(self, conn: None, record: Record, *, expected_version: int, now: int) -> bool:
        with self._lock:
            row = self._rows.get(record.key)
            if row is None or row.version != expected_version or row.expires_at <= now:
                return False
            self._put(record)
            return True

    def _merge(self, conn: None, key: str, now: int, build: Callable[[Record], Merged], *, held: bool) -> Merged | None:
        with self._lock:
            row = self._rows.get(key)
            if row is None or row.expires_at <= now:
                return None
            merged = build(dataclasses.replace(row))
            if merged[0].key != key:  # a change of privilege: the session moves to a new key
                self._delete(conn, key)
            self._put(merged[0])
            return merged

    def _touch(self, conn: None, key: str, *, version: int, last_activity: int, expires_at: int, now: int) -> bool:
        with self._lock:
            row = self._rows.get(key)
            if row is None or row.expires_at <= now or row.version != version:
                return False
            row.last_activity = last_activity
            row.expires_at = expires_at
            return True

    def _delete(self, conn: None, key: str) -> bool:
        with self._lock:
            row = self._rows.pop(key, None)
            self._leases.pop(key, None)
            return row is not None

    def _delete_expired(self, conn: None, now: int, limit: int) -> int:
        with self._lock:
            expired = sorted((r for r in self._rows.values() if r.expires_at <= now), key=lambda r: r.expires_at)
            for row in expired[:limit]:
                self._delete(conn, row.key)
            return min(len(expired), limit)

    def _fetch_user(self, conn: None, user_id: str, now: int) -> list[Record]:
        with self._lock:
            rows = [dataclasses.replace(r) for r in self._rows.values() if r.user_id == user_id and r.expires_at > now]
        return sorted(rows, key=lambda r: r.last_activity, reverse=True)

    def _delete_user(self, conn: None, user_id: str, except_key: str | None) -> int:
        with self._lock:
            doomed = [r.key for r in self._rows.values() if r.user_id == user_id and r.key != except_key]
            for key in doomed:
                self._delete(conn, key)
            return len(doomed)

    def _stats(self, conn: None, now: int) -> StoreStats:
        with self._lock:
            live = [r for r in self._rows.values() if r.expires_at > now]
            users = {r.user_id for r in live if r.user_id is not None}
            return StoreStats(len(live), len(self._rows) - len(live), len(users), None)

    def _acquire(self, conn: None, key: str, id_hash: str, owner: str, now: int) -> tuple[LockState, Record | None]:
        with self._lock:
            row = self._fetch(conn, key, now)
            if row is None or id_hash not in (row.id_hash, row.previous_id_hash):
                return LockState.MISSING, None
            now_ms = int(self.clock() * 1000)
            lease = self._leases.get(row.key)
            if lease is not None and lease[1] > now_ms:
                return LockState.BUSY, None
            self._leases[row.key] = (owner, now_ms + int(self.config.block_lock_seconds * 1000))
            return LockState.LOCKED, row

    def _release(self, conn: None, key: str, owner: str, *, commit: bool) -> None:
        with self._lock:
            if self._leases.get(key, ("", 0))[0] == owner:
                del self._leases[key]

    def _put(self, record: Record) -> None:
        self._rows[record.key] = dataclasses.replace(record)
