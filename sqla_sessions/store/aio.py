"""Run a handler's session logic from async code without blocking the event loop.

There is one implementation of the logic (`BaseHandler.load_on`, `write_on`, …, and
`locking.LockedRequest` for blocking requests); this module only decides where it runs:

- `DatabaseHandler` (default): on the handler's own sync engine, in `WorkerThreads`. The loop never
  waits for the database; a request holds a thread only while its statements run, and on
  PostgreSQL the wait for the server happens in psycopg with the GIL released. Measured here
  (benchmarks/http_throughput.py, PostgreSQL, 64 clients, one core) this serves more requests than
  the AsyncEngine path: psycopg's async machinery plus SQLAlchemy's greenlet bridge cost more per
  statement than one thread hop.
- `DatabaseHandler` with `async_engine=` (an `AsyncEngine`, or "auto" to derive one: psycopg 3 for
  PostgreSQL, aiosqlite for a SQLite file, aiomysql for MariaDB/MySQL when installed): on an
  `AsyncEngine` connection through `AsyncConnection.run_sync`, so every statement awaits its socket
  and no thread is involved (choose it when thousands of requests wait on the database at once).
- `MemoryHandler`: inline (no I/O).

The work is split by what each part does: `aio_runner` (where the logic runs, and the threads or
engine it runs on), `aio_gates` (one blocking request per session past the gate in this process),
`aio_connection` (a connection held for a whole blocking request) and `aio_blocking` (a blocking
request and its expiry). Every name this module defined before stays importable from here.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Literal

from ..core.ids import is_valid_session_id, session_key_of
from ..core.records import SaveAction, SessionInfo
from ..core.session import Session
from ..core.unit import Saved, UnitOfWork
from .aio_blocking import EXPIRY_GRACE as EXPIRY_GRACE
from .aio_blocking import AsyncBlockingSession as AsyncBlockingSession
from .aio_blocking import _AsyncOnly as _AsyncOnly
from .aio_blocking import _discard as _discard
from .aio_connection import HeldConnection as HeldConnection
from .aio_gates import MAX_QUEUED_PER_SESSION as MAX_QUEUED_PER_SESSION
from .aio_gates import AsyncSessionGates
from .aio_gates import _Gate as _Gate
from .aio_gates import _settle as _settle
from .aio_runner import THREADS as THREADS
from .aio_runner import AsyncRunner
from .aio_runner import _create_async_engine as _create_async_engine
from .aio_runner import _greenlet_available as _greenlet_available
from .aio_runner import async_url as async_url
from .batching import Batcher
from .fairshare import Release, SessionSlots, no_hold
from .handlers.base import BaseHandler

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncEngine

logger = logging.getLogger("sqla_sessions")

#: Batches of loads, and of saves, running at once (each on one thread and one connection), and their
#: largest size (see `sqla_sessions.store.batching`).
LOAD_BATCHES = 2
SAVE_BATCHES = 2
MAX_BATCH = 64


class AsyncSessionStore(AsyncRunner):
    """Async `load`/`save`/`gc` (and device management) over any handler."""

    def __init__(self, handler: BaseHandler[Any], *, async_engine: AsyncEngine | Literal["auto"] | None = None) -> None:
        super().__init__(handler, async_engine=async_engine)  # the threads or the engine (`aio_runner`)
        self._gates = AsyncSessionGates()  # blocking requests of a session id in this process
        self._locked_here = self._gates.locked_here  # the same dict: each save checks it in one lookup
        self._slots = SessionSlots(handler.share)  # a session's saves in flight here, at most its share
        self._loads: Batcher[tuple[str, float], Session] | None = None
        self._saves: Batcher[tuple[UnitOfWork, float], Saved] | None = None
        threads = self._threads
        if threads is not None and self.config.batch_requests:
            self._loads = Batcher(threads, self._load_batch, max_in_flight=LOAD_BATCHES, max_size=MAX_BATCH)
            self._saves = Batcher(
                threads,
                self._save_batch,
                max_in_flight=SAVE_BATCHES,
                max_size=MAX_BATCH,
                keep_cancelled=True,
                alone=self._save_alone,
            )

    async def load(self, session_id: str | None) -> Session:
        session = self.handler.fresh_unless_valid(session_id)
        if session is None:
            assert session_id is not None
            if self._loads is not None:
                session = await self._loads.submit((session_id, time.monotonic() + self.config.pool_timeout))
            else:
                session = await self.run_on_connection(self.handler.load_on, session_id)
        session.bind(self.handler, self)
        return session

    def _load_batch(self, batch: list[tuple[str, float]]) -> list[Session | Exception]:
        """In a worker thread: the loads of concurrent requests, one read for all (`load_many_on`)."""
        return self._in_time(batch, self.handler.load_many_on, read=True)

    def _save_batch(self, batch: list[tuple[UnitOfWork, float]]) -> list[Saved | Exception | None]:
        """In a worker thread: the saves of concurrent requests, the plain ones in one statement (`write_many_on`)."""
        return self._in_time(batch, self.handler.write_many_on)

    def _save_alone(self, item: tuple[UnitOfWork, float]) -> Saved:
        """In a worker thread: a save its batch left (compare-and-set, then the merge under the lock)."""
        return self._run_in_thread(self.handler.write_on, (item[0],))

    def _in_time(
        self, batch: list[tuple[Any, float]], run: Callable[[Any, list[Any]], list[Any]], *, read: bool = False
    ) -> list[Any]:
        """`run(connection, items)` for the items of *batch* still within their deadline; one queued past
        it fails as a pool timeout would, as any call queued behind busy threads."""
        now = time.monotonic()
        late = [now > deadline for _, deadline in batch]
        items = [item for (item, _), is_late in zip(batch, late, strict=True) if not is_late]
        if not items:
            done: Any = iter(())
        elif read:  # sent again on a fresh connection if this one turned out dead
            done = iter(self.handler.read(run, items))
        else:
            done = iter(self._run_in_thread(run, (items,)))
        return [self._no_thread_in_time() if is_late else next(done) for is_late in late]

    async def save(self, session: Session, *, end_of_request: bool = False) -> SaveAction:
        handler = self.handler
        pending = session.pending_save
        if pending is not None:
            await asyncio.shield(pending)  # an earlier save nobody waited for: taken in first
        epoch = session.epoch
        try:
            unit = handler.plan_save(session, end_of_request=end_of_request)
            if unit is None:
                action = SaveAction.NOTHING
            else:
                leave = await self._turn(unit)
                try:
                    writing = self._write(unit)
                except BaseException:
                    leave()
                    raise
                if isinstance(writing, asyncio.Future):
                    try:
                        saved = await asyncio.shield(writing)
                    except asyncio.CancelledError:
                        if not writing.done():  # the slot is the write's until it ends
                            writing.add_done_callback(lambda _: leave())
                        else:
                            leave()
                        self._adopt_when_written(session, unit, epoch, writing)
                        raise
                    except BaseException:
                        leave()
                        raise
                else:
                    saved = writing
                leave()
                session.adopt(saved, unit)
                action = saved.action
        except BaseException as exc:
            session.run_saved_callbacks(exc)
            raise
        if session.has_saved_callbacks:  # enqueueing jobs talks to a broker: not on the event loop
            await self.call(lambda: session.run_saved_callbacks(None))
        return action

    async def _turn(self, unit: UnitOfWork) -> Release:
        """A slot of the session's share for writing *unit* (`fairshare.SessionSlots`), taken at once
        when one is free: a burst of one session's saves waits its turn on the loop instead of taking
        every thread, and so does a save of a session a blocking request holds here. Returns its end."""
        loaded = unit.loaded
        if loaded is None:
            return no_hold  # a first write: a new row nobody else can hold up
        wait = self.config.write_wait_seconds
        if self._locked_here:
            await self._gates.until_unlocked_here(loaded.key, wait, self.config.block_lock_seconds)
        # A free slot is taken without an await (the common case); `enter` waits for one.
        return self._slots.take(loaded.key) or await self._slots.enter(loaded.key, wait)

    def _write(self, unit: UnitOfWork) -> asyncio.Future[Saved] | Saved:
        """Start writing *unit*: a future that ends with the write whether or not anyone still waits
        for it (or, with no threads to run it in, the write done inline)."""
        handler = self.handler
        deadline = time.monotonic() + self.config.pool_timeout
        if self._saves is not None and handler.batches_writes and handler.batchable(unit):
            # What its batch cannot write without waiting (a lost race, a locked row) the batcher
            # saves alone, to its end even if this request is cancelled meanwhile.
            return self._saves.enqueue((unit, deadline))
        if self._threads is not None:
            # A call queued behind busy threads for longer than a pooled connection may take fails
            # as a pool timeout would (503).
            return self._threads.submit(self._run_in_thread, handler.write_on, (unit,), deadline)
        if self._engine is not None:
            return asyncio.ensure_future(self.run_on_connection(handler.write_on, unit))
        return self._run_in_thread(handler.write_on, (unit,))

    def _adopt_when_written(
        self, session: Session, unit: UnitOfWork, epoch: int, writing: asyncio.Future[Saved]
    ) -> None:
        """The caller stopped waiting, the write goes on: what it stores is taken in when it ends, and
        the session's next save waits for that (else it would write the same changes twice)."""
        taken_in: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        session.pending_save = taken_in
        self._pending.add(taken_in)  # aclose() waits for it
        taken_in.add_done_callback(self._pending.discard)

        def done(future: asyncio.Future[Saved]) -> None:
            try:
                if not future.cancelled() and future.exception() is None:
                    session.adopt_late(future.result(), unit, epoch)
            finally:
                if session.pending_save is taken_in:
                    session.pending_save = None
                taken_in.set_result(None)

        writing.add_done_callback(done)

    async def load_by_key(self, key: str) -> Session | None:
        return await self.call(lambda: self.handler.load_by_key(key))

    async def choose_session_id(self, candidates: list[str]) -> str | None:
        """`BaseHandler.choose_session_id`: I/O only when several well-formed ids were presented."""
        if len(candidates) <= 1:
            return candidates[0] if candidates else None
        return await self.run_on_connection(self.handler.choose_on, candidates)

    async def reload(self, session: Session) -> None:
        """`await session.areload()`, for code written against earlier versions."""
        await session.areload()

    async def gc(self, *, max_batches: int | None = None) -> int:
        # A paced sweep sleeps between batches: in a thread, never on the loop (memory runs inline).
        pause = None if self._threads is not None or self._engine is not None else 0
        return await self.call(lambda: self.handler.gc(max_batches=max_batches, pause=pause))

    async def list_sessions(self, user_id: object) -> list[SessionInfo]:
        """A user's live sessions (devices), most recently active first."""
        return await self.call(lambda: self.handler.list_sessions(user_id))

    async def revoke(self, key: str) -> bool:
        """Log one session out."""
        return await self.call(lambda: self.handler.revoke(key))

    async def revoke_user(self, user_id: object, *, except_key: str | None = None) -> int:
        """Log a user out everywhere, optionally keeping one session."""
        return await self.call(lambda: self.handler.revoke_user(user_id, except_key=except_key))

    async def open_blocking(self, session_id: str | None, *, address: str | None = None) -> AsyncBlockingSession:
        """Lock the session for a blocking request (see `sqla_sessions.store.locking`); `LockTimeout` past the wait.

        In one process, one blocking request per session waits for (or holds) the database lock; the
        others queue here, holding no thread and no connection, and past `MAX_QUEUED_PER_SESSION` are
        answered at once (`LockTimeout`: 423). So one browser firing a burst at a blocking route cannot
        take the pool from everyone else. The hold counts toward the session's and the client
        *address*'s share of the pool (`sqla_sessions.store.fairshare`): past it, `LockTimeout` or
        `TooManyRequests` at once.
        """
        if not is_valid_session_id(session_id):
            return await AsyncBlockingSession.open(self, session_id)
        assert session_id is not None
        key = session_key_of(session_id)
        gates = self._gates
        leave = await gates.enter(session_id, self.config.block_wait_seconds, self.config.block_lock_seconds)
        try:
            end_hold = self.handler.share.hold_blocking(key, address, wait=0)
        except BaseException:
            leave()
            raise
        locked: list[asyncio.Future[None]] = []

        def done() -> None:
            end_hold()
            leave()
            for unlocked in locked:
                gates.unlock_here(key, unlocked)

        held = await AsyncBlockingSession.open(self, session_id, on_done=done)
        if held.locked:  # its secret checked: this session's saves here wait for it, holding nothing
            locked.append(gates.lock_here(key))
        return held

    async def aclose(self) -> None:
        """Dispose of what this store created (its AsyncEngine, its threads), once what cancelled requests
        still finish is done: a save and its commit, its jobs, the connection given back (bounded by a
        lock's hold and a pool wait)."""
        bound = self.config.block_lock_seconds + self.config.pool_timeout
        if self._pending:
            await asyncio.wait(list(self._pending), timeout=bound)
        for batcher in (self._loads, self._saves):
            if batcher is not None:
                await batcher.drain(bound)
        await self._dispose(bound)
