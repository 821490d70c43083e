"""`Batcher`: concurrent calls coalesce into batches, each request gets its own outcome, and the
bounds (batches in flight, batch size) hold. Real worker threads, no database."""

from __future__ import annotations

import asyncio
import signal
import threading
import time

import pytest

from sqla_sessions.store.batching import Batcher, ThreadBatcher
from sqla_sessions.store.threads import WorkerThreads


class Recorder:
    """A batch call that records its batches, sleeps a little (a round trip), and doubles each item."""

    def __init__(self, delay: float = 0.01) -> None:
        self.batches: list[list[int]] = []
        self.running = 0
        self.peak = 0
        self.delay = delay
        self.lock = threading.Lock()

    def __call__(self, items: list[int]) -> list[object]:
        with self.lock:
            self.batches.append(list(items))
            self.running += 1
            self.peak = max(self.peak, self.running)
        time.sleep(self.delay)
        with self.lock:
            self.running -= 1
        return [ValueError(f"bad {item}") if item < 0 else item * 2 for item in items]


def run(coroutine_factory):  # type: ignore[no-untyped-def]
    threads = WorkerThreads(8)
    try:
        return asyncio.run(coroutine_factory(threads))
    finally:
        threads.close()


def test_a_lone_request_is_a_batch_of_one() -> None:
    recorder = Recorder()

    async def main(threads: WorkerThreads) -> int:
        return await Batcher(threads, recorder, max_in_flight=2, max_size=10).submit(21)

    assert run(main) == 42
    assert recorder.batches == [[21]]


def test_concurrent_requests_share_batches_and_each_gets_its_own_result() -> None:
    recorder = Recorder()

    async def main(threads: WorkerThreads) -> list[int]:
        batcher: Batcher[int, int] = Batcher(threads, recorder, max_in_flight=2, max_size=16)
        return await asyncio.gather(*(batcher.submit(n) for n in range(100)))

    assert run(main) == [n * 2 for n in range(100)]
    assert sorted(item for batch in recorder.batches for item in batch) == list(range(100))
    assert len(recorder.batches) < 20  # 100 requests in at most ~7 batches of 16, not 100 calls
    assert max(len(batch) for batch in recorder.batches) <= 16
    assert recorder.peak <= 2


def test_requests_queued_behind_full_flight_leave_together_when_one_returns() -> None:
    recorder = Recorder(delay=0.05)

    async def main(threads: WorkerThreads) -> None:
        batcher: Batcher[int, int] = Batcher(threads, recorder, max_in_flight=1, max_size=64)
        first = asyncio.ensure_future(batcher.submit(0))
        await asyncio.sleep(0.01)  # the first batch is running
        rest = [asyncio.ensure_future(batcher.submit(n)) for n in range(1, 30)]
        await asyncio.gather(first, *rest)

    run(main)
    assert recorder.batches == [[0], list(range(1, 30))]


def test_an_error_for_one_item_reaches_that_request_alone() -> None:
    async def main(threads: WorkerThreads) -> list[object]:
        batcher: Batcher[int, int] = Batcher(threads, Recorder(), max_in_flight=1, max_size=8)
        return await asyncio.gather(*(batcher.submit(n) for n in (1, -2, 3)), return_exceptions=True)

    outcomes = run(main)
    assert outcomes[0] == 2 and outcomes[2] == 6
    assert isinstance(outcomes[1], ValueError) and str(outcomes[1]) == "bad -2"


def test_an_error_of_the_whole_call_reaches_every_request_of_the_batch() -> None:
    def broken(items: list[int]) -> list[object]:
        raise ConnectionError("database went away")

    async def main(threads: WorkerThreads) -> list[object]:
        batcher: Batcher[int, int] = Batcher(threads, broken, max_in_flight=1, max_size=8)
        return await asyncio.gather(*(batcher.submit(n) for n in range(5)), return_exceptions=True)

    assert all(isinstance(outcome, ConnectionError) for outcome in run(main))


@pytest.mark.parametrize("keep_cancelled", [False, True])
def test_a_request_cancelled_before_its_batch_left(keep_cancelled: bool) -> None:
    recorder = Recorder(delay=0.05)

    async def main(threads: WorkerThreads) -> None:
        batcher: Batcher[int, int] = Batcher(
            threads, recorder, max_in_flight=1, max_size=8, keep_cancelled=keep_cancelled
        )
        first = asyncio.ensure_future(batcher.submit(1))
        await asyncio.sleep(0.01)  # running: what follows queues
        queued = asyncio.ensure_future(batcher.submit(2))
        kept = asyncio.ensure_future(batcher.submit(3))
        await asyncio.sleep(0)
        queued.cancel()
        assert await first == 2 and await kept == 6
        with pytest.raises(asyncio.CancelledError):
            await queued
        await batcher.drain(5)

    run(main)
    # A save is still carried out for a request that went away; a load nobody waits for is not run.
    assert recorder.batches == ([[1], [2, 3]] if keep_cancelled else [[1], [3]])


def test_drain_waits_for_what_is_queued_and_running() -> None:
    recorder = Recorder(delay=0.05)

    async def main(threads: WorkerThreads) -> None:
        batcher: Batcher[int, int] = Batcher(threads, recorder, max_in_flight=1, max_size=2, keep_cancelled=True)
        tasks = [asyncio.ensure_future(batcher.submit(n)) for n in range(6)]
        await asyncio.sleep(0)
        for task in tasks:
            task.cancel()  # nobody waits any more; the saves still run
        await batcher.drain(5)
        assert sorted(item for batch in recorder.batches for item in batch) == list(range(6))

    run(main)


