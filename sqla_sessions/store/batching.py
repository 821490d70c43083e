"""`Batcher`, `ThreadBatcher`: the same call from many concurrent requests, run as one call per batch.

Under load, many requests of one process wait at the same moment for the same kind of statement
(load a session by key, compare-and-set a save). Run one by one, each pays a thread hand-off, a pool
checkout, a round trip and, for a write, a commit of its own. A batcher queues them and hands every
request queued so far to one call, which runs them as one statement (`SELECT … WHERE key = ANY(…)`,
one multi-row `UPDATE`) on one connection.

Batches form by themselves (no timer, no added latency): a request queues, and a batch leaves at
once if fewer than `max_in_flight` batches are running; otherwise it leaves when one of them comes
back, with everything that queued meanwhile.

A batch call must never wait for anything but its own statement (a row lock, say): every request of
the batch would wait with it, and with `max_in_flight` such batches, every request of the process.
What it cannot do without waiting, it leaves to its request to do alone (the handlers' `*_many_on`
return None for those).
"""

from __future__ import annotations

import asyncio
import collections
import threading
import weakref
from collections.abc import Callable
from typing import Any, Generic, TypeVar, cast

from .threads import WorkerThreads

I = TypeVar("I")  # noqa: E741  # an item queued by one request
R = TypeVar("R")  # what that request gets back

#: What a batch call returns for each of its items, in order: a result, or the error for that item.
Outcome = Any


class _LoopQueue:
    """A `Batcher`'s queue and running batches on one event loop."""

    __slots__ = ("alone", "queue", "running", "scheduled")

    def __init__(self) -> None:
        self.queue: list[tuple[Any, asyncio.Future[Any]]] = []
        self.running: set[asyncio.Future[list[Outcome]]] = set()
        self.alone: set[asyncio.Future[Any]] = set()  # items their batch left to run alone
        self.scheduled = False


class Batcher(Generic[I, R]):
    """Queue items from concurrent requests on an event loop; run them `max_size` at most per call of
    *run* in *threads*.

    *run* gets the items of one batch and returns one outcome per item, in order: a value, or a
    `BaseException` raised to that item's request alone. An exception from *run* itself goes to
    every request of the batch.

    *keep_cancelled*: an item whose request was cancelled before its batch left still runs (a save
    a request asked for is carried out, as a call already handed to a thread is); otherwise it is
    dropped (a load nobody waits for).

    *alone*: for an item whose outcome is None (its batch could not do it without waiting), a call
    that does it by itself, in a thread of its own; it runs whether or not its request still waits,
    so a save is carried out to its end even for a request cancelled meanwhile.

    Each event loop has a queue of its own (a store used from several `asyncio.run` calls, or from
    loops in several threads): a loop closed with a batch in flight takes only its own queue with it.
    """

    def __init__(
        self,
        threads: WorkerThreads,
        run: Callable[[list[I]], list[Outcome]],
        *,
        max_in_flight: int,
        max_size: int,
        keep_cancelled: bool = False,
        alone: Callable[[I], R] | None = None,
    ) -> None:
        self._threads = threads
        self._run = run
        self._alone = alone
        self._max_in_flight = max_in_flight
        self._max_size = max_size
        self._keep_cancelled = keep_cancelled
        self._loops: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _LoopQueue] = weakref.WeakKeyDictionary()

    async def submit(self, item: I) -> R:
        """Queue *item* and return (or raise) its outcome once its batch has run."""
        return await self.enqueue(item)

    def enqueue(self, item: I) -> asyncio.Future[R]:
        """Queue *item*; the future (of the running loop) gets its outcome once its batch has run."""
        loop = asyncio.get_running_loop()
        state = self._loops.get(loop)
        if state is None:
            state = self._loops.setdefault(loop, _LoopQueue())
        future: asyncio.Future[R] = loop.create_future()
        state.queue.append((item, future))
        if not state.scheduled:
            # At the next turn of the loop: the requests whose bytes arrived in this one join the batch.
            state.scheduled = True
            loop.call_soon(self._dispatch, state)
        return future

    async def drain(self, timeout: float) -> None:
        """Wait (at most *timeout* seconds) until everything queued on this loop so far has run."""
        loop = asyncio.get_running_loop()
        state = self._loops.get(loop)
        deadline = loop.time() + timeout
        while state is not None and (state.running or state.queue or state.alone):
            remaining = deadline - loop.time()
            if remaining <= 0:
                return
            if state.running or state.alone:
                await asyncio.wait([*state.running, *state.alone], timeout=remaining)
            else:
                await asyncio.sleep(0)  # a dispatch is scheduled

    def _dispatch(self, state: _LoopQueue) -> None:
        state.scheduled = False
        while state.queue and len(state.running) < self._max_in_flight:
            batch, state.queue = state.queue[: self._max_size], state.queue[self._max_size :]
            if not self._keep_cancelled:
                batch = [entry for entry in batch if not entry[1].cancelled()]
                if not batch:
                    continue
            try:
                call = self._threads.submit(self._run, [item for item, _ in batch])
            except RuntimeError as exc:  # the threads are closed (the store shut down)
                for _, future in batch:
                    if not future.done():
                        future.set_exception(exc)
                continue
            state.running.add(call)
            call.add_done_callback(lambda done, batch=batch: self._finished(state, done, batch))  # type: ignore[misc]

    def _finished(
        self, state: _LoopQueue, call: asyncio.Future[list[Outcome]], batch: list[tuple[I, asyncio.Future[R]]]
    ) -> None:
        state.running.discard(call)
        if call.cancelled():  # pragma: no cover - nothing cancels it (the futures handed out are others)
            outcomes: list[Outcome] = [asyncio.CancelledError()] * len(batch)
        elif call.exception() is not None:
            outcomes = [call.exception()] * len(batch)
        else:
            try:
                outcomes = _checked(call.result(), len(batch))
            except RuntimeError as exc:
                outcomes = [exc] * len(batch)
        for (item, future), outcome in zip(batch, outcomes, strict=True):
            if outcome is None and self._alone is not None:
                self._run_alone(state, item, future)
                continue
            if future.done():
                continue  # its request was cancelled: nobody is waiting
            if isinstance(outcome, BaseException):
                future.set_exception(outcome)
            else:
                future.set_result(outcome)
        if state.queue and not state.scheduled:
            self._dispatch(state)

    def _run_alone(self, state: _LoopQueue, item: I, future: asyncio.Future[R]) -> None:
        assert self._alone is not None
        try:
            call = self._threads.submit(self._alone, item)
        except RuntimeError as exc:  # the threads are closed (the store shut down)
            if not future.done():
                future.set_exception(exc)
            return
        state.alone.add(call)

        def settle(done: asyncio.Future[R]) -> None:
            state.alone.discard(done)
            if future.done():
                return  # cancelled meanwhile: the call still ran to its end
            if done.exception() is not None:
                future.set_exception(cast(BaseException, done.exception()))
            else:
                future.set_result(done.result())

        call.add_done_callback(settle)


