"""Run a handler's session logic from async code without blocking the event loop.

There is one implementation of the logic (`BaseHandler._load_on`, `_save_on`, …); this module only
decides where it runs:

- `DatabaseHandler` (default): on the handler's own sync engine, in `WorkerThreads`. The loop never
  waits for the database; a request holds a thread only while its statements run, and on
  PostgreSQL the wait happens inside libpq with the GIL released (`handlers.libpq`). Measured here
  (benchmarks/http_throughput.py, PostgreSQL, 64 clients, one core) this serves more requests than
  the AsyncEngine path: psycopg's async machinery plus SQLAlchemy's greenlet bridge cost more per
  statement than one thread hop.
- `DatabaseHandler` with `async_engine=` (an `AsyncEngine`, or "auto" to derive one: psycopg 3 for
  PostgreSQL, aiosqlite for a SQLite file, aiomysql for MariaDB/MySQL when installed): on an
  `AsyncEngine` connection through `AsyncConnection.run_sync`, so every statement awaits its socket
  and no thread is involved (choose it when thousands of requests wait on the database at once).
- `MemoryHandler`: inline (no I/O).
"""

from __future__ import annotations

import asyncio
import importlib.util
import logging
import secrets
import time
from collections.abc import Callable
from contextlib import suppress
from typing import TYPE_CHECKING, Any, Literal, TypeVar, cast

from sqlalchemy.engine import URL
from sqlalchemy.exc import DBAPIError

from .errors import LockTimeout
from .handlers.base import BaseHandler
from .handlers.database import DatabaseHandler
from .ids import is_valid_session_id
from .locking import FIRST_POLL, next_poll
from .records import SaveAction
from .session import Session
from .threads import WorkerThreads

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncEngine

logger = logging.getLogger("sqla_sessions")
T = TypeVar("T")

#: Threads for databases without an async driver; a request holds one only while a statement runs.
THREADS = 32


def async_url(url: URL) -> URL | None:
    """The async-driver URL for *url*, or None when there is no async driver for it here."""
    backend = url.get_backend_name()
    if backend == "postgresql" and url.get_driver_name() in ("psycopg", "psycopg_async"):
        return url.set(drivername="postgresql+psycopg")
    if backend == "sqlite":
        if url.database in (None, "", ":memory:") or importlib.util.find_spec("aiosqlite") is None:
            return None  # an in-memory database lives in its sync engine's one connection
        return url.set(drivername="sqlite+aiosqlite")
    if backend in ("mysql", "mariadb") and importlib.util.find_spec("aiomysql") is not None:
        return url.set(drivername=f"{backend}+aiomysql")
    return None


def _greenlet_available() -> bool:
    return importlib.util.find_spec("greenlet") is not None


class AsyncSessionStore:
    """Async `load`/`save`/`gc` over any handler."""

    def __init__(self, handler: BaseHandler[Any], *, async_engine: AsyncEngine | Literal["auto"] | None = None) -> None:
        self.handler = handler
        self.config = handler.config
        self._engine: AsyncEngine | None = None
        self._owns_engine = False
        self._threads: WorkerThreads | None = None
        if not isinstance(handler, DatabaseHandler):
            return
        if async_engine == "auto":
            url = async_url(handler.engine.url)
            if url is not None and _greenlet_available():
                self._engine = _create_async_engine(url, handler)
                self._owns_engine = True
        elif async_engine is not None:
            self._engine = async_engine
        if self._engine is None:
            self._threads = WorkerThreads(THREADS)

    @property
    def mode(self) -> str:
        """'async-engine', 'threads' or 'inline': where the handler's logic runs."""
        return "async-engine" if self._engine is not None else "threads" if self._threads else "inline"

    async def load(self, session_id: str | None) -> Session:
        fresh = self.handler._fresh_unless_valid(session_id)
        if fresh is not None:
            return fresh
        return await self._run(self.handler._load_on, session_id)

    async def save(self, session: Session, *, end_of_request: bool = False) -> SaveAction:
        try:
            plan = self.handler._plan_save(session, end_of_request)
            action = SaveAction.NOTHING if plan is None else await self._run(self.handler._save_on, session, *plan)
        except BaseException as exc:
            session._run_after_save(exc)
            raise
        if session._after_save_hooks:  # enqueueing jobs talks to a broker: not on the event loop
            await self._call(lambda: session._run_after_save(None))
        return action

    async def load_by_key(self, key: str) -> Session | None:
        return await self._call(lambda: self.handler.load_by_key(key))

    async def reload(self, session: Session) -> None:
        """`session.reload()` for async code."""
        await self._call(session.reload)

    async def gc(self, *, max_batches: int | None = None) -> int:
        return await self._call(lambda: self.handler.gc(max_batches=max_batches))

    async def open_blocking(self, session_id: str | None) -> AsyncBlockingSession:
        """Lock the session for a blocking request (see `sqla_sessions.locking`); `LockTimeout` past the wait."""
        return await AsyncBlockingSession.open(self, session_id)

    async def aclose(self) -> None:
        if self._engine is not None and self._owns_engine:
            await self._engine.dispose()
        if self._threads is not None:
            self._threads.close()

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        """Run `fn(connection, *args)` on a connection of the right kind."""
        if self._engine is not None:
            async with self._engine.connect() as conn:
                return await conn.run_sync(fn, *args)
        if self._threads is not None:
            return await self._threads.run(self._run_in_thread, fn, args)
        return self._run_in_thread(fn, args)

    def _run_in_thread(self, fn: Callable[..., T], args: tuple[Any, ...]) -> T:
        with self.handler._connect() as conn:
            return fn(conn, *args)

    async def _call(self, fn: Callable[[], T]) -> T:
        """Run a whole sync handler operation (several connections, e.g. GC) off the loop."""
        if self._threads is not None:
            return await self._threads.run(fn)
        if self._engine is not None:  # the handler's sync engine: off the loop, in the loop's default executor
            return await asyncio.get_running_loop().run_in_executor(None, fn)
        return fn()  # memory: no I/O


