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
non-blocking one. Non-blocking requests are never held up by a blocking one on SQLite; on
PostgreSQL and MariaDB their reads are not held up either, and their writes wait for the commit.
"""

from __future__ import annotations

import fnmatch
import logging
import secrets
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, suppress
from typing import Any, TypeVar

from sqlalchemy.exc import DBAPIError

from .errors import LockTimeout
from .handlers.base import BaseHandler
from .ids import is_valid_session_id
from .records import SaveAction
from .session import Session

logger = logging.getLogger("sqla_sessions")

F = TypeVar("F", bound=Callable[..., Any])
MARKER = "__sqla_sessions_blocking__"
#: What `blocking=` accepts: path globs, or a callable given the ASGI scope / WSGI environ.
Blocking = Sequence[str] | Callable[[Any], bool] | None

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


def next_poll(delay: float) -> float:
    return min(delay * 1.5, MAX_POLL)


class BlockingSession:
    """A session locked for the whole of one (sync) request: `open`, then `save` or `release`."""

    def __init__(self, handler: BaseHandler[Any], session: Session) -> None:
        self.handler = handler
        self.session = session
        self._owner = secrets.token_hex(16)
        self._key: str | None = None
        self._conn_cm: AbstractContextManager[Any] | None = None
        self._conn: Any = None

    @classmethod
    def open(cls, handler: BaseHandler[Any], session_id: str | None) -> BlockingSession:
        """Lock the session named by *session_id*, waiting up to `block_wait_seconds`; `LockTimeout` past it."""
        if not is_valid_session_id(session_id):
            return cls(handler, handler.load(session_id))
        assert session_id is not None
        held = cls(handler, Session(handler))
        wait = handler.config.block_wait_seconds
        deadline = time.monotonic() + wait
        delay = FIRST_POLL
        held._conn_cm = handler._connect()
        held._conn = held._conn_cm.__enter__()
        try:
            while True:
                status, session = handler._acquire_session_on(held._conn, session_id, held._owner)
                if status == "locked":
                    assert session is not None
                    held.session, held._key = session, session.key
                    return held
                if status == "missing":
                    held._close()
                    held.session = handler.load(None)  # nothing to lock: a fresh session, as load() would give
                    logger.warning("unknown or expired session id; starting a new session")
                    return held
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise LockTimeout(wait)
                time.sleep(min(delay, remaining))
                delay = next_poll(delay)
        except BaseException:
            held._close()
            raise

    @property
    def locked(self) -> bool:
        return self._key is not None

    def save(self) -> SaveAction:
        """Save at the end of the request and release the lock (in the same transaction where there is one)."""
        if not self.locked:
            return self.handler.save(self.session, end_of_request=True)
        assert self._key is not None
        session = self.session
        try:
            action = self.handler._save_locked_on(self._conn, session, self._owner, self._key)
            self._key = None
        except DBAPIError as exc:
            if not exc.connection_invalidated:
                session._run_after_save(exc)
                raise
            # The database ended our transaction (the hold outlived block_lock_seconds): the lock is
            # gone, so save like a non-blocking request would, merging onto the current row.
            logger.warning("blocking request held its session past block_lock_seconds; saved without the lock")
            self._key = None
            self._close()
            return self.handler.save(session, end_of_request=True)
        except BaseException as exc:
            session._run_after_save(exc)
            raise
        finally:
            if not self.locked:
                self._close()
        session._run_after_save(None)
        return action

    def release(self) -> None:
        """Release without saving (the app failed, the response is a 5xx, the client went away)."""
        if self.locked:
            with suppress(Exception):  # a dead connection has released the lock already
                self.handler._release(self._conn, self._key, self._owner, commit=False)
            self._key = None
        self._close()

    def _close(self) -> None:
        if self._conn_cm is not None:
            cm, self._conn_cm, self._conn = self._conn_cm, None, None
            with suppress(Exception):
                cm.__exit__(None, None, None)