class _Slot:
    """One thread's item in a `ThreadBatcher`: what it waits for, or the batch it is handed to lead."""

    __slots__ = ("batch", "done", "item", "outcome")

    def __init__(self, item: Any) -> None:
        self.item = item
        self.done = threading.Event()
        self.outcome: Outcome = None
        self.batch: list[_Slot] | None = None


class ThreadBatcher(Generic[I, R]):
    """`Batcher` for threads (WSGI servers, Django, workers): the same coalescing, no event loop.

    A thread that finds fewer than `max_in_flight` batches running runs its own item at once (alone,
    so an idle server adds no latency); the others queue. A thread whose batch is done hands everything
    queued meanwhile (up to `max_size`) to the first of those threads, which runs it as the next batch:
    no extra thread, and every item runs on a thread whose request waits for it.
    """

    def __init__(self, run: Callable[[list[I]], list[Outcome]], *, max_in_flight: int, max_size: int) -> None:
        self._run = run
        self._max_in_flight = max_in_flight
        self._max_size = max_size
        self._lock = threading.Lock()
        self._queue: collections.deque[_Slot] = collections.deque()
        self._in_flight = 0

    def submit(self, item: I) -> R:
        with self._lock:
            slot = None
            if self._in_flight < self._max_in_flight:
                self._in_flight += 1
            else:
                slot = _Slot(item)
                self._queue.append(slot)
        if slot is None:  # alone, at once: the common case on a server that is not busy
            try:
                outcome = _checked(self._run([item]), 1)[0]
            finally:
                self._hand_off()
        else:
            self._wait(slot)
            if slot.batch is not None:  # handed the next batch to run
                self._lead(slot.batch)
            outcome = slot.outcome
        if isinstance(outcome, BaseException):
            raise outcome
        return cast(R, outcome)

    def _wait(self, slot: _Slot) -> None:
        """Wait for *slot*'s outcome, or for a batch to lead. Interrupted (a signal handler's exception,
        a greenlet timeout), it takes its item out of the queue; if a batch was handed to it meanwhile,
        it still leads that one first, or the requests in it would wait forever."""
        try:
            slot.done.wait()
        except BaseException:
            with self._lock:
                if slot in self._queue:
                    self._queue.remove(slot)
                    raise
                lead = slot.batch
            if lead is not None:
                self._lead(lead)
            raise

    def _lead(self, batch: list[_Slot]) -> None:
        """Run *batch* (its first item is this thread's own), hand the queue on, wake the others."""
        try:
            outcomes = _checked(self._run([slot.item for slot in batch]), len(batch))
        except Exception as exc:  # every request of the batch gets it
            outcomes = [exc] * len(batch)
        except BaseException as exc:  # this thread's own interruption: the others get an error of theirs
            outcomes = [RuntimeError(f"the batch was interrupted ({exc!r})")] * len(batch)
            outcomes[0] = exc
        for slot, outcome in zip(batch, outcomes, strict=True):
            slot.outcome = outcome
        batch[0].batch = None
        try:
            self._hand_off()
        finally:  # whatever interrupts this thread now, the others of its batch have their outcomes
            for slot in batch[1:]:
                slot.done.set()

    def _hand_off(self) -> None:
        """A batch is done: what queued meanwhile (up to `max_size`) goes to its first thread to run.

        An interruption while taking the lock (a greenlet timeout, a signal handler's exception) is
        raised only once the queue is handed on: otherwise the threads in it would wait forever, and
        the batch's place in flight would never come back."""
        interrupted: BaseException | None = None
        while True:
            try:
                self._lock.acquire()
                break
            except BaseException as exc:
                interrupted = exc
        try:
            following = [self._queue.popleft() for _ in range(min(self._max_size, len(self._queue)))]
            if following:
                following[0].batch = following  # under the lock: `_wait` reads it there
            else:
                self._in_flight -= 1
        finally:
            self._lock.release()
        if following:
            following[0].done.set()
        if interrupted is not None:
            raise interrupted


def _checked(outcomes: list[Outcome], expected: int) -> list[Outcome]:
    """*outcomes*, if there is one per item: otherwise nobody could tell whose is whose."""
    if len(outcomes) != expected:
        raise RuntimeError(f"a batch of {expected} items came back with {len(outcomes)} outcomes")
    return outcomes
