"""A blocking request under an `AsyncSessionStore`: its session locked for the whole of one ASGI request.

The steps are `locking.LockedRequest`'s (written once, for sync and async servers); this module runs
them on an `aio_connection.HeldConnection`, gives that connection back when the request ends, and,
on PostgreSQL and MariaDB/MySQL, when the hold outlives `block_lock_seconds` (its expiry: the request's
saves are then written again without the lock, see `locking`).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ..config import SessionConfig
from ..core.ids import is_valid_session_id
from ..core.records import SaveAction
from ..core.session import Session
from ..errors import SessionInterrupted
from .handlers.base import LockStrategy
from .locking import LOST_LOCK, LockedRequest, lost_lock, poll_delays

if TYPE_CHECKING:
    from .aio import AsyncSessionStore
    from .aio_connection import HeldConnection

logger = logging.getLogger("sqla_sessions")

#: Seconds past `block_lock_seconds` after which a blocking request's idle connection is given back.
EXPIRY_GRACE = 1.0


class _AsyncOnly:
    """The sync side of a session whose lock is held on an async request's connection: refused clearly."""

    def __init__(self, config: SessionConfig) -> None:
        self.config = config

    def save(self, session: Session, *, end_of_request: bool = False, record_activity: bool = True) -> SaveAction:
        raise RuntimeError("this blocking request holds its lock on an async connection: use `await session.asave()`")

    def load_by_key(self, key: str) -> Session | None:
        raise RuntimeError("this blocking request holds its lock on an async connection: use `await session.areload()`")


