"""Blocking sessions: requests of one session that run one at a time, opt-in per route.

PostgreSQL and MariaDB/MySQL: the request opens a transaction on a connection of its own and locks
its session row (`SELECT … FOR UPDATE`) before the app runs; the save happens in that transaction
and the commit releases the lock, so the next waiter proceeds at once (the database hands it over:
no polling). The wait is bounded in the database (`lock_timeout`; `innodb_lock_wait_timeout`), and
so is the hold: a connection idle in its transaction past `block_lock_seconds` is killed by the
database (`idle_in_transaction_session_timeout`; MariaDB's `idle_transaction_timeout`), which also
releases the lock of a crashed process at once.

SQLite has no row locks: a blocking request takes a lease on its row (`lease_owner`,
`lease_until = now + block_lock_seconds`) with one UPDATE, and a waiter polls (5 ms, growing to
50 ms) until the lease is free or `block_wait_seconds` pass. Leases exclude blocking requests of one
session across processes without serialising other sessions; a crashed holder's lease lapses after
`block_lock_seconds`. `MemoryHandler` uses the same lease scheme.

A request without a live session (no cookie, or an unknown one) has nothing to lock and runs as a
non-blocking one. While the lock is held, the session's own `save()` and `reload()` (and `asave()`,
`areload()`) run on the connection holding it, in its transaction; callbacks registered with
`on_saved` (jobs) run once that transaction has committed.

The logic of a blocking request is written once, in `LockedRequest`, as steps that each run on a
connection handed to them; `BlockingSession` drives the steps in plain code and
`aio.AsyncBlockingSession` in worker threads or on an `AsyncEngine` connection.

Non-blocking requests are never held up by a blocking one on SQLite; on PostgreSQL and MariaDB
their reads are not held up either, and their writes wait for the commit.
"""

from __future__ import annotations

import fnmatch
import logging
import secrets
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager
from typing import Any, TypeVar

from sqlalchemy.exc import DBAPIError

from ..config import SessionConfig
from ..core.ids import is_valid_session_id, session_key_of
from ..core.records import SaveAction
from ..core.session import Session
from ..core.unit import UnitOfWork
from ..errors import LockTimeout, SessionInterrupted
from .handlers.base import BaseHandler, LockState, LockStrategy

logger = logging.getLogger("sqla_sessions")

F = TypeVar("F", bound=Callable[..., Any])
MARKER = "__sqla_sessions_blocking__"
#: What `blocking=` accepts: path globs, or a callable given the ASGI scope / WSGI environ.
Blocking = Sequence[str] | Callable[[Any], bool] | None

#: Logged when a blocking request's saves are written without its lock (the hold outlived its bound).
LOST_LOCK = "blocking request held its session past block_lock_seconds; saved without the lock"

FIRST_POLL = 0.005
MAX_POLL = 0.05


def blocking(view: F) -> F:
    """Mark a view (Flask) or endpoint (Starlette/FastAPI) as blocking; see the integrations' docs."""
    setattr(view, MARKER, True)
    return view


def is_marked_blocking(view: object) -> bool:
    return bool(getattr(view, MARKER, False))


def blocking_matcher(rule: Blocking, path_of: Callable[[Any], str]) -> Callable[[Any], bool] | None:
    """Turn `blocking=` into a predicate on a scope/environ (None when nothing blocks)."""
    if rule is None:
        return None
    if callable(rule):
        return rule
    if isinstance(rule, str):
        rule = [rule]
    globs = tuple(rule)
    return lambda request: any(fnmatch.fnmatchcase(path_of(request), glob) for glob in globs)


def poll_delays(wait: float) -> Iterator[float]:
    """Delays between lease attempts (5 ms growing to 50 ms); raises `LockTimeout` once *wait* has passed."""
    deadline = time.monotonic() + wait
    delay = FIRST_POLL
    while (remaining := deadline - time.monotonic()) > 0:
        yield min(delay, remaining)
        delay = min(delay * 1.5, MAX_POLL)
    raise LockTimeout(wait)