def test_after_the_threads_closed_a_request_fails_at_once() -> None:
    threads = WorkerThreads(2)
    threads.close()

    async def main() -> None:
        batcher: Batcher[int, int] = Batcher(threads, Recorder(), max_in_flight=1, max_size=8)
        with pytest.raises(RuntimeError, match="closed"):
            await asyncio.wait_for(batcher.submit(1), 5)

    asyncio.run(main())


def test_a_loop_closed_with_a_batch_in_flight_does_not_stall_the_next_loop() -> None:
    """One store used from several `asyncio.run` calls (a job per loop, per-test loops)."""
    threads = WorkerThreads(4)
    batcher: Batcher[int, int] = Batcher(threads, Recorder(delay=0.2), max_in_flight=1, max_size=8)

    async def leave_a_batch_running() -> None:
        asyncio.ensure_future(batcher.submit(1))
        await asyncio.sleep(0.05)  # dispatched: its thread is still at it when this loop closes

    asyncio.run(leave_a_batch_running())
    assert asyncio.run(asyncio.wait_for(batcher.submit(2), 5)) == 4
    threads.close()


def test_a_thread_interrupted_while_queued_leaves_the_queue_and_the_others_go_on() -> None:
    """A request timeout delivered as a signal-handler exception (gunicorn's, a SIGALRM of one's own)
    to a thread waiting for its batch: the next batch still runs, nobody waits forever."""
    release = threading.Event()

    def slow(items: list[int]) -> list[object]:
        release.wait(5)
        return [item * 2 for item in items]

    class Interrupted(Exception):
        pass

    def interrupt(signum: int, frame: object) -> None:
        raise Interrupted

    batcher: ThreadBatcher[int, int] = ThreadBatcher(slow, max_in_flight=1, max_size=8)
    results: list[int] = []
    leader = threading.Thread(target=lambda: results.append(batcher.submit(1)))
    leader.start()
    time.sleep(0.1)  # leading its batch
    previous = signal.signal(signal.SIGALRM, interrupt)
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.2)
        with pytest.raises(Interrupted):
            batcher.submit(2)  # queued behind the running batch, then interrupted
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    follower = threading.Thread(target=lambda: results.append(batcher.submit(3)))
    follower.start()
    time.sleep(0.1)
    release.set()
    leader.join(5)
    follower.join(5)
    assert not follower.is_alive() and sorted(results) == [2, 6]
    assert batcher.submit(4) == 8  # and the batcher is free again


def test_a_thread_batch_runs_concurrent_calls_together_and_raises_errors_to_their_own_threads() -> None:
    recorder = Recorder(delay=0.02)
    batcher: ThreadBatcher[int, int] = ThreadBatcher(recorder, max_in_flight=2, max_size=16)
    results: dict[int, object] = {}

    def call(item: int) -> None:
        try:
            results[item] = batcher.submit(item)
        except ValueError as exc:
            results[item] = exc

    workers = [threading.Thread(target=call, args=(item,)) for item in [*range(40), -1]]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(10)
    assert {item: results[item] for item in range(40)} == {item: item * 2 for item in range(40)}
    assert isinstance(results[-1], ValueError)
    assert len(recorder.batches) < 41 and recorder.peak <= 2


def test_a_leader_interrupted_while_handing_on_still_hands_on() -> None:
    """The interruption (a greenlet timeout at a contended lock, say) lands as a leader takes the lock
    to hand the queue on: the queue is handed on first, then the leader raises."""

    class Interrupted(BaseException):
        pass

    class InterruptibleLock:
        def __init__(self) -> None:
            self.lock = threading.Lock()
            self.armed_for: str | None = None

        def acquire(self) -> bool:
            if self.armed_for == threading.current_thread().name:
                self.armed_for = None
                raise Interrupted
            return self.lock.acquire()

        def release(self) -> None:
            self.lock.release()

        def __enter__(self) -> None:
            self.lock.acquire()

        def __exit__(self, *exc: object) -> None:
            self.lock.release()

    lock = InterruptibleLock()

    def run(items: list[str]) -> list[object]:
        time.sleep(0.1)
        if threading.current_thread().name == "first-follower":
            lock.armed_for = "first-follower"  # its batch ran: the interruption comes next
        return [f"done {item}" for item in items]

    batcher: ThreadBatcher[str, str] = ThreadBatcher(run, max_in_flight=1, max_size=8)
    batcher._lock = lock  # type: ignore[assignment]
    results: dict[str, object] = {}

    def call(name: str) -> None:
        try:
            results[name] = batcher.submit(name)
        except Interrupted:
            results[name] = "interrupted"

    threads = [threading.Thread(target=call, args=(name,), name=name) for name in ("leader",)]
    threads[0].start()
    time.sleep(0.03)
    for name in ("first-follower", "second", "third"):
        thread = threading.Thread(target=call, args=(name,), name=name)
        thread.start()
        threads.append(thread)
        time.sleep(0.01)
    for thread in threads:
        thread.join(5)
    assert not [thread.name for thread in threads if thread.is_alive()]
    assert results == {
        "leader": "done leader",
        "first-follower": "interrupted",
        "second": "done second",
        "third": "done third",
    }
    assert batcher.submit("later") == "done later"