class AsyncBlockingSession:
    """A session locked for the whole of one ASGI request: `open`, then `finish` or `release`.

    The steps are `locking.LockedRequest`'s, run on a `HeldConnection`; it is also where the
    session's `asave()`/`areload()` go while the lock is held.
    """

    def __init__(self, store: AsyncSessionStore, session: Session, lock: LockedRequest | None = None) -> None:
        self.store = store
        self.session = session
        self._lock = lock
        self._conn: HeldConnection | None = None
        self._settling = False  # a cancelled finish() still running: it, not release(), ends the request
        self._on_done: Callable[[], None] | None = None
        self._expiry: asyncio.TimerHandle | None = None
        self._expired = False  # the hold outlived block_lock_seconds: its connection went back to the pool

    @classmethod
    async def open(
        cls, store: AsyncSessionStore, session_id: str | None, *, on_done: Callable[[], None] | None = None
    ) -> AsyncBlockingSession:
        """*on_done* runs once, when the request's connection has been given back (however it ends)."""
        handler = store.handler
        if not is_valid_session_id(session_id):
            return cls(store, await store.load(session_id))
        assert session_id is not None
        lock = LockedRequest(handler, session_id)
        held = cls(store, Session(handler), lock)
        held._on_done = on_done
        conn = held._conn = store.held_connection()
        try:
            await conn.open()
            delays = poll_delays(handler.config.block_wait_seconds)
            while not await conn.run(lock.attempt):
                await asyncio.sleep(next(delays))  # leases only: row locks wait in the database
        except asyncio.CancelledError:
            # Give the cancellation back at once; the wait still in flight ends (or times out) in the
            # database, and the connection is cleaned up and returned behind it.
            store.in_background(held._close())
            raise
        except BaseException:
            await held._close()
            raise
        if lock.session is None:
            await held._close()
            logger.warning("unknown or expired session id; starting a new session")
            held.session = await store.load(None)
        else:
            held.session = lock.session
            held.session.bind(_AsyncOnly(handler.config), held)
            if handler.lock_strategy is LockStrategy.ROW:
                # Past block_lock_seconds the database ends the lock's transaction (an idle hold), or the
                # request's next save gives it up: its connection need not wait for the app to end.
                delay = handler.config.block_lock_seconds + EXPIRY_GRACE
                held._expiry = asyncio.get_running_loop().call_later(delay, held._expire)
        return held

    def _expire(self) -> None:
        """The hold outlived `block_lock_seconds` while the app kept running: give its connection back to
        the pool now (discarded: the database ended, or now ends, its transaction and lock), not when
        the app ends. The request's saves are written again without the lock (see `locking`)."""
        conn = self._conn
        if conn is None or self._settling or not self.locked:
            return
        inflight = conn.last_call
        if inflight is not None and not inflight.done():
            return  # a call on it now: that call finds the lock lost itself
        self._expired, self._conn = True, None
        self.store.in_background(conn.close(_discard))

    @property
    def locked(self) -> bool:
        return self._lock is not None and self._lock.locked

    async def save(self, session: Session, *, end_of_request: bool = False) -> SaveAction:
        """A mid-request save (`await session.asave()`), on the held connection inside the lock."""
        lock, conn = self._lock, self._conn
        if lock is not None and self._expired and lock.locked:
            return await self._write_after_expiry(lock, session, end_of_request=end_of_request)
        if lock is None or conn is None or not lock.locked:
            return await self.store.save(session, end_of_request=end_of_request)
        try:
            return await conn.run(lambda c: lock.write(c, session, end_of_request=end_of_request))
        except Exception as exc:
            if not lost_lock(exc):
                raise
            return await asyncio.shield(await self._save_again_without_lock(lock, session))

    async def load_by_key(self, key: str) -> Session | None:
        lock, conn = self._lock, self._conn
        if lock is None or conn is None or not lock.locked:
            return await self.store.load_by_key(key)
        return await conn.run(lock.load_by_key, key)

    async def finish(self) -> SaveAction:
        """Save at the end of the request and release the lock."""
        lock, conn, session = self._lock, self._conn, self.session
        if lock is not None and self._expired and lock.locked:
            session.bind(self.store.handler, self.store)
            try:
                action = await self._write_after_expiry(lock, session, end_of_request=True)
            except Exception as error:
                session.run_saved_callbacks(error)
                raise
            if session.has_saved_callbacks:
                await self.store.call(lambda: session.run_saved_callbacks(None))
            return action
        if lock is None or conn is None or not lock.locked:
            return await self.store.save(session, end_of_request=True)
        try:
            action = await conn.run(lambda c: lock.finish(c, session))
        except asyncio.CancelledError:
            # The save and commit still run to their end; the callbacks (jobs) follow what they did.
            self._settling = True
            self.store.in_background(self._settle(conn.last_call))
            raise
        except BaseException as exc:
            if not lost_lock(exc):
                await self.release()  # roll back (or drop the lease): nothing of this request is stored
                raise
            session.bind(self.store.handler, self.store)
            rewrite = await self._save_again_without_lock(lock, session)
            try:
                action = await asyncio.shield(rewrite)
            except asyncio.CancelledError:
                self._settling = True  # the rewrite runs on; the callbacks follow what it did
                self.store.in_background(self._settle(rewrite))
                raise
            except BaseException as error:
                session.run_saved_callbacks(error)
                raise
        else:
            await self._close()
            session.bind(self.store.handler, self.store)
        if session.has_saved_callbacks:
            await self.store.call(lambda: session.run_saved_callbacks(None))
        return action

    async def _write_after_expiry(self, lock: LockedRequest, session: Session, *, end_of_request: bool) -> SaveAction:
        """A save after the hold expired (`_expire`): this one joins the saves the lost transaction
        rolled back, and all are written again, in order, as a non-blocking request's."""
        unit = self.store.handler.plan_save(session, end_of_request=end_of_request)
        if unit is not None:
            lock.written.append(unit)
        rewrite = await self._save_again_without_lock(lock, session)
        try:
            return await asyncio.shield(rewrite)
        except asyncio.CancelledError:
            # The rewrite runs on; the callbacks follow what it did (as after a cancelled `finish`).
            self._settling = True
            self.store.in_background(self._settle(rewrite))
            raise

    async def _save_again_without_lock(self, lock: LockedRequest, session: Session) -> asyncio.Future[SaveAction]:
        """The database ended the lock's transaction and rolled back its saves: write them again on a
        connection of the store's (see `locking`). Returned as a running task: a cancellation of the
        request must not stop it half-way."""
        logger.warning(LOST_LOCK)
        lock.key = None
        await self._close()
        rewrite = asyncio.ensure_future(self.store.run_on_connection(lock.rewrite, session))
        self.store.keep_until_done(rewrite)  # `aclose()` waits for it
        return rewrite

    async def _settle(self, call: asyncio.Future[Any] | None) -> None:
        """After a cancelled `finish`: once its save has ended, finish what it left (as `finish` would)."""
        if call is not None:
            await asyncio.wait([call])
        error = None if call is None or call.cancelled() else call.exception()
        committed = call is not None and not call.cancelled() and error is None
        lock, session = self._lock, self.session
        await self._close()
        session.bind(self.store.handler, self.store)
        if not committed and lock is not None and error is not None and lost_lock(error):
            try:  # the lock's transaction was lost: its saves are written again (see locking)
                await self.store.run_on_connection(lock.rewrite, session)
                committed = True
            except Exception:
                logger.exception("a cancelled blocking request lost its lock and could not save again")
        if not session.has_saved_callbacks:
            return
        if committed:
            await self.store.call(lambda: session.run_saved_callbacks(None))
        else:
            session.run_saved_callbacks(SessionInterrupted("the request was cancelled before its save ended"))

    async def release(self) -> None:
        """Release without saving (the app failed, the response is a 5xx, the client went away)."""
        if self._settling:
            return
        await self._close()
        if self.session.has_saved_callbacks:
            # Nothing of this request was committed (mid-request saves rolled back too): no callback runs.
            self.session.run_saved_callbacks(SessionInterrupted("the request's changes were not stored"))

    async def _close(self) -> None:
        """Roll back whatever the lock still holds (after any call in flight), then return the connection."""
        if self._expiry is not None:
            self._expiry.cancel()
            self._expiry = None
        conn, self._conn = self._conn, None
        if conn is not None:
            lock = self._lock
            await conn.close(lock.abandon if lock is not None else None)
        on_done, self._on_done = self._on_done, None
        if on_done is not None:
            on_done()


def _discard(conn: Any) -> None:
    """The last step on an expired hold's connection: the pool drops it (its server session ends, and
    with it the transaction and the row lock, if the database has not ended them already)."""
    conn.invalidate()
