"""`WorkerThreads`: run blocking database calls off the event loop, cheaply.

`loop.run_in_executor` wraps every call in a `concurrent.futures.Future`, chains it to an asyncio
future and copies its state across under a lock: measured here (64 concurrent tasks, one core) it
costs ~20 µs of CPU more per call than handing the result back with one `call_soon_threadsafe`, and
anyio's `to_thread.run_sync` ~45 µs more. A session request makes one or two such calls, so this
module does the least that is correct: a queue of jobs, threads started on demand up to a limit
(as `ThreadPoolExecutor` does), and the result set on the caller's loop.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")

_Job = tuple[asyncio.AbstractEventLoop, "asyncio.Future[Any]", Callable[..., Any], tuple[Any, ...]]


class WorkerThreads:
    """At most *max_threads* daemon threads running the blocking calls awaited through `run`."""

    def __init__(self, max_threads: int, name: str = "sqla_sessions") -> None:
        self._max_threads = max_threads
        self._name = name
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        # Threads that finished a job and nobody has counted on since, as ThreadPoolExecutor's idle
        # semaphore; a plain lock around an int costs far less than `threading.Semaphore` here.
        self._idle = 0
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()
        self._closed = False

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """Call `fn(*args)` in a worker thread and return (or raise) what it did.

        Cancelling the awaiting task does not stop the call; its result is dropped.
        """
        return await self.submit(fn, *args)

    def submit(self, fn: Callable[..., T], *args: Any) -> asyncio.Future[T]:
        """Queue `fn(*args)` for a worker thread; the future (of the running loop) gets what it returned
        or raised. Cancelling the future does not stop the call."""
        if self._closed:
            raise RuntimeError("WorkerThreads is closed")
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._jobs.put((future.get_loop(), future, fn, args))
        self._count_on_a_thread()
        return future

    def close(self) -> None:
        """Let the threads finish the jobs queued so far, then end (without waiting for them here)."""
        with self._lock:
            self._closed = True
            for _ in self._threads:
                self._jobs.put(None)

    def join(self, timeout: float) -> None:
        """After `close`: wait (at most *timeout* seconds in all) for the threads to finish their jobs
        (all but the calling thread, when it is one of them: it cannot wait for itself)."""
        deadline = time.monotonic() + timeout
        current = threading.current_thread()
        for thread in list(self._threads):
            if thread is not current:
                thread.join(max(0.0, deadline - time.monotonic()))

    def _count_on_a_thread(self) -> None:
        """Claim an idle thread for the job just queued, or start one.

        A job must not wait behind a thread that is blocked (on a row lock, say, that the job itself
        would release), so a thread once counted on is not counted on again until it is done.
        """
        with self._lock:
            if self._idle:
                self._idle -= 1
                return
            if self._closed or len(self._threads) >= self._max_threads:
                return  # at the limit: the first thread to finish takes it
            thread = threading.Thread(target=self._work, name=f"{self._name}_{len(self._threads)}", daemon=True)
            self._threads.append(thread)
        thread.start()

    def _work(self) -> None:
        jobs = self._jobs
        lock = self._lock
        while True:
            job = jobs.get()
            if job is None:
                return
            loop, future, fn, args = job
            del job
            try:
                result, error = fn(*args), None
            except BaseException as exc:  # handed to the awaiting task, whatever it is
                result, error = None, exc
            try:
                loop.call_soon_threadsafe(_resolve, future, result, error)
            except RuntimeError:
                pass  # the loop is closed: nobody is waiting any more
            del loop, future, fn, args, result, error
            with lock:
                self._idle += 1


def _resolve(future: asyncio.Future[Any], result: Any, error: BaseException | None) -> None:
    if future.cancelled():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)
