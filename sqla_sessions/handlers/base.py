"""What every handler promises, written once: load, per-key merge on save, expiry, devices, GC.

A concrete handler supplies only row primitives (`_fetch`, `_insert`, `_update`, `_merge`, …) that
run on a connection it opens in `_connect()`. The semantics here never touch SQL, so the memory and
database handlers cannot drift apart, and an async handler can run `_load_on`/`_save_on` on a
connection of its own (`AsyncConnection.run_sync`).
"""

from __future__ import annotations

import logging
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any, Generic, Protocol, TypeVar, runtime_checkable

from ..codec import CorruptPayload, PayloadCodec
from ..config import SessionConfig
from ..errors import SessionInterrupted
from ..ids import generate_session_key, hash_session_id, is_valid_session_id, is_valid_session_key
from ..records import Record, SaveAction, SessionInfo, StoreStats
from ..schema import IP_ADDRESS_LENGTH, USER_AGENT_LENGTH
from ..session import Session

logger = logging.getLogger("sqla_sessions")

C = TypeVar("C")
#: What `_merge` hands back: the row it wrote and the raw payload it stored.
Merged = tuple[Record, dict[str, Any]]


@runtime_checkable
class SessionHandler(Protocol):
    """The contract every handler (database, memory) fulfils."""

    config: SessionConfig

    def now(self) -> int:
        """The handler's clock in unix seconds."""

    def load(self, session_id: str | None) -> Session:
        """Return the live session for a cookie id, or a new empty one (never raises for bad input)."""

    def load_by_key(self, key: str) -> Session | None:
        """Return the live session with this stable key, or None (used by background jobs)."""

    def save(self, session: Session, *, end_of_request: bool = False, record_activity: bool = True) -> SaveAction:
        """Persist the session's changes, merged per key onto the current row.

        *record_activity* False (background jobs) leaves `last_activity` and the expiry as they are.
        """

    def destroy(self, key: str) -> bool:
        """Delete the session with this stable key; True if a row was deleted."""

    def gc(
        self,
        batch_size: int | None = None,
        *,
        on_batch: Callable[[int], None] | None = None,
        max_batches: int | None = None,
    ) -> int:
        """Delete expired sessions in bounded batches (at most *max_batches*); return how many were deleted."""

    def list_sessions(self, user_id: object) -> list[SessionInfo]:
        """Return a user's live sessions, most recently active first."""

    def revoke(self, key: str) -> bool:
        """Log one session out (delete it by stable key)."""

    def revoke_user(self, user_id: object, *, except_key: str | None = None) -> int:
        """Log a user out everywhere, optionally keeping one session; return how many were deleted."""


