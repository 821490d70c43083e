"""What every handler promises, written once: load, save (compare-and-set, else a locked three-way
merge), expiry, devices, GC.

A concrete handler supplies only row primitives (`_fetch`, `_insert`, `_update`, `_merge`, …) that
run on a connection it opens in `connect()`. The semantics here never touch SQL, so the memory and
database handlers cannot drift apart. The `*_on` methods run one operation on a connection the
caller holds: a blocking request (its lock lives on that connection) or the async store (a
connection of its own, in a worker thread or through `AsyncConnection.run_sync`).
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import logging
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from typing import Any, Generic, Protocol, TypeVar, runtime_checkable

from sqlalchemy.exc import DBAPIError, IntegrityError

from ..batching import ThreadBatcher
from ..codec import CorruptPayload, PayloadCodec
from ..config import SessionConfig
from ..errors import SessionInterrupted
from ..fairshare import FairShare, no_hold
from ..ids import is_valid_session_id, is_valid_session_key, secret_hash, secret_matches, session_key_of
from ..merge import apply_changes
from ..records import Record, SaveAction, SessionInfo, StoreStats
from ..session import Session
from ..unit import Expiry, Saved, UnitOfWork, first_row, successor

logger = logging.getLogger("sqla_sessions")

C = TypeVar("C")
T = TypeVar("T")

#: A read whose connection failed within this many seconds found it dead (sent again on a fresh one);
#: later, the server did not answer in time (not asked twice).
_FOUND_DEAD_WITHIN = 1.0
#: What `_merge` hands back: the row it wrote and the raw payload it stored.
Merged = tuple[Record, dict[str, Any]]


class LockStrategy(enum.Enum):
    """How a blocking request excludes the others of its session."""

    ROW = "row"
    """The database holds a row lock for the request (waits in the database, hand-off at commit)."""
    LEASE = "lease"
    """A lease on the row, polled for (SQLite, memory: no row locks there)."""


class LockState(enum.Enum):
    """The outcome of one attempt to lock a session for a blocking request."""

    LOCKED = "locked"
    BUSY = "busy"
    """Leased by another request: poll again (leases only; a row lock waits in the database)."""
    MISSING = "missing"
    """No live session under that id: nothing to lock."""


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

    def save(
        self,
        session: Session,
        *,
        end_of_request: bool = False,
        record_activity: bool = True,
        job_id: str | None = None,
    ) -> SaveAction:
        """Persist the session's changes, merged onto the current row.

        *record_activity* False (background jobs) leaves `last_activity` and the expiry as they are.
        *job_id*: the write is refused (`SessionInterrupted`) if the stored session lists this job.
        """

    def destroy(self, key: str) -> bool:
        """Delete the session with this stable key; True if a row was deleted."""

    def gc(
        self,
        batch_size: int | None = None,
        *,
        on_batch: Callable[[int], None] | None = None,
        max_batches: int | None = None,
        pause: float | None = None,
    ) -> int:
        """Delete expired sessions in bounded batches (at most *max_batches*, *pause* seconds apart:
        by default `gc_pause`); return how many were deleted."""

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
        self.expiry = Expiry(self.config)
        self._clock = clock
        # Loads and saves of concurrent threads run together where it pays (`DatabaseHandler`).
        self._loads: ThreadBatcher[str, Session] | None = None
        self._saves: ThreadBatcher[UnitOfWork, Saved | None] | None = None
        self.share = FairShare(self.config)  # long holds of the pool by session and client address

    def batch_concurrent_calls(self, *, loads: bool, saves: bool, in_flight: int = 2, max_size: int = 64) -> None:
        """Run the `load`s and `save`s that threads make at the same moment as one statement per batch
        (`sqla_sessions.batching`); off for both by default here, on where the handler measures a win."""
        self._loads = ThreadBatcher(self._load_batch, max_in_flight=in_flight, max_size=max_size) if loads else None
        self._saves = ThreadBatcher(self._save_batch, max_in_flight=in_flight, max_size=max_size) if saves else None

    def _load_batch(self, session_ids: list[str]) -> list[Session | Exception]:
        return self.read(self.load_many_on, session_ids)

    def read(self, fn: Callable[..., T], *args: Any) -> T:
        """`fn(connection, *args)` for a read, on a pooled connection; once more on a fresh one when that
        connection was found dead at once (the server restarted, or ended it: the pool then replaces
        its older connections too). A read can always be sent again; a write's outcome would be
        unknown. A server that does not answer is not asked twice: its timeout is the answer."""
        started = time.monotonic()
        try:
            with self.connect() as conn:
                return fn(conn, *args)
        except DBAPIError as exc:
            if not exc.connection_invalidated or time.monotonic() - started > _FOUND_DEAD_WITHIN:
                raise
        with self.connect() as conn:
            return fn(conn, *args)

    def _save_batch(self, units: list[UnitOfWork]) -> list[Saved | Exception | None]:
        with self.connect() as conn:
            return self.write_many_on(conn, units)

    # -- row primitives ------------------------------------------------------------------------------

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

        Must never wait for a row lock (a batch would wait with it, see `sqla_sessions.batching`): a
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

    # -- public API ------------------------------------------------------------------------------

    def load(self, session_id: str | None) -> Session:
        fresh = self.fresh_unless_valid(session_id)
        if fresh is not None:
            return fresh
        assert session_id is not None
        if self._loads is not None:
            return self._loads.submit(session_id)
        return self.read(self.load_on, session_id)

    def load_by_key(self, key: str) -> Session | None:
        if not is_valid_session_key(key):
            raise ValueError("not a session key")
        with self.connect() as conn:
            return self.load_by_key_on(conn, key)

    def save(
        self,
        session: Session,
        *,
        end_of_request: bool = False,
        record_activity: bool = True,
        job_id: str | None = None,
    ) -> SaveAction:
        try:
            unit = self.plan_save(
                session, end_of_request=end_of_request, record_activity=record_activity, job_id=job_id
            )
            if unit is None:
                action = SaveAction.NOTHING
            else:
                batched = None
                if self._saves is not None and self.batches_writes and self.batchable(unit):
                    batched = self._saves.submit(unit)
                if batched is not None:
                    saved = batched
                else:
                    saved = self._write_in_turn(unit)
                session.adopt(saved, unit)
                action = saved.action
        except BaseException as exc:
            session.run_saved_callbacks(exc)
            raise
        session.run_saved_callbacks(None)
        return action

    def _write_in_turn(self, unit: UnitOfWork) -> Saved:
        """`write_on` a connection of its own, once the session has a free slot of its share of the pool
        (`sqla_sessions.fairshare`): a save alone may wait for its row's lock, and a burst of one
        session's saves waits its turn here, holding no connection, instead of taking the pool."""
        loaded = unit.loaded
        wait = self.config.write_wait_seconds
        turn = no_hold if loaded is None else self.share.hold_save(loaded.key, unit.ip_address, wait=wait)
        try:
            with self.connect() as conn:
                return self.write_on(conn, unit)
        finally:
            turn()

    def destroy(self, key: str) -> bool:
        with self.connect() as conn:
            return self._delete(conn, key)

    revoke = destroy

    def gc(
        self,
        batch_size: int | None = None,
        *,
        on_batch: Callable[[int], None] | None = None,
        max_batches: int | None = None,
        pause: float | None = None,
    ) -> int:
        limit = batch_size or self.config.gc_batch_size
        # A pause between batches bounds the sweep's share of the database (its WAL and page writes),
        # as vacuum_cost_delay does for autovacuum: live requests keep their latency on a large table.
        pause = self.config.gc_pause if pause is None else pause
        now = self.now()  # fixed, so a sweep ends even while more sessions keep expiring
        total = batches = 0
        while max_batches is None or batches < max_batches:
            with self.connect() as conn:
                deleted = self._delete_expired(conn, now, limit)
            total += deleted
            batches += 1
            if on_batch is not None:
                on_batch(deleted)
            if deleted < limit:
                break
            if pause > 0 and (max_batches is None or batches < max_batches):
                time.sleep(pause)
        return total

    def check(self) -> None:
        """Nothing to check for an in-memory store; `DatabaseHandler.check` looks at the database."""

    def stats(self) -> StoreStats:
        """Counts for monitoring (`sqla-sessions stats`): one aggregate query, plus the size where known."""
        with self.connect() as conn:
            return self._stats(conn, self.now())

    def list_sessions(self, user_id: object) -> list[SessionInfo]:
        with self.connect() as conn:
            records = self._fetch_user(conn, str(user_id), self.now())
        return [SessionInfo.from_record(r) for r in records]

    def revoke_user(self, user_id: object, *, except_key: str | None = None) -> int:
        user = str(user_id)
        with self.connect() as conn:
            deleted = self._delete_user(conn, user, except_key)
            self._refuse_legacy_tokens(conn, user)
        return deleted

    # -- Flask-Login's remember_token cookies from before sqla_sessions (config.legacy_remember_until) --

    def legacy_tokens_refused(self, user_id: object) -> bool:
        """True when `revoke_user()` ran for this user while old remember tokens were accepted."""
        if self.config.legacy_remember_until_seconds is None:
            return True  # not accepted at all
        with self.connect() as conn:
            return self._fetch(conn, legacy_marker_key(str(user_id)), self.now()) is not None

    def _refuse_legacy_tokens(self, conn: C, user: str) -> None:
        """Store a marker row refusing *user*'s old remember tokens until `legacy_remember_until`.

        A token carries no issue date, so a revocation refuses every token of the user from then on.
        The row has no `user_id` (device lists and `revoke_user` do not see it), a key no session id
        can name, and expires with the window, so GC removes it when it is no longer needed.
        """
        until = self.config.legacy_remember_until_seconds
        now = self.now()
        if until is None or until <= now:
            return
        key = legacy_marker_key(user)
        marker = Record(key, "", None, b"", 1, now, now, until)
        self._delete(conn, key)  # one that expired earlier (the window was extended since)
        try:
            self._insert(conn, marker)
        except (KeyError, IntegrityError):
            pass  # a concurrent revocation stored it first

    def now(self) -> int:
        """The handler's clock in unix seconds: what expiry is computed with."""
        return int(self._clock())

    def clock(self) -> float:
        """The handler's clock in (fractional) unix seconds: leases are timed in milliseconds with it."""
        return self._clock()

    # -- one operation on a connection the caller holds ----------------------------------------------

    def choose_session_id(self, candidates: Sequence[str]) -> str | None:
        """The presented id to use: the only one, without I/O; of several (a cookie planted from a
        sibling domain beside the real one), the first that opens a live session, else the first."""
        if len(candidates) <= 1:
            return candidates[0] if candidates else None
        with self.connect() as conn:
            return self.choose_on(conn, candidates)

    def choose_on(self, conn: C, candidates: Sequence[str]) -> str:
        """`choose_session_id` on a connection the caller holds: one primary-key read per candidate."""
        now = self.now()
        for candidate in candidates:
            if is_valid_session_id(candidate):
                record = self._fetch(conn, session_key_of(candidate), now)
                if record is not None and opens(candidate, record):
                    return candidate
        return candidates[0]

    def fresh_unless_valid(self, session_id: str | None) -> Session | None:
        """A new session for a missing or malformed id (no I/O); None when the id must be looked up."""
        if not session_id:
            return Session(self)
        if not is_valid_session_id(session_id):
            logger.warning("malformed session cookie ignored; starting a new session")
            return Session(self)
        return None

    def load_on(self, conn: C, session_id: str) -> Session:
        return self._open(session_id, self._fetch(conn, session_key_of(session_id), self.now()))

    def load_many_on(self, conn: C, session_ids: list[str]) -> list[Session | Exception]:
        """`load_on` for the well-formed ids of several concurrent requests, with one read of their rows;
        one outcome per id, in order (an error belongs to its request alone)."""
        if len(session_ids) == 1:
            return [self.load_on(conn, session_ids[0])]
        keys = list(dict.fromkeys(session_key_of(session_id) for session_id in session_ids))
        records = self._fetch_many(conn, keys, self.now())
        outcomes: list[Session | Exception] = []
        for session_id in session_ids:
            try:
                outcomes.append(self._open(session_id, records.get(session_key_of(session_id))))
            except Exception as exc:
                outcomes.append(exc)
        return outcomes

    def _open(self, session_id: str, record: Record | None) -> Session:
        """The session *record* holds if *session_id* opens it, else a new one."""
        if record is None or not opens(session_id, record):
            logger.warning("unknown or expired session id; starting a new session")
            return Session(self)
        raw = self._decode(record)
        if raw is None:
            return Session(self)
        return Session.from_record(self, session_id, record, raw)

    def load_by_key_on(self, conn: C, key: str) -> Session | None:
        record = self._fetch(conn, key, self.now())
        if record is None:
            return None
        raw = self._decode(record)
        return None if raw is None else Session.from_record(self, None, record, raw)

    def plan_save(
        self, session: Session, *, end_of_request: bool, record_activity: bool = True, job_id: str | None = None
    ) -> UnitOfWork | None:
        """The session's unit of work, or None when the save needs no I/O at all (the common read-only request).

        Encodes before touching the database: an unsupported value fails here, naming its key.
        """
        unit = session.unit_of_work(end_of_request=end_of_request, record_activity=record_activity, job_id=job_id)
        if unit.writes:
            return unit
        loaded = unit.loaded
        if loaded is None:
            return None
        if record_activity and self.expiry.activity_due(loaded, self.now()):
            return unit
        return None

    def write_on(self, conn: C, unit: UnitOfWork, *, held: bool = False) -> Saved:
        """Write *unit*: compare-and-set on the loaded version; after a lost race (or for a change of
        privilege), a three-way merge onto the current row under its lock.

        *held*: *conn* is a blocking request's, in the transaction holding the row's lock.
        Raises `SessionInterrupted` (nothing written) when the session is gone or the job already landed.
        """
        now = self.now()
        deleted = unit.destroy_key is not None and self._delete(conn, unit.destroy_key)
        loaded = unit.loaded
        if loaded is None:
            if unit.new_id_hash is None or unit.new_key is None:
                return Saved(SaveAction.DELETED if deleted else SaveAction.NOTHING, None, {}, False)
            record = first_row(unit, key=unit.new_key, now=now, expiry=self.expiry, dumps=self.codec.dumps)
            self._insert(conn, record)
            return Saved(SaveAction.INSERTED, record, dict(unit.changes.updates), True)
        if not unit.writes:
            return self._touch_if_due(conn, loaded, now)

        written: Merged | None = None
        action = SaveAction.UPDATED
        if unit.new_key is None:
            written = successor(
                loaded, unit.changes.base, unit, key=loaded.key, now=now, expiry=self.expiry, dumps=self.codec.dumps
            )
            if not self._update(conn, written[0], expected_version=loaded.version, now=now):
                written, action = None, SaveAction.MERGED
        if written is None:
            # Someone else saved since we loaded (or this is a change of privilege, which moves the row
            # to a new key): merge onto the current row under its lock.
            key = unit.new_key or loaded.key

            def build(current: Record) -> Merged:
                try:
                    current_raw = self.codec.loads(current.payload, current.key, current.user_id, current.version)
                except CorruptPayload as exc:
                    raise SessionInterrupted(f"the stored session became unreadable: {exc}") from None
                return successor(
                    current, current_raw, unit, key=key, now=now, expiry=self.expiry, dumps=self.codec.dumps
                )

            written = self._merge(conn, loaded.key, now, build, held=held)
            if written is None:
                if unit.new_key is None or not (unit.user_changed and unit.user_id is not None):
                    # Only a login (credentials checked in this request) may start afresh; a change of
                    # privilege without one must never bring back a session that was logged out or revoked.
                    gone = "the session was destroyed, expired or cut off by a login since it was loaded"
                    raise SessionInterrupted(f"{gone}; nothing was saved")
                # A login whose previous session ended meanwhile (the same form submitted twice, a
                # logout in another tab): it starts a session of its own, under its new id and key,
                # from what this request saw. Nothing that held the old session reaches it.
                raw = apply_changes(unit.changes.base, unit.changes)
                record = first_row(unit, key=unit.new_key, now=now, expiry=self.expiry, dumps=self.codec.dumps, raw=raw)
                self._insert(conn, record)
                return Saved(SaveAction.INSERTED, record, raw, True)
        record, raw = written
        return Saved(action, record, raw, record.expires_at != loaded.expires_at)

    @property
    def batches_writes(self) -> bool:
        """Whether concurrent saves are written with one statement (`write_many_on`); not here."""
        return False

    def batchable(self, unit: UnitOfWork) -> bool:
        """Whether `write_many_on` can write *unit* with others: a first write, changes to a loaded row
        under its own key, a touch (the saves of nearly every request). Logins, regenerations and
        touches that reseal the payload with a newer key are saved alone."""
        if unit.destroy_key is not None:
            return False
        loaded = unit.loaded
        if loaded is None:
            return unit.new_key is not None and unit.new_id_hash is not None
        return unit.new_key is None and (unit.writes or not self.codec.needs_reseal(loaded.payload))

    def write_many_on(self, conn: C, units: list[UnitOfWork]) -> list[Saved | Exception | None]:
        """Write the `batchable` units of several concurrent requests, without ever waiting for a row
        lock: the first writes with one INSERT for all (`_insert_many`), the changes with one
        compare-and-set UPDATE (`_update_many`), the touches with one more (`_touch_many`).

        Each statement commits by itself. One outcome per unit, in order: what was saved; an error
        that belongs to that request alone (a job already applied; the lost connection of its
        statement, whose outcome is then unknown: see `_each_told_its_own`); or None: not written
        here (a lost race, a row locked by another transaction, a second unit of a row already in
        the batch, a unit that is not batchable, a statement the database refused, a statement not
        sent after the connection was lost), and its request saves it alone with `write_on`
        (compare-and-set, then the merge under the lock), where its own error is raised.
        """
        outcomes: list[Saved | Exception | None] = [None] * len(units)
        now = self.now()
        inserts: dict[str, tuple[int, Record, UnitOfWork]] = {}
        changes: dict[str, tuple[int, Merged, Record]] = {}
        touches: dict[str, tuple[int, Record, Record]] = {}
        for index, unit in enumerate(units):
            if not self.batchable(unit):
                continue
            loaded = unit.loaded
            try:
                if loaded is None:
                    assert unit.new_key is not None
                    record = first_row(unit, key=unit.new_key, now=now, expiry=self.expiry, dumps=self.codec.dumps)
                    inserts[record.key] = (index, record, unit)
                elif loaded.key in changes or loaded.key in touches:
                    continue  # one write per row and statement: the others go alone, after it
                elif unit.writes:
                    written = successor(
                        loaded, unit.changes.base, unit, key=loaded.key, now=now, expiry=self.expiry,
                        dumps=self.codec.dumps,
                    )  # fmt: skip
                    changes[loaded.key] = (index, written, loaded)
                elif not self.expiry.activity_due(loaded, now):
                    outcomes[index] = Saved(SaveAction.NOTHING, None, {}, False)
                else:
                    expires_at = self.expiry.expires_at(loaded.created_at, now, loaded)
                    touched = dataclasses.replace(loaded, last_activity=now, expires_at=expires_at)
                    touches[loaded.key] = (index, touched, loaded)
            except Exception as exc:
                outcomes[index] = exc

        def insert() -> None:
            for key in self._insert_many(conn, [record for _, record, _ in inserts.values()]):
                index, record, unit = inserts[key]
                outcomes[index] = Saved(SaveAction.INSERTED, record, dict(unit.changes.updates), True)

        def change() -> None:
            for key in self._update_many(conn, [(w[0], loaded.version) for _, w, loaded in changes.values()], now):
                index, (record, raw), loaded = changes[key]
                outcomes[index] = Saved(SaveAction.UPDATED, record, raw, record.expires_at != loaded.expires_at)

        def touch() -> None:
            for key in self._touch_many(conn, [(t, loaded.version) for _, t, loaded in touches.values()], now):
                index, touched, _ = touches[key]
                outcomes[index] = Saved(SaveAction.TOUCHED, touched, {}, True)

        statements = [
            (insert, [index for index, _, _ in inserts.values()]),
            (change, [index for index, _, _ in changes.values()]),
            (touch, [index for index, _, _ in touches.values()]),
        ]
        _each_told_its_own(statements, outcomes)
        return outcomes

    def acquire_on(self, conn: C, session_id: str, owner: str) -> tuple[LockState, Session | None]:
        """One attempt to lock a session for a blocking request (see `sqla_sessions.locking`)."""
        state, record = self._acquire(conn, session_key_of(session_id), secret_hash(session_id), owner, self.now())
        if record is None:
            return state, None
        raw = self._decode(record)
        if raw is None:
            self._release(conn, record.key, owner, commit=False)
            return LockState.MISSING, None
        return state, Session.from_record(self, session_id, record, raw)

    def release_on(self, conn: C, key: str, owner: str, *, commit: bool) -> None:
        """End a blocking request's lock (commit its transaction, or roll it back; drop the lease)."""
        self._release(conn, key, owner, commit=commit)

    # -- helpers ---------------------------------------------------------------------------------------

    def _decode(self, record: Record) -> dict[str, Any] | None:
        try:
            return self.codec.loads(record.payload, record.key, record.user_id, record.version)
        except CorruptPayload as exc:
            logger.warning("unreadable session payload ignored (%s); starting a new session", exc)
            return None

    def _touch_if_due(self, conn: C, record: Record, now: int) -> Saved:
        if not self.expiry.activity_due(record, now):
            return Saved(SaveAction.NOTHING, None, {}, False)
        expires_at = self.expiry.expires_at(record.created_at, now, record)
        if self.codec.needs_reseal(record.payload):
            return self._reseal(conn, record, now, expires_at)
        if not self._touch(conn, record.key, version=record.version, last_activity=now, expires_at=expires_at, now=now):
            if self._fetch(conn, record.key, now) is None:  # the rare path: tell "gone" from "written meanwhile"
                raise SessionInterrupted("the session was destroyed or expired since it was loaded")
            return Saved(SaveAction.NOTHING, None, {}, False)  # written meanwhile: that write is newer
        touched = dataclasses.replace(record, last_activity=now, expires_at=expires_at)
        return Saved(SaveAction.TOUCHED, touched, {}, True)

    def _reseal(self, conn: C, record: Record, now: int, expires_at: int) -> Saved:
        """A due touch of a row sealed with an older key (or layout): write it sealed with the newest,
        so rotating the old key out later logs nobody out who was active since."""
        raw = self.codec.loads(record.payload, record.key, record.user_id, record.version)
        version = record.version + 1
        payload = self.codec.dumps(raw, record.key, record.user_id, version)
        resealed = dataclasses.replace(
            record, payload=payload, version=version, last_activity=now, expires_at=expires_at
        )
        if not self._update(conn, resealed, expected_version=record.version, now=now):
            return Saved(SaveAction.NOTHING, None, {}, False)  # written meanwhile: that write resealed it
        return Saved(SaveAction.TOUCHED, resealed, {}, True)


