"""The promise, with real threads and processes against real databases: no save loses another's keys."""

from __future__ import annotations

import multiprocessing
import random
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from sqla_sessions import DatabaseHandler, SaveAction, SessionConfig
from tests.conftest import Backend, FakeClock


def _stored(handler: DatabaseHandler, **data: Any) -> str:
    session = handler.load(None)
    session.put(data)
    session.save()
    return session.id


#: Dozens of threads write one session at once here, to test the merge: more than one session's fair
#: share of the pool (`session_connections`, refused with LockTimeout; see tests/web/test_fair_share.py).
CROWDED = SessionConfig(session_connections=64)


def test_fifty_concurrent_saves_each_adding_a_key_all_survive(db_backend: Backend) -> None:
    handler = DatabaseHandler(db_backend.engine, CROWDED)
    session_id = _stored(handler, base=True)
    barrier = threading.Barrier(50)

    def one_request(n: int) -> SaveAction:
        session = handler.load(session_id)  # every thread loads the same version ...
        session[f"k{n}"] = n
        barrier.wait()  # ... and all save at once
        return session.save()

    with ThreadPoolExecutor(50) as pool:
        actions = list(pool.map(one_request, range(50)))

    data = handler.load(session_id).all()
    assert data == {"base": True, **{f"k{n}": n for n in range(50)}}
    assert actions.count(SaveAction.UPDATED) >= 1
    assert set(actions) <= {SaveAction.UPDATED, SaveAction.MERGED}


def test_concurrent_sets_and_removes_of_overlapping_keys(db_backend: Backend) -> None:
    """Random overlapping writers: the result is the serial application of their change sets."""
    handler = DatabaseHandler(db_backend.engine, CROWDED)
    keys = [f"k{i}" for i in range(8)]
    session_id = _stored(handler, **{k: "initial" for k in keys})
    rng = random.Random(1234)
    plans = []
    for n in range(30):
        chosen = rng.sample(keys, 3)
        plans.append((n, chosen[:2], chosen[2:]))  # (writer, keys to set, keys to remove)
    committed: list[tuple[int, list[str], list[str]]] = []
    lock = threading.Lock()
    barrier = threading.Barrier(len(plans))

    def writer(plan: tuple[int, list[str], list[str]]) -> None:
        n, to_set, to_remove = plan
        session = handler.load(session_id)
        for k in to_set:
            session[k] = f"w{n}"
        session.forget(*to_remove)
        barrier.wait()
        with lock:  # the lock orders the commits, so we know the serial order to replay
            session.save()
            committed.append(plan)

    with ThreadPoolExecutor(len(plans)) as pool:
        list(pool.map(writer, plans))

    expected: dict[str, Any] = {k: "initial" for k in keys}
    for n, to_set, to_remove in committed:
        for k in to_set:
            expected[k] = f"w{n}"
        for k in to_remove:
            expected.pop(k, None)
    assert handler.load(session_id).all() == expected


def test_concurrent_nested_mutations_of_different_keys(db_backend: Backend) -> None:
    handler = DatabaseHandler(db_backend.engine, CROWDED)
    session_id = _stored(handler, **{f"list{i}": [] for i in range(10)})
    barrier = threading.Barrier(10)

    def mutate(i: int) -> None:
        session = handler.load(session_id)
        session[f"list{i}"].append(i)  # nested mutation, no __setitem__
        barrier.wait()
        session.save()

    with ThreadPoolExecutor(10) as pool:
        list(pool.map(mutate, range(10)))
    assert handler.load(session_id).all() == {f"list{i}": [i] for i in range(10)}


def test_logout_racing_with_saves_never_resurrects(db_backend: Backend) -> None:
    handler = DatabaseHandler(db_backend.engine, CROWDED)
    session_id = _stored(handler, a=1)
    sessions = [handler.load(session_id) for _ in range(10)]
    for n, s in enumerate(sessions):
        s[f"k{n}"] = n
    killer = handler.load(session_id)
    killer.logout()
    killer.save()
    outcomes = []
    for s in sessions:
        try:
            outcomes.append(s.save())
        except Exception as exc:
            outcomes.append(type(exc).__name__)
    assert outcomes == ["SessionInterrupted"] * 10
    assert handler.load(session_id).is_new


def _process_writer(url: str, session_id: str, n: int, start: Any) -> None:
    handler = DatabaseHandler(url, CROWDED)
    session = handler.load(session_id)
    session[f"p{n}"] = n
    start.wait()
    session.save()
    handler.close()


@pytest.mark.parametrize("processes", [8])
def test_concurrent_saves_from_separate_processes(db_backend: Backend, processes: int) -> None:
    handler = DatabaseHandler(db_backend.engine, CROWDED)
    session_id = _stored(handler, base=0)
    ctx = multiprocessing.get_context("spawn")
    start = ctx.Event()
    workers = [
        ctx.Process(target=_process_writer, args=(db_backend.url, session_id, n, start)) for n in range(processes)
    ]
    for w in workers:
        w.start()
    start.set()
    for w in workers:
        w.join(60)
        assert w.exitcode == 0
    assert handler.load(session_id).all() == {"base": 0, **{f"p{n}": n for n in range(processes)}}


def test_clock_fixture_is_independent(clock: FakeClock) -> None:
    before = clock()
    clock.advance(5)
    assert clock() == before + 5


def test_concurrent_sweeps_split_the_expired_rows_and_spare_the_live_ones(db_backend: Backend) -> None:
    """Two GC sweeps at once (SKIP LOCKED on PostgreSQL; DELETE … LIMIT elsewhere) delete each
    expired row once, while requests keep the live sessions alive."""
    clock = FakeClock()
    handler = DatabaseHandler(db_backend.engine, SessionConfig(lottery=(0, 1), lifetime=10), clock=clock)
    for n in range(600):
        session = handler.load(None)
        session["n"] = n
        session.save()
    clock.advance(11 * 60)
    live = []
    for n in range(50):
        session = handler.load(None)
        session["live"] = n
        session.save()
        live.append(session.id)
    with ThreadPoolExecutor(2) as sweepers:
        counts = list(sweepers.map(lambda _: handler.gc(batch_size=25), range(2)))
    assert sum(counts) == 600
    assert all(handler.load(session_id)["live"] >= 0 for session_id in live)
    assert handler.stats().live == 50 and handler.stats().expired == 0