class BaseHandler(ABC, Generic[C]):
    """Session semantics over abstract row primitives running on a connection of type `C`."""

    def __init__(self, config: SessionConfig | None = None, *, clock: Callable[[], float] = time.time) -> None:
        self.config = config or SessionConfig()
        self.codec = PayloadCodec(self.config)
        self._clock = clock

    # -- row primitives ------------------------------------------------------------------------------

    @abstractmethod
    def _connect(self) -> AbstractContextManager[C]:
        """Open a connection for one operation (each primitive on it is atomic by itself)."""

    @abstractmethod
    def _fetch(self, conn: C, *, id_hash: str | None = None, key: str | None = None, now: int) -> Record | None:
        """Return the unexpired row with this id hash or key."""

    @abstractmethod
    def _insert(self, conn: C, record: Record) -> None:
        """Insert a new row."""

    @abstractmethod
    def _update(self, conn: C, record: Record, *, expected_version: int, now: int) -> bool:
        """Compare-and-set: write *record* if the row still has *expected_version* and is unexpired."""

    @abstractmethod
    def _merge(self, conn: C, key: str, now: int, build: Callable[[Record], Merged]) -> Merged | None:
        """Lock the unexpired row, let *build* compute its successor from it, write that; None if gone."""

    @abstractmethod
    def _touch(self, conn: C, key: str, *, last_activity: int, expires_at: int, now: int) -> bool:
        """Refresh activity and expiry of an unexpired row; False if it is gone."""

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

    #: "row": the database holds a row lock for the request (waits in the database, hand-off at commit);
    #: "lease": a lease on the row, polled for (SQLite, memory: no row locks there).
    lock_strategy: str = "lease"

    @abstractmethod
    def _acquire(self, conn: C, id_hash: str, owner: str, now: int) -> tuple[str, Record | None]:
        """Lock the live row with this id hash for a blocking request.

        Return ("locked", row), ("busy", None) — only for leases, the caller polls — or ("missing", None).
        A row lock waits in the database up to `block_wait_seconds` and raises `LockTimeout` past it.
        """

    @abstractmethod
    def _release(self, conn: C, key: str | None, owner: str, *, commit: bool) -> None:
        """End what `_acquire` started: commit or roll back the row lock's transaction, or drop the lease."""

    # -- public API ------------------------------------------------------------------------------

    def load(self, session_id: str | None) -> Session:
        fresh = self._fresh_unless_valid(session_id)
        if fresh is not None:
            return fresh
        assert session_id is not None
        with self._connect() as conn:
            return self._load_on(conn, session_id)

    def load_by_key(self, key: str) -> Session | None:
        if not is_valid_session_key(key):
            raise ValueError("not a session key")
        with self._connect() as conn:
            record = self._fetch(conn, key=key, now=self.now())
        if record is None:
            return None
        raw = self._decode(record)
        return None if raw is None else Session._from_record(self, None, record, raw)

    def save(self, session: Session, *, end_of_request: bool = False, record_activity: bool = True) -> SaveAction:
        try:
            plan = self._plan_save(session, end_of_request, record_activity)
            if plan is None:
                action = SaveAction.NOTHING
            else:
                with self._connect() as conn:
                    action = self._save_on(conn, session, *plan)
        except BaseException as exc:
            session._run_after_save(exc)
            raise
        session._run_after_save(None)
        return action

    def destroy(self, key: str) -> bool:
        with self._connect() as conn:
            return self._delete(conn, key)

    revoke = destroy

    def gc(
        self,
        batch_size: int | None = None,
        *,
        on_batch: Callable[[int], None] | None = None,
        max_batches: int | None = None,
    ) -> int:
        limit = batch_size or self.config.gc_batch_size
        now = self.now()  # fixed, so a sweep ends even while more sessions keep expiring
        total = batches = 0
        while max_batches is None or batches < max_batches:
            with self._connect() as conn:
                deleted = self._delete_expired(conn, now, limit)
            total += deleted
            batches += 1
            if on_batch is not None:
                on_batch(deleted)
            if deleted < limit:
                break
        return total

    def stats(self) -> StoreStats:
        """Counts for monitoring (`sqla-sessions stats`): one aggregate query, plus the size where known."""
        with self._connect() as conn:
            return self._stats(conn, self.now())

    def list_sessions(self, user_id: object) -> list[SessionInfo]:
        with self._connect() as conn:
            records = self._fetch_user(conn, str(user_id), self.now())
        return [SessionInfo.from_record(r) for r in records]

    def revoke_user(self, user_id: object, *, except_key: str | None = None) -> int:
        with self._connect() as conn:
            return self._delete_user(conn, str(user_id), except_key)

    # -- semantics, on an open connection ----------------------------------------------------------

    def now(self) -> int:
        """The handler's clock in unix seconds: what expiry is computed with."""
        return int(self._clock())

    def _expiry(self, created_at: int, now: int) -> int:
        expires = now + self.config.lifetime_seconds
        absolute = self.config.absolute_lifetime_seconds
        return expires if absolute is None else min(expires, created_at + absolute)

    def _decode(self, record: Record) -> dict[str, Any] | None:
        try:
            return self.codec.loads(record.payload, record.key)
        except CorruptPayload as exc:
            logger.warning("unreadable session payload ignored (%s); starting a new session", exc)
            return None

    def _fresh_unless_valid(self, session_id: str | None) -> Session | None:
        """A new session for a missing or malformed id (no I/O); None when the id must be looked up."""
        if not session_id:
            return Session(self)
        if not is_valid_session_id(session_id):
            logger.warning("malformed session cookie ignored; starting a new session")
            return Session(self)
        return None

    def _plan_save(
        self, session: Session, end_of_request: bool, record_activity: bool = True
    ) -> tuple[dict[str, Any], frozenset[str], bool] | None:
        """The changes to write, or None when the save needs no I/O at all (the common read-only request)."""
        if end_of_request:
            session._end_request()
        # Encode before touching the database: an unsupported value fails here, naming its key.
        updates, removals = session._collect_changes()
        if not session._has_changes(updates, removals):
            record = session._record
            if not record_activity or record is None or not self._activity_due(record, self.now()):
                return None
        return updates, removals, record_activity

    def _acquire_session_on(self, conn: C, session_id: str, owner: str) -> tuple[str, Session | None]:
        """One attempt to lock a session for a blocking request (see `_acquire`)."""
        status, record = self._acquire(conn, hash_session_id(session_id), owner, self.now())
        if record is None:
            return status, None
        raw = self._decode(record)
        if raw is None:
            self._release(conn, record.key, owner, commit=False)
            return "missing", None
        return status, Session._from_record(self, session_id, record, raw)

    def _save_locked_on(self, conn: C, session: Session, owner: str, key: str) -> SaveAction:
        """Save a blocking request's session on the connection holding its lock, then release the lock."""
        plan = self._plan_save(session, True)
        action = SaveAction.NOTHING if plan is None else self._save_on(conn, session, *plan)
        self._release(conn, key, owner, commit=True)
        return action

    def _load_on(self, conn: C, session_id: str) -> Session:
        record = self._fetch(conn, id_hash=hash_session_id(session_id), now=self.now())
        if record is None:
            logger.warning("unknown or expired session id; starting a new session")
            return Session(self)
        raw = self._decode(record)
        if raw is None:
            return Session(self)
        return Session._from_record(self, session_id, record, raw)

    def _save_on(
        self, conn: C, session: Session, updates: dict[str, Any], removals: frozenset[str], record_activity: bool
    ) -> SaveAction:
        now = self.now()
        action = SaveAction.NOTHING
        if session._destroy_key is not None:
            self._delete(conn, session._destroy_key)
            session._destroy_key = None
            action = SaveAction.DELETED
        record = session._record
        if record is None:
            if not updates and session._user_id is None:
                return action
            return self._insert_new(conn, session, updates, now)

        if not session._has_changes(updates, removals):
            return self._touch_if_due(conn, session, record, now)
        # Activity is recorded at most once per touch_interval, on writes as on reads: an UPDATE that
        # leaves last_activity and expires_at alone changes no indexed column, so PostgreSQL can
        # update the row in place (a HOT update: no new index entries, less WAL, less vacuum).
        record_activity = record_activity and self._activity_due(record, now)
        id_changed = session._id_changed
        user_changed = session._user_id != session._base_user_id

        ip, agent = _client(session)
        new_raw = _apply(session._raw, updates, removals)
        written = Record(
            key=record.key,
            id_hash=hash_session_id(session.id) if id_changed else record.id_hash,
            user_id=session._user_id,
            payload=self.codec.dumps(new_raw, record.key),  # PayloadTooLarge: nothing written
            version=record.version + 1,
            created_at=record.created_at,
            last_activity=now if record_activity else record.last_activity,
            expires_at=self._expiry(record.created_at, now) if record_activity else record.expires_at,
            ip_address=ip or record.ip_address,
            user_agent=agent or record.user_agent,
        )
        if self._update(conn, written, expected_version=record.version, now=now):
            action = SaveAction.UPDATED
        else:
            # Someone else saved since we loaded (or the session is gone): merge our keys onto theirs.
            def build(current: Record) -> Merged:
                try:
                    current_raw = self.codec.loads(current.payload, current.key)
                except CorruptPayload as exc:
                    raise SessionInterrupted(f"the stored session became unreadable: {exc}") from None
                merged = _apply(current_raw, updates, removals)
                successor = Record(
                    key=current.key,
                    id_hash=written.id_hash if id_changed else current.id_hash,
                    user_id=session._user_id if user_changed else current.user_id,
                    payload=self.codec.dumps(merged, current.key),
                    version=current.version + 1,
                    created_at=current.created_at,
                    last_activity=now if record_activity else current.last_activity,
                    expires_at=self._expiry(current.created_at, now) if record_activity else current.expires_at,
                    ip_address=ip or current.ip_address,
                    user_agent=agent or current.user_agent,
                )
                return successor, merged

            merged = self._merge(conn, record.key, now, build)
            if merged is None:
                raise SessionInterrupted("the session was destroyed or expired since it was loaded; nothing was saved")
            written, new_raw = merged
            action = SaveAction.MERGED
        if session._forked_id_hash is not None:
            self._insert_fork(conn, session, record, now)
        session._rebase(written, new_raw, updates)
        session._expiry_moved = session._expiry_moved or record_activity
        return action

    def _insert_new(self, conn: C, session: Session, updates: dict[str, Any], now: int) -> SaveAction:
        key = generate_session_key()
        ip, agent = _client(session)
        record = Record(
            key=key,
            id_hash=hash_session_id(session.id),
            user_id=session._user_id,
            payload=self.codec.dumps(updates, key),
            version=1,
            created_at=now,
            last_activity=now,
            expires_at=self._expiry(now, now),
            ip_address=ip,
            user_agent=agent,
        )
        self._insert(conn, record)
        session._rebase(record, dict(updates), updates)
        return SaveAction.INSERTED

    def _insert_fork(self, conn: C, session: Session, base: Record, now: int) -> None:
        """regenerate(destroy=False): the old id keeps a copy of the session as it was loaded."""
        assert session._forked_id_hash is not None
        key = generate_session_key()
        fork = Record(
            key=key,
            id_hash=session._forked_id_hash,
            user_id=session._base_user_id,
            payload=self.codec.dumps(session._raw, key),
            version=1,
            created_at=base.created_at,
            last_activity=now,
            expires_at=self._expiry(base.created_at, now),
            ip_address=base.ip_address,
            user_agent=base.user_agent,
        )
        self._insert(conn, fork)

    def _activity_due(self, record: Record, now: int) -> bool:
        """Whether *record*'s activity may be recorded again (at most once per touch_interval)."""
        return now - record.last_activity >= self.config.touch_interval

    def _touch_if_due(self, conn: C, session: Session, record: Record, now: int) -> SaveAction:
        if not self._activity_due(record, now):
            return SaveAction.NOTHING
        expires_at = self._expiry(record.created_at, now)
        if not self._touch(conn, record.key, last_activity=now, expires_at=expires_at, now=now):
            raise SessionInterrupted("the session was destroyed or expired since it was loaded")
        record.last_activity = now
        record.expires_at = expires_at
        session._expiry_moved = True
        return SaveAction.TOUCHED


def _apply(base: dict[str, Any], updates: dict[str, Any], removals: frozenset[str]) -> dict[str, Any]:
    merged = {k: v for k, v in base.items() if k not in removals} if removals else dict(base)
    merged.update(updates)
    return merged


def _client(session: Session) -> tuple[str | None, str | None]:
    ip = session.ip_address
    agent = session.user_agent
    return (ip[:IP_ADDRESS_LENGTH] if ip else None), (agent[:USER_AGENT_LENGTH] if agent else None)