class _HeldConnection:
    """One connection kept for a whole request, of whichever kind the store uses."""

    def __init__(self, store: AsyncSessionStore) -> None:
        self._store = store
        self._async: Any = None
        self._sync_cm: Any = None
        self._sync: Any = None

    async def open(self) -> None:
        store = self._store
        if store._engine is not None:
            self._async = store._engine.connect()
            await self._async.start()
        else:
            self._sync_cm = store.handler._connect()
            self._sync = await self._in_thread(self._sync_cm.__enter__)

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        if self._async is not None:
            return cast(T, await self._async.run_sync(fn, *args))
        return await self._in_thread(lambda: fn(self._sync, *args))

    async def close(self) -> None:
        if self._async is not None:
            conn, self._async = self._async, None
            with suppress(Exception):
                await conn.close()
        elif self._sync_cm is not None:
            cm, self._sync_cm = self._sync_cm, None
            with suppress(Exception):
                await self._in_thread(lambda: cm.__exit__(None, None, None))

    async def _in_thread(self, fn: Callable[[], T]) -> T:
        threads = self._store._threads
        if threads is None:
            return fn()
        return await threads.run(fn)


class AsyncBlockingSession:
    """A session locked for the whole of one ASGI request: `open`, then `save` or `release`."""

    def __init__(self, store: AsyncSessionStore, session: Session) -> None:
        self.store = store
        self.session = session
        self._owner = secrets.token_hex(16)
        self._key: str | None = None
        self._conn: _HeldConnection | None = None

    @classmethod
    async def open(cls, store: AsyncSessionStore, session_id: str | None) -> AsyncBlockingSession:
        handler = store.handler
        if not is_valid_session_id(session_id):
            return cls(store, await store.load(session_id))
        held = cls(store, Session(handler))
        wait = handler.config.block_wait_seconds
        deadline = time.monotonic() + wait
        delay = FIRST_POLL
        held._conn = _HeldConnection(store)
        try:
            await held._conn.open()
            while True:
                status, session = await held._conn.run(handler._acquire_session_on, session_id, held._owner)
                if status == "locked":
                    assert session is not None
                    held.session, held._key = session, session.key
                    return held
                if status == "missing":
                    await held._close()
                    held.session = Session(handler)
                    logger.warning("unknown or expired session id; starting a new session")
                    return held
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise LockTimeout(wait)
                await asyncio.sleep(min(delay, remaining))  # leases only: row locks wait in the database
                delay = next_poll(delay)
        except BaseException:
            await held._close()
            raise

    @property
    def locked(self) -> bool:
        return self._key is not None

    async def save(self, *, end_of_request: bool = True) -> SaveAction:
        if not self.locked:
            return await self.store.save(self.session, end_of_request=end_of_request)
        assert self._conn is not None and self._key is not None
        session = self.session
        try:
            action = await self._conn.run(self.store.handler._save_locked_on, session, self._owner, self._key)
            self._key = None
        except DBAPIError as exc:
            if not exc.connection_invalidated:
                session._run_after_save(exc)
                raise
            logger.warning("blocking request held its session past block_lock_seconds; saved without the lock")
            self._key = None
            await self._close()
            return await self.store.save(session, end_of_request=True)
        except BaseException as exc:
            session._run_after_save(exc)
            raise
        finally:
            if not self.locked:
                await self._close()
        if session._after_save_hooks:
            await self.store._call(lambda: session._run_after_save(None))
        return action

    async def release(self) -> None:
        if self.locked and self._conn is not None:
            with suppress(Exception):
                handler, key, owner = self.store.handler, self._key, self._owner
                await self._conn.run(lambda conn: handler._release(conn, key, owner, commit=False))
            self._key = None
        await self._close()

    async def _close(self) -> None:
        if self._conn is not None:
            conn, self._conn = self._conn, None
            await conn.close()


def _create_async_engine(url: URL, handler: DatabaseHandler) -> AsyncEngine:
    from sqlalchemy.ext.asyncio import create_async_engine

    from .handlers.engines import SQLITE_BUSY_TIMEOUT, use_wal

    pool: Any = handler.engine.pool
    sizing: dict[str, Any] = {}
    if hasattr(pool, "size") and hasattr(pool, "_max_overflow"):
        # Mirror the sync engine's pool: blocking requests each hold a connection, so its size matters.
        sizing = {"pool_size": pool.size(), "max_overflow": pool._max_overflow, "pool_timeout": pool.timeout()}
    if url.get_backend_name() != "sqlite":
        return create_async_engine(url, isolation_level="AUTOCOMMIT", **sizing)
    engine = create_async_engine(
        url, isolation_level="AUTOCOMMIT", connect_args={"timeout": SQLITE_BUSY_TIMEOUT}, **sizing
    )
    use_wal(engine.sync_engine)
    return engine
