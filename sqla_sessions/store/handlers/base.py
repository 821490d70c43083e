"""What every handler promises, written once: load, save (compare-and-set, else a locked three-way
merge), expiry, devices, GC.

A concrete handler supplies only row primitives (`_fetch`, `_insert`, `_update`, `_merge`, …) that
run on a connection it opens in `connect()`. The semantics here never touch SQL, so the memory and
database handlers cannot drift apart. The `*_on` methods run one operation on a connection the
caller holds: a blocking request (its lock lives on that connection) or the async store (a
connection of its own, in a worker thread or through `AsyncConnection.run_sync`).
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from sqlalchemy.exc import DBAPIError, IntegrityError

from ...config import SessionConfig
from ...core.codec import CorruptPayload, PayloadCodec
from ...core.ids import is_valid_session_id, is_valid_session_key, secret_hash, secret_matches, session_key_of
from ...core.records import Record, SaveAction, SessionInfo, StoreStats
from ...core.session import Session
from ...core.unit import Expiry, Saved, UnitOfWork
from ..batching import ThreadBatcher
from ..fairshare import FairShare, no_hold
from .contract import LockState, LockStrategy, Merged, SessionHandler
from .writing import Writing

__all__ = ["BaseHandler", "LockState", "LockStrategy", "Merged", "SessionHandler"]

logger = logging.getLogger(__name__)

C = TypeVar("C")
T = TypeVar("T")

#: A read whose connection failed within this many seconds found it dead (sent again on a fresh one);
#: later, the server did not answer in time (not asked twice).
_FOUND_DEAD_WITHIN = 1.0


class BaseHandler(Writing[C]):
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
        (`sqla_sessions.store.batching`); off for both by default here, on where the handler measures a win."""
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
        (`sqla_sessions.store.fairshare`): a save alone may wait for its row's lock, and a burst of one
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

    def acquire_on(self, conn: C, session_id: str, owner: str) -> tuple[LockState, Session | None]:
        """One attempt to lock a session for a blocking request (see `sqla_sessions.store.locking`)."""
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


def legacy_marker_key(user_id: str) -> str:
    """The key of the row refusing a user's old remember tokens: `~` and 31 hex digits, never a
    session key (32 hex digits), so no cookie can open it."""
    return "~" + hashlib.sha256(b"legacy remember token\x00" + user_id.encode()).hexdigest()[:31]


def opens(session_id: str, record: Record) -> bool:
    """Whether *session_id*'s secret opens *record*: its current id, or the one a `regenerate(destroy=False)`
    keeps reaching it (both compared in constant time)."""
    previous = record.previous_id_hash
    current = secret_matches(session_id, record.id_hash)
    return current or (previous is not None and secret_matches(session_id, previous))