def legacy_marker_key(user_id: str) -> str:
    """The key of the row refusing a user's old remember tokens: `~` and 31 hex digits, never a
    session key (32 hex digits), so no cookie can open it."""
    return "~" + hashlib.sha256(b"legacy remember token\x00" + user_id.encode()).hexdigest()[:31]


def _each_told_its_own(statements: list[tuple[Callable[[], None], list[int]]], outcomes: list[Any]) -> None:
    """Run the statements of a batch in order, each committing by itself, and tell every request what
    became of its own save, whatever breaks between them.

    The `*_many` primitives raise only for a lost connection, when the statement's outcome is unknown
    (the server may have committed it before the reply was lost): its requests get that error, and
    their saves must not be written again (a compare-and-set retried against its own write would
    merge the save onto itself). The saves of the statements already run are committed and keep
    their outcomes; those of the statements not yet sent stay None: written nothing, they go alone,
    on a fresh connection, as any save the batch left.
    """
    for run, indexes in statements:
        if not indexes:
            continue  # nothing of this kind in the batch: no statement
        try:
            run()
        except Exception as exc:
            for index in indexes:
                if outcomes[index] is None:
                    outcomes[index] = exc
            return


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


def opens(session_id: str, record: Record) -> bool:
    """Whether *session_id*'s secret opens *record*: its current id, or the one a `regenerate(destroy=False)`
    keeps reaching it (both compared in constant time)."""
    previous = record.previous_id_hash
    current = secret_matches(session_id, record.id_hash)
    return current or (previous is not None and secret_matches(session_id, previous))