class LockedRequest:
    """One blocking request's lock, as steps that each run on the connection holding it.

    Whoever drives the steps owns the connection: it must run them one at a time and return the
    connection to its pool only after `abandon` or `finish` (the pool rolls back whatever is still open).
    """

    def __init__(self, handler: BaseHandler[Any], session_id: str) -> None:
        self.handler = handler
        self.session_id = session_id
        self.owner = secrets.token_hex(16)
        self.key: str | None = None  # set while the lock is held
        self.session: Session | None = None
        self.written: list[UnitOfWork] = []  # the saves made inside the lock's transaction, in order
        self.acquired_at = 0.0

    @property
    def locked(self) -> bool:
        return self.key is not None

    def attempt(self, conn: Any) -> bool:
        """Try to lock once; True when done (locked, or nothing to lock), False when a lease is busy."""
        state, session = self.handler.acquire_on(conn, self.session_id, self.owner)
        if state is LockState.BUSY:
            return False
        if state is LockState.LOCKED:
            assert session is not None
            self.session, self.key = session, session.key
            self.acquired_at = time.monotonic()
        return True

    def write(self, conn: Any, session: Session, *, end_of_request: bool, record_activity: bool = True) -> SaveAction:
        """Save on the held connection, inside the lock's transaction (callbacks wait for the commit)."""
        handler = self.handler
        unit = handler.plan_save(session, end_of_request=end_of_request, record_activity=record_activity)
        if unit is None:
            return SaveAction.NOTHING
        self.written.append(unit)
        held = True
        if self.locked and time.monotonic() - self.acquired_at > handler.config.block_lock_seconds:
            # Held past block_lock_seconds by a request that kept working (the database bounds only
            # an idle hold): give the lock up, and save as a non-blocking request would.
            logger.warning(LOST_LOCK)
            self.abandon(conn)
            if handler.lock_strategy is LockStrategy.ROW:
                return self.rewrite(conn, session)  # the rollback undid this request's saves: all again
            self.written, held = [unit], False  # a lease: the earlier saves are stored already
        saved = handler.write_on(conn, unit, held=held)
        session.adopt(saved, unit)
        return saved.action

    def rewrite(self, conn: Any, session: Session) -> SaveAction:
        """After the lock was lost (its transaction rolled back): write this request's saves again, in
        order, as a non-blocking request would (compare-and-set, else a three-way merge onto the row)."""
        action = SaveAction.NOTHING
        for unit in self.written:
            saved = self.handler.write_on(conn, unit)
            session.adopt(saved, unit)
            action = saved.action
        self.written = []
        return action

    def load_by_key(self, conn: Any, key: str) -> Session | None:
        return self.handler.load_by_key_on(conn, key)

    def finish(self, conn: Any, session: Session) -> SaveAction:
        """The end-of-request save, then commit (the next waiter proceeds at once)."""
        action = self.write(conn, session, end_of_request=True)
        key, self.key = self.key, None
        if key is not None:
            self.handler.release_on(conn, key, self.owner, commit=True)
        self.written = []
        return action

    def abandon(self, conn: Any) -> None:
        """Release without saving: roll back (row lock) or drop the lease."""
        key, self.key = self.key, None
        if key is not None:
            self.handler.release_on(conn, key, self.owner, commit=False)


def lost_lock(exc: BaseException) -> bool:
    """True when the database ended the lock's transaction (the hold outlived `block_lock_seconds`)."""
    return isinstance(exc, DBAPIError) and exc.connection_invalidated


