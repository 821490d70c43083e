"""Loads and saves of several concurrent requests run together (`load_many_on`, `write_many_on`):
each gets what it would have got alone, on every backend; on PostgreSQL the plain saves are one
statement that never waits for a locked row."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from sqla_sessions import DatabaseHandler, SaveAction, SessionConfig
from sqla_sessions.core.session import Session
from sqla_sessions.core.unit import UnitOfWork
from sqla_sessions.errors import SessionInterrupted
from sqla_sessions.store.aio import AsyncSessionStore
from sqla_sessions.store.handlers.base import BaseHandler
from tests.conftest import Backend, FakeClock, backend_for
from tests.handlers.test_wire import _wire


def _stored(handler: BaseHandler[Any], **data: Any) -> str:
    session = handler.load(None)
    session.put(data)
    session.save()
    return session.id


def _unit(handler: BaseHandler[Any], session: Session) -> UnitOfWork:
    unit = handler.plan_save(session, end_of_request=True)
    assert unit is not None
    return unit


def _write_many(handler: BaseHandler[Any], sessions: list[Session]) -> list[Any]:
    """What the stores do: the batch, then alone (`write_on`) each unit it left unwritten."""
    units = [_unit(handler, session) for session in sessions]
    with handler.connect() as conn:
        outcomes: list[Any] = handler.write_many_on(conn, units)
    for index, unit in enumerate(units):
        if outcomes[index] is None:
            try:
                with handler.connect() as conn:
                    outcomes[index] = handler.write_on(conn, unit)
            except Exception as exc:
                outcomes[index] = exc
    for session, unit, outcome in zip(sessions, units, outcomes, strict=True):
        if not isinstance(outcome, Exception):
            session.adopt(outcome, unit)
    return outcomes


def test_loads_of_several_requests_each_open_what_they_would_alone(handler: BaseHandler[Any], clock: FakeClock) -> None:
    first = _stored(handler, n=1)
    second = _stored(handler, n=2)
    short = Session(handler)
    short["n"] = 3
    short.set_lifetime(1)
    short.save()
    clock.advance(120)  # the short one expired
    wrong_secret = first.split(".")[0] + "." + second.split(".")[1]
    unknown = "0" * 32 + "." + second.split(".")[1]
    ids = [first, second, first, wrong_secret, unknown, short.id]

    with handler.connect() as conn:
        outcomes = handler.load_many_on(conn, ids)

    assert [type(o) for o in outcomes] == [Session] * len(ids)
    got = [dict(o.all()) for o in outcomes if isinstance(o, Session)]
    assert got == [{"n": 1}, {"n": 2}, {"n": 1}, {}, {}, {}]
    sessions = [o for o in outcomes if isinstance(o, Session)]
    assert sessions[0] is not sessions[2] and sessions[0].all() is not sessions[2].all()  # own copies
    assert [s.is_new for s in sessions] == [False, False, False, True, True, True]


def test_saves_of_several_requests_each_store_what_they_would_alone(handler: BaseHandler[Any]) -> None:
    a, b, c = (_stored(handler, count=0, seen=[]) for _ in range(3))
    loaded = [handler.load(session_id) for session_id in (a, a, b, c)]
    racing = handler.load(c)
    racing.increment("count", 10)
    racing.save()  # c moved on since the batch's requests loaded it
    for n, session in enumerate(loaded):
        session.increment("count")
        session.push("seen", n)
    fresh = handler.load(None)
    fresh["new"] = True
    regenerated = handler.load(b)
    regenerated.regenerate()
    regenerated["moved"] = True
    everyone = [*loaded, fresh]

    outcomes = _write_many(handler, everyone)
    assert not [o for o in outcomes if isinstance(o, Exception)]
    # The second save of a (same row, same loaded version) and c's (lost its race) merged.
    assert [o.action for o in outcomes] == [
        SaveAction.UPDATED,
        SaveAction.MERGED,
        SaveAction.UPDATED,
        SaveAction.MERGED,
        SaveAction.INSERTED,
    ]
    assert handler.load(a).all() == {"count": 2, "seen": [0, 1]}
    assert handler.load(c).all() == {"count": 11, "seen": [3]}
    assert handler.load(fresh.id).all() == {"new": True}
    assert _write_many(handler, [regenerated])[0].action is SaveAction.MERGED  # alone: a move to a new key
    assert handler.load(regenerated.id).all() == {"count": 1, "seen": [2], "moved": True}
    assert handler.load(b).is_new  # its old id ended with the move
    assert loaded[1].all() == {"count": 2, "seen": [0, 1]}  # the merged one adopted what it stored


def test_an_error_in_one_save_reaches_that_request_alone(handler: BaseHandler[Any]) -> None:
    kept, gone = _stored(handler, count=0), _stored(handler, count=0)
    sessions = [handler.load(kept), handler.load(gone)]
    for session in sessions:
        session.increment("count")
    handler.destroy(sessions[1].key)

    outcomes = _write_many(handler, sessions)

    assert outcomes[0].action is SaveAction.UPDATED
    assert isinstance(outcomes[1], SessionInterrupted)
    assert handler.load(kept)["count"] == 1


@pytest.fixture
def pg(tmp_root: Path) -> Backend:
    return backend_for("postgresql", tmp_root)


def test_plain_saves_of_many_sessions_are_one_statement_on_postgresql(pg: Backend, clock: FakeClock) -> None:
    handler = DatabaseHandler(pg.url, SessionConfig(pool_size=1), clock=clock)
    try:
        ids = [_stored(handler, count=0) for _ in range(10)]
        for _ in range(2):  # the second round runs on statements prepared in the first
            sessions = [handler.load(session_id) for session_id in ids]
            for session in sessions:
                session.increment("count")
            messages = _wire(handler.engine, lambda sessions=sessions: _write_many(handler, sessions))
        assert messages == ["Bind", "Describe", "Execute", "Sync"]  # one round trip, one commit

        def load_all() -> None:
            with handler.connect() as conn:
                handler.load_many_on(conn, ids)

        load_all()
        assert _wire(handler.engine, load_all) == ["Bind", "Describe", "Execute", "Sync"]
        assert [handler.load(session_id)["count"] for session_id in ids] == [2] * 10
    finally:
        handler.close()


def test_a_batch_never_waits_for_a_row_another_transaction_holds(pg: Backend, clock: FakeClock) -> None:
    handler = DatabaseHandler(pg.url, SessionConfig(), clock=clock)
    try:
        held_id, free_id = _stored(handler, count=0), _stored(handler, count=0)
        sessions = [handler.load(held_id), handler.load(free_id)]
        for session in sessions:
            session.increment("count")
        locked = threading.Event()
        release = threading.Event()

        def hold() -> None:
            locker = sa.create_engine(pg.url, poolclass=sa.pool.NullPool)  # not autocommit: the lock lasts
            with locker.connect() as conn, conn.begin():
                conn.execute(
                    sa.select(handler.table.c.key).where(handler.table.c.key == sessions[0].key).with_for_update()
                )
                locked.set()
                release.wait(10)

        holder = threading.Thread(target=hold)
        holder.start()
        assert locked.wait(10)
        try:
            loaded = [_unit(handler, s).loaded for s in sessions]
            writes = [(dataclasses.replace(r, version=r.version + 1), r.version) for r in loaded if r is not None]
            started = time.monotonic()
            with handler.connect() as conn:
                written = handler._update_many(conn, writes, handler.now())  # the primitive under test
            assert time.monotonic() - started < 2
            assert written == {sessions[1].key}
        finally:
            release.set()
            holder.join()
    finally:
        handler.close()


def test_concurrent_requests_through_the_async_store_lose_nothing(db_backend: Backend) -> None:
    """Many sessions, many requests each, all at once through the batched loads and saves."""
    handler = DatabaseHandler(db_backend.engine, SessionConfig())
    ids = [_stored(handler, count=0, seen=[]) for _ in range(16)]
    store = AsyncSessionStore(handler)

    async def request(session_id: str, n: int) -> None:
        session = await store.load(session_id)
        session.increment("count")
        session.push("seen", n)
        await store.save(session, end_of_request=True)

    async def main() -> None:
        await asyncio.gather(*(request(session_id, n) for n in range(8) for session_id in ids))
        await store.aclose()

    asyncio.run(main())
    for session_id in ids:
        data = handler.load(session_id).all()
        assert data["count"] == 8 and sorted(data["seen"]) == list(range(8))


def test_a_save_the_database_refuses_fails_alone_and_the_others_land_once(pg: Backend) -> None:
    """One value PostgreSQL rejects (a NUL in a user agent) refuses the shared statement as a whole:
    the other saves of the batch land exactly once, not twice (written, then merged onto themselves)."""
    handler = DatabaseHandler(pg.url, SessionConfig())
    try:
        good, bad = _stored(handler, count=0, items=[]), _stored(handler, count=0, items=[])
        sessions = [handler.load(good), handler.load(bad)]
        for session in sessions:
            session.increment("count")
            session.push("items", "book")
        sessions[1].user_agent = "evil\x00agent"

        outcomes = _write_many(handler, sessions)

        assert outcomes[0].action is SaveAction.UPDATED
        assert isinstance(outcomes[1], sa.exc.DBAPIError)
        assert handler.load(good).all() == {"count": 1, "items": ["book"]}
        assert handler.load(bad).all() == {"count": 0, "items": []}
    finally:
        handler.close()


def test_a_locked_session_does_not_hold_up_the_saves_batched_with_it(pg: Backend) -> None:
    """A blocking request holds one session's row: the saves of that session wait for it, alone; the
    saves of other sessions queued beside them finish at once."""
    handler = DatabaseHandler(pg.url, SessionConfig())
    store = AsyncSessionStore(handler)
    locker = sa.create_engine(pg.url, poolclass=sa.pool.NullPool)  # not autocommit: the lock lasts
    try:
        locked_id = _stored(handler, count=0)
        others = [_stored(handler, count=0) for _ in range(8)]
        holder = locker.connect()
        lock = holder.begin()
        table = handler.table
        holder.execute(sa.select(table.c.key).where(table.c.key == locked_id.split(".")[0]).with_for_update())

        async def save(session_id: str) -> float:
            session = await store.load(session_id)
            session.increment("count")
            started = time.monotonic()
            await store.save(session, end_of_request=True)
            return time.monotonic() - started

        async def main() -> tuple[list[float], list[float]]:
            waiting = [asyncio.ensure_future(save(locked_id)) for _ in range(6)]  # more than batches in flight
            await asyncio.sleep(0.3)
            quick = await asyncio.wait_for(asyncio.gather(*(save(session_id) for session_id in others)), 10)
            lock.rollback()  # the blocking request ends: the saves that waited for it go on
            waited = await asyncio.wait_for(asyncio.gather(*waiting), 10)
            await store.aclose()
            return quick, waited

        quick, waited = asyncio.run(main())
        holder.close()
        assert max(quick) < 1.0, quick
        assert min(waited) >= 0.3, waited
        assert [handler.load(session_id)["count"] for session_id in others] == [1] * len(others)
        assert handler.load(locked_id)["count"] == 6
    finally:
        locker.dispose()
        handler.close()


def test_first_writes_changes_and_touches_of_one_batch(handler: BaseHandler[Any], clock: FakeClock) -> None:
    touched_ids = [_stored(handler, n=n) for n in range(3)]
    changed_id = _stored(handler, count=0)
    clock.advance(handler.config.touch_interval + 1)  # activity is due again: a read-only request touches
    readers = [handler.load(session_id) for session_id in touched_ids]
    for reader in readers:
        reader.get("n")
    written_meanwhile = handler.load(touched_ids[2])
    changer = handler.load(changed_id)
    changer.increment("count")
    newcomers = []
    for n in range(3):
        newcomer = handler.load(None)
        newcomer["hello"] = n
        newcomers.append(newcomer)
    written_meanwhile["n"] = 99
    written_meanwhile.save()  # the third touch now lost its race: that newer write stands

    outcomes = _write_many(handler, [*readers, changer, *newcomers])

    actions = [o.action for o in outcomes]
    assert actions == [SaveAction.TOUCHED] * 2 + [SaveAction.NOTHING, SaveAction.UPDATED] + [SaveAction.INSERTED] * 3
    now = handler.now()
    for session_id in touched_ids[:2]:
        assert handler.load(session_id).last_activity == now
    assert handler.load(touched_ids[2])["n"] == 99
    assert handler.load(changed_id)["count"] == 1
    assert [handler.load(newcomer.id)["hello"] for newcomer in newcomers] == [0, 1, 2]


def test_each_kind_of_save_in_a_batch_is_one_statement_on_postgresql(pg: Backend, clock: FakeClock) -> None:
    handler = DatabaseHandler(pg.url, SessionConfig(pool_size=1), clock=clock)
    try:
        for _ in range(2):  # the second round runs on statements prepared in the first
            stored = [_stored(handler, n=n) for n in range(8)]
            clock.advance(handler.config.touch_interval + 1)
            sessions = [handler.load(session_id) for session_id in stored]
            for session in sessions[:4]:
                session.get("n")  # a touch
            for session in sessions[4:]:
                session["n"] = -1  # a change
            for n in range(4):
                newcomer = handler.load(None)
                newcomer["new"] = n
                sessions.append(newcomer)
            messages = _wire(handler.engine, lambda sessions=sessions: _write_many(handler, sessions))
        assert messages == ["Bind", "Describe", "Execute", "Sync"] * 3  # 16 saves: 3 round trips, 3 commits
    finally:
        handler.close()


def test_a_cancelled_save_that_lost_its_race_is_still_merged(db_backend: Backend) -> None:
    """The client went away while its save was queued: the batch could not write it (another request
    saved first), and the merge it then needs still runs, as a save handed to a thread always did."""
    handler = DatabaseHandler(db_backend.engine, SessionConfig())
    store = AsyncSessionStore(handler)

    async def main() -> str:
        first = await store.load(None)
        first["base"] = 0
        await store.save(first)
        winner, loser = await store.load(first.id), await store.load(first.id)
        winner["x"] = 1
        await store.save(winner)
        loser["y"] = 2  # loaded before the winner's write: its compare-and-set loses
        saving = asyncio.ensure_future(store.save(loser, end_of_request=True))
        await asyncio.sleep(0)  # queued
        saving.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await saving
        await store.aclose()  # waits for what cancelled requests still finish
        return first.id

    session_id = asyncio.run(main())
    assert handler.load(session_id).all() == {"base": 0, "x": 1, "y": 2}


@pytest.mark.parametrize("batching", [True, False])
def test_batch_requests_off_runs_every_request_alone(
    pg: Backend, batching: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`batch_requests=False` (a distributed PostgreSQL, where one statement across keys crosses shards)."""
    handler = DatabaseHandler(pg.url, SessionConfig(batch_requests=batching))
    calls: list[int] = []
    for name in ("load_many_on", "write_many_on"):
        original = getattr(handler, name)
        monkeypatch.setattr(
            handler, name, lambda conn, items, original=original: calls.append(len(items)) or original(conn, items)
        )
    ids = [_stored(handler, count=0) for _ in range(10)]
    store = AsyncSessionStore(handler)

    async def request(session_id: str) -> None:
        session = await store.load(session_id)
        session.increment("count")
        await store.save(session, end_of_request=True)

    async def main() -> None:
        await asyncio.gather(*(request(session_id) for session_id in ids * 3))
        await store.aclose()

    asyncio.run(main())
    sync = [handler.load(session_id) for session_id in ids]
    assert [session["count"] for session in sync] == [3] * len(ids)
    assert (max(calls) > 1) if batching else not calls
    handler.close()
