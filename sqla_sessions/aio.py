"""Run a handler's session logic from async code without blocking the event loop.

There is one implementation of the logic (`BaseHandler.load_on`, `write_on`, …, and
`locking.LockedRequest` for blocking requests); this module only decides where it runs:

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
import contextlib
import importlib.util
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import TYPE_CHECKING, Any, Literal, TypeVar, cast

from sqlalchemy.engine import URL
from sqlalchemy.exc import TimeoutError as PoolTimeout

from .batching import Batcher
from .config import SessionConfig
from .errors import LockTimeout, SessionInterrupted
from .fairshare import Release, SessionSlots, no_hold
from .handlers.base import BaseHandler, LockStrategy
from .handlers.database import DatabaseHandler
from .handlers.prepared import switch_for
from .ids import is_valid_session_id, session_key_of
from .locking import LOST_LOCK, LockedRequest, lost_lock, poll_delays
from .records import SaveAction, SessionInfo
from .session import Session
from .threads import WorkerThreads
from .unit import Saved, UnitOfWork

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncEngine

logger = logging.getLogger("sqla_sessions")
T = TypeVar("T")

#: Threads for databases without an async driver; a request holds one only while a statement runs.
THREADS = 32
#: Blocking requests of one session that may queue in one process behind the one that waits for or
#: holds its lock; more are answered `lock_timeout_status` (423) at once.
MAX_QUEUED_PER_SESSION = 8
#: Seconds past `block_lock_seconds` after which a blocking request's idle connection is given back.
EXPIRY_GRACE = 1.0
#: Batches of loads, and of saves, running at once (each on one thread and one connection), and their
#: largest size (see `sqla_sessions.batching`).
LOAD_BATCHES = 2
SAVE_BATCHES = 2
MAX_BATCH = 64


class _Gate:
    """The blocking requests of one session in this process: one at a time past the gate, for at most
    `block_lock_seconds` (as the database lock: a holder past it no longer keeps the others waiting)."""

    __slots__ = ("changed", "owner", "since", "users")

    def __init__(self) -> None:
        self.changed = asyncio.Condition()
        self.owner: object | None = None
        self.since = 0.0
        self.users = 0


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
    """Async `load`/`save`/`gc` (and device management) over any handler."""

    def __init__(self, handler: BaseHandler[Any], *, async_engine: AsyncEngine | Literal["auto"] | None = None) -> None:
        self.handler = handler
        self.config = handler.config
        self._engine: AsyncEngine | None = None
        self._owns_engine = False
        self._threads: WorkerThreads | None = None
        self._gates: dict[str, _Gate] = {}  # blocking requests of a session id in this process
        # Session keys whose lock a blocking request here holds: when it took it, and its end.
        self._locked_here: dict[str, list[tuple[float, asyncio.Future[None]]]] = {}
        self._slots = SessionSlots(handler.share)  # a session's saves in flight here, at most its share
        self._pending: set[asyncio.Future[Any]] = set()  # what cancelled requests still finish (see aclose)
        self._loads: Batcher[tuple[str, float], Session] | None = None
        self._saves: Batcher[tuple[UnitOfWork, float], Saved] | None = None
        if not isinstance(handler, DatabaseHandler):
            return
        if async_engine == "auto":
            url = async_url(handler.engine.url)
            if url is not None and _greenlet_available():
                self._engine = _create_async_engine(url, handler)
                self._owns_engine = True
        elif async_engine is not None:
            self._engine = async_engine
        if self._engine is not None:
            if self.config.prepared_statements == "auto":  # its own pool: its own switch (`handlers.prepared`)
                handler.runner.use_also(
                    self._engine.sync_engine, switch_for(self._engine.sync_engine, named=False, detects=True)
                )
            return
        threads = self._threads = WorkerThreads(THREADS)
        if self.config.batch_requests:
            self._loads = Batcher(threads, self._load_batch, max_in_flight=LOAD_BATCHES, max_size=MAX_BATCH)
            self._saves = Batcher(
                threads,
                self._save_batch,
                max_in_flight=SAVE_BATCHES,
                max_size=MAX_BATCH,
                keep_cancelled=True,
                alone=self._save_alone,
            )

    @property
    def mode(self) -> str:
        """'async-engine', 'threads' or 'inline': where the handler's logic runs."""
        return "async-engine" if self._engine is not None else "threads" if self._threads else "inline"

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

    def _no_thread_in_time(self) -> PoolTimeout:
        return PoolTimeout(f"no worker thread free within pool_timeout ({self.config.pool_timeout:g} s)")

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
            await self._until_unlocked_here(loaded.key, wait)
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
        """Lock the session for a blocking request (see `sqla_sessions.locking`); `LockTimeout` past the wait.

        In one process, one blocking request per session waits for (or holds) the database lock; the
        others queue here, holding no thread and no connection, and past `MAX_QUEUED_PER_SESSION` are
        answered at once (`LockTimeout`: 423). So one browser firing a burst at a blocking route cannot
        take the pool from everyone else. The hold counts toward the session's and the client
        *address*'s share of the pool (`sqla_sessions.fairshare`): past it, `LockTimeout` or
        `TooManyRequests` at once.
        """
        if not is_valid_session_id(session_id):
            return await AsyncBlockingSession.open(self, session_id)
        assert session_id is not None
        key = session_key_of(session_id)
        gate = self._gates.setdefault(session_id, _Gate())  # the id's: a known key alone queues behind nobody
        if gate.users > MAX_QUEUED_PER_SESSION:  # the one past the gate, and a full queue
            raise LockTimeout(1)
        gate.users += 1
        token = object()
        wait, hold = self.config.block_wait_seconds, self.config.block_lock_seconds
        deadline = time.monotonic() + wait
        try:
            async with gate.changed:
                while gate.owner is not None and time.monotonic() - gate.since < hold:
                    if time.monotonic() >= deadline:
                        raise LockTimeout(wait)
                    remaining = min(deadline, gate.since + hold) - time.monotonic()
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(gate.changed.wait(), max(remaining, 0.001))
                gate.owner, gate.since = token, time.monotonic()
            end_hold = self.handler.share.hold_blocking(key, address, wait=0)
        except BaseException:
            self._leave(session_id, gate, token)
            raise
        locked: list[asyncio.Future[None]] = []

        def done() -> None:
            end_hold()
            self._leave(session_id, gate, token)
            for unlocked in locked:
                self._unlock_here(key, unlocked)

        held = await AsyncBlockingSession.open(self, session_id, on_done=done)
        if held.locked:  # its secret checked: this session's saves here wait for it, holding nothing
            unlocked = asyncio.get_running_loop().create_future()
            self._locked_here.setdefault(key, []).append((time.monotonic(), unlocked))
            locked.append(unlocked)
        return held

    def _unlock_here(self, key: str, unlocked: asyncio.Future[None]) -> None:
        holds = [entry for entry in self._locked_here.get(key, []) if entry[1] is not unlocked]
        if holds:
            self._locked_here[key] = holds
        else:
            self._locked_here.pop(key, None)
        if not unlocked.done():
            unlocked.get_loop().call_soon_threadsafe(_settle, unlocked)

    def _leave(self, session_id: str, gate: _Gate, token: object) -> None:
        if gate.owner is token:
            gate.owner = None
            asyncio.ensure_future(self._notify(gate))  # wake the next waiter (this may run outside the loop's task)
        gate.users -= 1
        if gate.users == 0 and self._gates.get(session_id) is gate:
            del self._gates[session_id]

    @staticmethod
    async def _notify(gate: _Gate) -> None:
        async with gate.changed:
            gate.changed.notify()

    async def _until_unlocked_here(self, key: str, wait: float) -> None:
        """Wait (holding nothing) while a blocking request of this process holds the session's lock, for
        at most *wait* (`LockTimeout`) and no longer than its hold's bound: in the database the save
        would only wait for the row's lock, holding a thread and a connection."""
        deadline = time.monotonic() + wait
        while holds := self._locked_here.get(key):
            since, unlocked = holds[0]
            now = time.monotonic()
            lapses = since + self.config.block_lock_seconds
            if lapses <= now:
                return  # past its bound the database takes the lock back: the save need not wait
            if now >= deadline:
                raise LockTimeout(wait)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(unlocked), min(deadline, lapses) - now)

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
        if self._engine is not None and self._owns_engine:
            await self._engine.dispose()
        if self._threads is not None:
            self._threads.close()
            # What cancelled requests handed to a thread (a save, its merge) ends before the process
            # may: the threads are daemons, and an exiting interpreter would cut them off mid-write.
            await asyncio.to_thread(self._threads.join, bound)

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


def _discard(conn: Any) -> None:
    """The last step on an expired hold's connection: the pool drops it (its server session ends, and
    with it the transaction and the row lock, if the database has not ended them already)."""
    conn.invalidate()


def _settle(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)
