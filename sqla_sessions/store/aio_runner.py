"""Where an `AsyncSessionStore` runs a handler's sync logic: in `WorkerThreads`, on an `AsyncEngine`
connection, or inline (`MemoryHandler`); see `sqla_sessions.store.aio` for when each is chosen.

`AsyncRunner` is the store's base: it owns the threads or the engine, runs calls on them within the
pool's wait bound, keeps what cancelled requests still finish, and disposes of what it created.
"""

from __future__ import annotations

import asyncio
import importlib.util
import time
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any, Literal, TypeVar

from sqlalchemy.engine import URL
from sqlalchemy.exc import TimeoutError as PoolTimeout

from .aio_connection import HeldConnection
from .handlers.base import BaseHandler
from .handlers.database import DatabaseHandler
from .handlers.prepared import switch_for
from .threads import WorkerThreads

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncEngine

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


class AsyncRunner:
    """Runs a handler's sync logic off the event loop: the base of `AsyncSessionStore`."""

    def __init__(self, handler: BaseHandler[Any], *, async_engine: AsyncEngine | Literal["auto"] | None = None) -> None:
        self.handler = handler
        self.config = handler.config
        self._engine: AsyncEngine | None = None
        self._owns_engine = False
        self._threads: WorkerThreads | None = None
        self._pending: set[asyncio.Future[Any]] = set()  # what cancelled requests still finish (see aclose)
        if not isinstance(handler, DatabaseHandler):
            return
        if async_engine == "auto":
            url = async_url(handler.engine.url)
            if url is not None and _greenlet_available():
                self._engine = _create_async_engine(url, handler)
                self._owns_engine = True
        elif async_engine is not None:
            # Single statements commit by themselves, as the handler's own engine does: an engine passed
            # in that is not in autocommit would leave each write in a transaction nobody commits.
            options = async_engine.get_execution_options()
            in_autocommit = options.get("isolation_level") == "AUTOCOMMIT"
            self._engine = (
                async_engine if in_autocommit else async_engine.execution_options(isolation_level="AUTOCOMMIT")
            )
        if self._engine is not None:
            # The handler's hot statements run on its connections too; its own pool has its own switch
            # (`handlers.prepared`: psycopg's async connection is not asked to prepare).
            engine = self._engine.sync_engine
            auto = self.config.prepared_statements == "auto"
            handler.runner.use_also(engine, switch_for(engine, named=False, detects=auto))
            return
        self._threads = WorkerThreads(THREADS)

    @property
    def mode(self) -> str:
        """'async-engine', 'threads' or 'inline': where the handler's logic runs."""
        return "async-engine" if self._engine is not None else "threads" if self._threads else "inline"

    def held_connection(self) -> HeldConnection:
        """A connection of whichever kind this store uses, to keep for a whole (blocking) request."""
        return HeldConnection(self._engine, self._threads, self.handler, pending=self._pending)

    def in_background(self, work: Coroutine[Any, Any, None]) -> None:
        """Run *work* to its end without anyone awaiting it (what a cancelled request still has to
        finish); `aclose()` waits for it."""
        self.keep_until_done(asyncio.ensure_future(work))

    def keep_until_done(self, future: asyncio.Future[Any]) -> None:
        """`aclose()` waits for *future* (a write that must not be cut off at shutdown)."""
        self._pending.add(future)
        future.add_done_callback(self._pending.discard)

    async def run_on_connection(self, fn: Callable[..., T], *args: Any) -> T:
        """Run `fn(connection, *args)` on a connection of the right kind."""
        if self._engine is not None:
            async with self._engine.connect() as conn:
                return await conn.run_sync(fn, *args)
        if self._threads is not None:
            # A call queued behind busy threads for longer than a pooled connection may take fails
            # as a pool timeout would (503): waits stay bounded however many requests queue.
            deadline = time.monotonic() + self.config.pool_timeout
            return await self._threads.run(self._run_in_thread, fn, args, deadline)
        return self._run_in_thread(fn, args)

    def _run_in_thread(self, fn: Callable[..., T], args: tuple[Any, ...], deadline: float | None = None) -> T:
        if deadline is not None and time.monotonic() > deadline:
            raise self._no_thread_in_time()
        with self.handler.connect() as conn:
            return fn(conn, *args)

    async def call(self, fn: Callable[[], T]) -> T:
        """Run a whole sync handler operation (its own connections, e.g. GC) off the loop."""
        if self._threads is not None:
            return await self._threads.run(fn)
        if self._engine is not None:  # the handler's sync engine: off the loop, in the loop's default executor
            return await asyncio.get_running_loop().run_in_executor(None, fn)
        return fn()  # memory: no I/O

    def _no_thread_in_time(self) -> PoolTimeout:
        return PoolTimeout(f"no worker thread free within pool_timeout ({self.config.pool_timeout:g} s)")

    async def _dispose(self, bound: float) -> None:
        """Dispose of what this runner created (its AsyncEngine, its threads), waiting at most *bound*
        for the threads to end."""
        if self._engine is not None and self._owns_engine:
            await self._engine.dispose()
        if self._threads is not None:
            self._threads.close()
            # What cancelled requests handed to a thread (a save, its merge) ends before the process
            # may: the threads are daemons, and an exiting interpreter would cut them off mid-write.
            await asyncio.to_thread(self._threads.join, bound)


def _create_async_engine(url: URL, handler: DatabaseHandler) -> AsyncEngine:
    from sqlalchemy.ext.asyncio import create_async_engine

    from .handlers.engines import SQLITE_BUSY_TIMEOUT, engine_options, use_wal

    # The config's pool: blocking requests each hold a connection, so its size matters.
    options = engine_options(url, handler.config)
    if url.get_backend_name() != "sqlite":
        return create_async_engine(url, isolation_level="AUTOCOMMIT", **options)
    options["connect_args"] = {"timeout": SQLITE_BUSY_TIMEOUT}
    engine = create_async_engine(url, isolation_level="AUTOCOMMIT", **options)
    use_wal(engine.sync_engine)
    return engine
