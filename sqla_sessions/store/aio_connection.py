"""A connection kept for a whole blocking request, of whichever kind an `AsyncSessionStore` uses: an
`AsyncEngine` connection, or a sync one driven in `WorkerThreads` (or inline, with no threads).

`aio_blocking.AsyncBlockingSession` runs a blocking request's steps on it while the session's lock
is held, and gives it back when the request ends or its hold expires.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, TypeVar, cast

from .handlers.base import BaseHandler
from .threads import WorkerThreads

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncEngine

logger = logging.getLogger("sqla_sessions")
T = TypeVar("T")


class HeldConnection:
    """One connection kept for a whole request, of whichever kind the store uses.

    Calls run one at a time. A call whose awaiting task is cancelled still runs to its end (in its
    thread, or as a shielded task), and `close` waits for it before the connection goes back to its
    pool, where the pool's reset rolls back anything left open: a cancelled request leaves nothing
    behind on a pooled connection.
    """

    def __init__(
        self,
        engine: AsyncEngine | None,
        threads: WorkerThreads | None,
        handler: BaseHandler[Any],
        *,
        pending: set[asyncio.Future[None]] | None = None,
    ) -> None:
        """*pending*: where a close still running is kept (the store waits for it before it shuts down)."""
        self._pending = pending
        self._engine = engine
        self._threads = threads
        self._handler = handler
        self._async: Any = None
        self._sync_cm: Any = None
        self._sync: Any = None
        self._inflight: asyncio.Future[Any] | None = None

    @property
    def last_call(self) -> asyncio.Future[Any] | None:
        """The latest call made on the connection (it may still be running after a cancellation)."""
        return self._inflight

    async def open(self) -> None:
        # Kept before the await: a cancellation during it must still close what was opened.
        if self._engine is not None:
            self._async = self._engine.connect()
            await self._shielded(self._async.start())
        else:
            self._sync_cm = self._handler.connect()
            self._sync = await self._shielded(self._in_thread(self._sync_cm.__enter__))

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        if self._async is not None:
            return cast(T, await self._shielded(self._async.run_sync(fn, *args)))
        sync = self._sync
        return await self._shielded(self._in_thread(lambda: fn(sync, *args)))

    async def close(self, last: Callable[[Any], None] | None = None) -> None:
        """Run *last* on the connection (after any call still in flight), then give the connection back.

        Shielded: a second cancellation cannot leave the connection half closed.
        """
        closing = asyncio.ensure_future(self._close(last))
        if self._pending is not None:
            self._pending.add(closing)
            closing.add_done_callback(self._pending.discard)
        await asyncio.shield(closing)

    async def _close(self, last: Callable[[Any], None] | None) -> None:
        inflight = self._inflight
        if inflight is not None and not inflight.done():
            await asyncio.wait([inflight])
        if self._sync_cm is not None and self._sync is None:  # cancelled while opening: did it open?
            if inflight is None or inflight.cancelled() or inflight.exception() is not None:
                self._sync_cm = None
            else:
                self._sync = inflight.result()
        async_conn, sync_cm, sync = self._async, self._sync_cm, self._sync
        self._async = self._sync_cm = self._sync = None
        try:
            if last is not None and (async_conn is not None or sync_cm is not None):
                if async_conn is not None:
                    await async_conn.run_sync(last)
                else:
                    await self._in_thread(lambda: last(sync))
        except Exception:
            logger.debug("ending a blocking request's lock failed (the pool rolls back)", exc_info=True)
        try:
            if async_conn is not None:
                await async_conn.close()
            elif sync_cm is not None:
                await self._in_thread(lambda: sync_cm.__exit__(None, None, None))
        except Exception:
            logger.debug("returning a held connection failed", exc_info=True)

    async def _shielded(self, work: Awaitable[T]) -> T:
        future = self._inflight = asyncio.ensure_future(work)
        return await asyncio.shield(future)

    async def _in_thread(self, fn: Callable[[], T]) -> T:
        if self._threads is None:
            return fn()
        return await self._threads.run(fn)
