"""`WorkerThreads`: results, errors, the thread limit, cancellation and shutdown."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from sqla_sessions.store.threads import WorkerThreads


def test_returns_the_result_from_another_thread() -> None:
    workers = WorkerThreads(2)

    async def main() -> tuple[int, int]:
        return await workers.run(lambda a, b: (a + b, threading.get_ident()), 2, 3)

    total, thread = asyncio.run(main())
    assert total == 5 and thread != threading.get_ident()
    workers.close()


def test_raises_the_callers_exception_with_its_traceback() -> None:
    workers = WorkerThreads(2)

    def fail() -> None:
        raise LookupError("no such session")

    with pytest.raises(LookupError, match="no such session") as raised:
        asyncio.run(workers.run(fail))
    assert raised.traceback[-1].name == "fail"
    workers.close()


def test_never_starts_more_threads_than_its_limit_and_queues_the_rest() -> None:
    workers = WorkerThreads(3)
    running, peak, lock = 0, 0, threading.Lock()
    threads: set[int] = set()

    def job() -> None:
        nonlocal running, peak
        with lock:
            running += 1
            peak = max(peak, running)
            threads.add(threading.get_ident())
        time.sleep(0.02)
        with lock:
            running -= 1

    async def main() -> None:
        await asyncio.gather(*(workers.run(job) for _ in range(30)))

    asyncio.run(main())
    assert peak == 3 and len(threads) == 3
    workers.close()


def test_a_cancelled_caller_leaves_the_call_to_finish_and_the_threads_serving() -> None:
    workers = WorkerThreads(1)
    started, release, finished = threading.Event(), threading.Event(), threading.Event()

    def slow() -> str:
        started.set()
        release.wait(5)
        finished.set()
        return "done"

    async def main() -> str:
        task = asyncio.ensure_future(workers.run(slow))
        await asyncio.get_running_loop().run_in_executor(None, started.wait, 5)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        release.set()
        return await workers.run(lambda: "next")  # the one thread took the next job after the slow one

    assert asyncio.run(main()) == "next"
    assert finished.is_set()
    workers.close()


def test_a_loop_that_closed_meanwhile_does_not_kill_the_thread() -> None:
    workers = WorkerThreads(1)
    release = threading.Event()

    async def abandon() -> None:
        asyncio.ensure_future(workers.run(release.wait, 5))
        await asyncio.sleep(0.05)

    asyncio.run(abandon())  # the loop closes while the job still runs
    release.set()
    assert asyncio.run(workers.run(lambda: 42)) == 42
    workers.close()


def test_close_ends_the_threads_and_refuses_new_calls() -> None:
    workers = WorkerThreads(2)
    asyncio.run(workers.run(lambda: None))
    threads = list(workers._threads)

    workers.close()

    for thread in threads:
        thread.join(5)
        assert not thread.is_alive()
    with pytest.raises(RuntimeError, match="closed"):
        asyncio.run(workers.run(lambda: None))


def test_a_job_never_waits_behind_a_blocked_thread_while_the_limit_allows_another() -> None:
    # A blocking request's thread waits on a row lock that a later job releases: with a thread to
    # spare, that later job must get one, however the two calls interleave.
    workers = WorkerThreads(8)

    async def main() -> None:
        for _ in range(200):
            unlocked = threading.Event()
            waiter = asyncio.ensure_future(workers.run(unlocked.wait, 5))
            await asyncio.sleep(0)
            await asyncio.gather(*(workers.run(lambda: None) for _ in range(3)))
            await workers.run(unlocked.set)
            assert await waiter is True

    asyncio.run(asyncio.wait_for(main(), 30))
    workers.close()


def test_join_from_one_of_its_own_threads_waits_for_the_others_only() -> None:
    workers = WorkerThreads(2)

    def close_and_join() -> float:
        workers.close()
        started = time.monotonic()
        workers.join(5)
        return time.monotonic() - started

    assert asyncio.run(workers.run(close_and_join)) < 1