class BlockingSession:
    """A session locked for the whole of one (sync) request: `open`, then `finish` or `release`.

    It is also where the session saves and reloads while the lock is held (`Session.bind`).
    Without a lock (`BlockingSession(handler, session)`) it only forwards to the handler.
    """

    def __init__(self, handler: BaseHandler[Any], session: Session, lock: LockedRequest | None = None) -> None:
        self.handler = handler
        self.session = session
        self._lock = lock
        self._conn_cm: AbstractContextManager[Any] | None = None
        self._conn: Any = None
        self._release_gate: Callable[[], None] | None = None

    @classmethod
    def open(cls, handler: BaseHandler[Any], session_id: str | None, *, address: str | None = None) -> BlockingSession:
        """Lock the session named by *session_id*, waiting up to `block_wait_seconds`; `LockTimeout` past it.

        In one process, one blocking request per session waits for (or holds) the database lock with
        a pooled connection; the others wait at a gate holding none, and past `MAX_QUEUED_PER_SESSION`
        are answered at once (`LockTimeout`: 423). So a burst of one browser's requests at a blocking
        route cannot take the pool from everyone else. The hold counts toward the session's and the
        client *address*'s share of the pool (`sqla_sessions.store.fairshare`): past it, `LockTimeout` or
        `TooManyRequests` at once.
        """
        if not is_valid_session_id(session_id):
            return cls(handler, handler.load(session_id))
        assert session_id is not None
        config = handler.config
        key = session_key_of(session_id)
        deadline = time.monotonic() + config.block_wait_seconds
        # A thread waiting at the gate is one of its address's parked threads (`fairshare`). The gate
        # is the id's, not the row's: a known key with a wrong secret queues behind nobody.
        unpark = handler.share.park(address)
        try:
            leave_gate = _SESSION_GATES.enter(session_id, config.block_wait_seconds, config.block_lock_seconds)
        finally:
            unpark()
        try:
            # The gate's wait counts toward the lock's: what is left of block_wait_seconds.
            end_hold = handler.share.hold_blocking(key, address, wait=max(0.0, deadline - time.monotonic()))
        except BaseException:
            leave_gate()
            raise

        def release_gate() -> None:
            end_hold()
            leave_gate()

        lock = LockedRequest(handler, session_id)
        held = cls(handler, Session(handler), lock)
        held._release_gate = release_gate
        try:
            held._conn_cm = handler.connect()
            held._conn = held._conn_cm.__enter__()
        except BaseException:
            held._conn_cm = None
            held._close()
            raise
        try:
            delays = poll_delays(handler.config.block_wait_seconds)
            while not lock.attempt(held._conn):
                time.sleep(next(delays))
        except BaseException:
            held._close()
            raise
        if lock.session is None:
            held._close()
            logger.warning("unknown or expired session id; starting a new session")
        else:
            held.session = lock.session
            held.session.bind(held)
            unlocked = handler.share.locked_here(key)  # this session's saves here wait for it, holding nothing

            def release_all() -> None:
                unlocked()
                release_gate()

            held._release_gate = release_all
        return held

    @property
    def locked(self) -> bool:
        return self._lock is not None and self._lock.locked

    @property
    def config(self) -> SessionConfig:
        return self.handler.config

    # -- where the session saves and reloads while locked (the `SessionStore` protocol) ----------------

    def save(self, session: Session, *, end_of_request: bool = False, record_activity: bool = True) -> SaveAction:
        lock = self._lock
        if lock is None or not lock.locked:
            return self.handler.save(session, end_of_request=end_of_request, record_activity=record_activity)
        try:
            return lock.write(self._conn, session, end_of_request=end_of_request, record_activity=record_activity)
        except BaseException as exc:
            if not lost_lock(exc):
                raise
            return self._save_again_without_lock(lock, session)

    def load_by_key(self, key: str) -> Session | None:
        if self._lock is None or not self._lock.locked:
            return self.handler.load_by_key(key)
        return self._lock.load_by_key(self._conn, key)

    # -- the end of the request ----------------------------------------------------------------------

    def finish(self) -> SaveAction:
        """Save at the end of the request and release the lock (in the same transaction where there is one)."""
        session, lock = self.session, self._lock
        if lock is None or not lock.locked:
            return self.handler.save(session, end_of_request=True)
        try:
            action = lock.finish(self._conn, session)
        except BaseException as exc:
            if not lost_lock(exc):
                self.release()  # roll back (or drop the lease): nothing of this request is stored
                raise
            session.bind(self.handler)
            try:
                action = self._save_again_without_lock(lock, session)
            except BaseException as error:
                session.run_saved_callbacks(error)
                raise
        else:
            self._close()
            session.bind(self.handler)
        session.run_saved_callbacks(None)
        return action

    def _save_again_without_lock(self, lock: LockedRequest, session: Session) -> SaveAction:
        """The database ended the lock's transaction (idle past block_lock_seconds) and rolled back the
        saves made in it: write them again as a non-blocking request would, merging onto the row."""
        logger.warning(LOST_LOCK)
        lock.key = None
        self._close()
        with self.handler.connect() as conn:
            return lock.rewrite(conn, session)

    def release(self) -> None:
        """Release without saving (the app failed, the response is a 5xx, the client went away)."""
        lock = self._lock
        if lock is not None and lock.locked:
            try:
                lock.abandon(self._conn)
            except Exception:  # a dead connection has released the lock already
                logger.debug("releasing a blocking session's lock failed", exc_info=True)
        if self.session.has_saved_callbacks:
            # Nothing of this request was committed (mid-request saves rolled back too): no callback runs.
            self.session.run_saved_callbacks(SessionInterrupted("the request's changes were not stored"))
        self.session.bind(self.handler)
        self._close()

    def _close(self) -> None:
        if self._conn_cm is not None:
            cm, self._conn_cm, self._conn = self._conn_cm, None, None
            try:
                cm.__exit__(None, None, None)
            except Exception:
                logger.debug("returning a blocking session's connection failed", exc_info=True)
        release_gate, self._release_gate = self._release_gate, None
        if release_gate is not None:
            release_gate()


#: Blocking requests of one session that may wait in one process besides the one past the gate.
MAX_QUEUED_PER_SESSION = 8


class _Gate:
    __slots__ = ("changed", "owner", "since", "users")

    def __init__(self, guard: threading.Lock) -> None:
        self.changed = threading.Condition(guard)
        self.owner: object | None = None
        self.since = 0.0
        self.users = 0


class _SessionGates:
    """Per process, per session: the one blocking request that may hold a connection (sync servers).

    The others wait here, holding a server thread but no pooled connection, for at most the wait
    bound; beyond `MAX_QUEUED_PER_SESSION` they are refused at once. Like the database lock, a pass
    lasts at most `block_lock_seconds`: a holder past it no longer keeps the others waiting.
    """

    def __init__(self) -> None:
        self._guard = threading.Lock()
        self._gates: dict[str, _Gate] = {}

    def enter(self, session_id: str, wait: float, hold: float) -> Callable[[], None]:
        """Pass the gate of *session_id* (`LockTimeout` past *wait* or a full queue); returns its release."""
        token = object()
        with self._guard:
            gate = self._gates.get(session_id)
            if gate is None:
                gate = self._gates[session_id] = _Gate(self._guard)
            if gate.users > MAX_QUEUED_PER_SESSION:
                raise LockTimeout(1)
            gate.users += 1
            deadline = time.monotonic() + wait
            while gate.owner is not None and time.monotonic() - gate.since < hold:
                remaining = min(deadline, gate.since + hold) - time.monotonic()
                if time.monotonic() >= deadline:
                    self._leave(session_id, gate)
                    raise LockTimeout(wait)
                gate.changed.wait(max(remaining, 0.001))
            gate.owner, gate.since = token, time.monotonic()

        def release() -> None:
            with self._guard:
                if gate.owner is token:
                    gate.owner = None
                    gate.changed.notify_all()
                self._leave(session_id, gate)

        released: list[bool] = []

        def release_once() -> None:
            if not released:
                released.append(True)
                release()

        return release_once

    def _leave(self, session_id: str, gate: _Gate) -> None:
        # Called with the guard held.
        gate.users -= 1
        if gate.users == 0 and self._gates.get(session_id) is gate:
            del self._gates[session_id]


_SESSION_GATES = _SessionGates()
