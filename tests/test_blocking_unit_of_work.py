"""Blocking requests and the unit of work: saves and reloads on the held connection, and cancellation
at any await point leaving nothing behind on a pooled connection (PostgreSQL, MariaDB, SQLite)."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import httpx
import pytest
import sqlalchemy as sa

from sqla_sessions import DatabaseHandler, Session, SessionConfig
from sqla_sessions.asgi import SessionMiddleware as AsgiMiddleware
from sqla_sessions.store.aio import AsyncSessionStore
from sqla_sessions.store.handlers.engines import create_session_engine
from sqla_sessions.store.locking import BlockingSession
from tests.conftest import Backend, StatementCounter


@pytest.fixture
def one_connection(db_backend: Backend) -> Iterator[DatabaseHandler]:
    """A handler whose pool has exactly one connection, so every request reuses it."""
    engine = create_session_engine(db_backend.url, autocommit=True, pool_size=1, max_overflow=0, pool_timeout=10)
    yield DatabaseHandler(engine, SessionConfig(block_wait_seconds=5, block_lock_seconds=5, lottery=(0, 1)))
    engine.dispose()


def stored(handler: DatabaseHandler, **data: Any) -> str:
    session = handler.load(None)
    session.put(data or {"seed": True})
    session.save()
    return session.id


def test_save_and_reload_inside_a_blocking_request_use_its_lock(db_backend: Backend) -> None:
    handler = DatabaseHandler(db_backend.engine, SessionConfig(block_wait_seconds=5, block_lock_seconds=4))
    session_id = stored(handler)
    held = BlockingSession.open(handler, session_id)
    session = held.session
    session["mid"] = 1
    started = time.monotonic()
    session.save(end_of_request=False)  # must not wait on its own lock
    session.reload()
    assert time.monotonic() - started < 1.5
    assert session["mid"] == 1 and held.locked

    other_entered = threading.Event()

    def another_blocking_request() -> None:
        other = BlockingSession.open(handler, session_id)
        other_entered.set()
        other.session["other"] = True
        other.finish()

    thread = threading.Thread(target=another_blocking_request)
    thread.start()
    time.sleep(0.3)
    assert not other_entered.is_set()  # mutual exclusion still holds after the mid-request save
    session["end"] = 2
    held.finish()
    thread.join(10)
    assert other_entered.is_set()
    assert handler.load(session_id).all() == {"seed": True, "mid": 1, "end": 2, "other": True}


def test_asave_and_areload_inside_an_async_blocking_request_use_its_lock(db_backend: Backend) -> None:
    handler = DatabaseHandler(db_backend.engine, SessionConfig(block_wait_seconds=5, block_lock_seconds=4))
    session_id = stored(handler)

    async def request() -> float:
        store = AsyncSessionStore(handler)
        try:
            held = await store.open_blocking(session_id)
            session = held.session
            session["mid"] = 1
            started = time.monotonic()
            await session.asave(end_of_request=False)
            await session.areload()
            elapsed = time.monotonic() - started
            with pytest.raises(RuntimeError, match="asave"):
                session.save()  # a sync save here would bypass the lock's connection: refused clearly
            session["end"] = 2
            await held.finish()
            return elapsed
        finally:
            await store.aclose()

    assert asyncio.run(request()) < 1.5
    assert handler.load(session_id).all() == {"seed": True, "mid": 1, "end": 2}


def _assert_connection_clean(handler: DatabaseHandler, backend: Backend, session_id: str) -> None:
    """Nothing left open on the pooled connection, and a merge on it is still a locked merge."""
    pool: Any = handler.engine.pool
    deadline = time.monotonic() + 10
    while pool.checkedout() and time.monotonic() < deadline:  # a cancelled call may still be finishing
        time.sleep(0.01)
    assert pool.checkedout() == 0
    with handler.engine.connect() as conn:
        driver = conn.connection.driver_connection
        if backend.name == "postgresql":
            assert driver.info.transaction_status == 0  # IDLE: no transaction left open
        elif backend.name == "sqlite":
            assert not driver.in_transaction
        else:
            assert conn.exec_driver_sql("SELECT @@in_transaction").scalar_one() == 0
    # The row is not locked by anyone: another connection's blocking request gets it at once.
    other = DatabaseHandler(backend.engine, SessionConfig(block_wait_seconds=2, block_lock_seconds=5))
    probe = BlockingSession.open(other, session_id)
    assert probe.locked
    probe.release()
    # And a save that lost its race on the one pooled connection still merges in a transaction of its own.
    first, second = handler.load(session_id), handler.load(session_id)
    first.push("log", "a")
    second.push("log", "b")
    first.save()
    with StatementCounter(handler.engine) as counter:
        second.save()
    assert any(s.upper().startswith("BEGIN") for s in counter.statements), counter.statements
    log = handler.load(session_id)["log"]
    assert log[-2:] == ["a", "b"]


async def _blocking_request(store: AsyncSessionStore, session_id: str) -> None:
    held = await store.open_blocking(session_id)
    try:
        held.session.increment("n")
        await asyncio.sleep(0)
        await held.finish()
    finally:
        await held.release()


def test_aclose_waits_for_a_request_cancelled_during_its_commit(pg_backend: Backend) -> None:
    """The save and its commit run on after the cancel; a shutdown right then still lets them, the
    job they hand over and the connection's return finish (a slow commit: a trigger that sleeps)."""
    handler = DatabaseHandler(pg_backend.engine, SessionConfig(block_wait_seconds=5, block_lock_seconds=10))
    session_id = stored(handler, n=0)
    with pg_backend.engine.begin() as conn:
        conn.exec_driver_sql(
            "CREATE OR REPLACE FUNCTION slow_commit() RETURNS trigger AS "
            "$$ BEGIN PERFORM pg_sleep(0.6); RETURN NEW; END $$ LANGUAGE plpgsql"
        )
        conn.exec_driver_sql(
            "CREATE TRIGGER slow_commit BEFORE UPDATE ON sessions FOR EACH ROW EXECUTE FUNCTION slow_commit()"
        )
    sent: list[str] = []

    async def shutdown_during_a_commit() -> None:
        store = AsyncSessionStore(handler)
        held = await store.open_blocking(session_id)
        held.session["n"] = 1
        held.session.on_saved(lambda: sent.append("job"), "job")
        task = asyncio.create_task(held.finish())
        await asyncio.sleep(0.2)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await store.aclose()

    try:
        asyncio.run(shutdown_during_a_commit())
    finally:
        with pg_backend.engine.begin() as conn:
            conn.exec_driver_sql("DROP TRIGGER slow_commit ON sessions")
    assert sent == ["job"] and handler.load(session_id)["n"] == 1
    assert pg_backend.engine.pool.checkedout() == 0  # type: ignore[attr-defined]


def test_a_request_cancelled_while_it_waits_for_the_lock_leaves_nothing_behind(
    db_backend: Backend, one_connection: DatabaseHandler
) -> None:
    handler = one_connection
    session_id = stored(handler, n=0)

    async def scenario() -> None:
        store = AsyncSessionStore(handler)
        blocker = BlockingSession.open(DatabaseHandler(db_backend.engine, handler.config), session_id)
        try:
            task = asyncio.create_task(_blocking_request(store, session_id))
            await asyncio.sleep(0.3)  # it is waiting for the lock (in the database, or polling a lease)
            assert not task.done()
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
        finally:
            await asyncio.to_thread(blocker.release)
            await asyncio.sleep(0.2)
            await store.aclose()

    asyncio.run(scenario())
    _assert_connection_clean(handler, db_backend, session_id)
    assert handler.load(session_id)["n"] == 0


@pytest.mark.slow
def test_a_request_cancelled_at_any_await_point_leaves_nothing_behind(
    db_backend: Backend, one_connection: DatabaseHandler
) -> None:
    """Cancel after 0, 1, 2, … loop iterations until the request completes before the cancel.

    The first iterations are bare yields (each await point of the event loop's own work); later ones
    last a millisecond each, so a slow machine or driver still sees the request through to its end.
    """
    handler = one_connection
    session_id = stored(handler, n=0)
    completed = 0

    async def run_once(steps: int) -> bool:
        store = AsyncSessionStore(handler)
        try:
            task = asyncio.create_task(_blocking_request(store, session_id))
            for step in range(steps):
                await asyncio.sleep(0 if step < 300 else 0.001)
            finished = task.done()
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass
            return finished
        finally:
            await asyncio.sleep(0.05)
            await store.aclose()

    for steps in range(2300):
        before = handler.load(session_id)["n"]
        finished = asyncio.run(run_once(steps))
        _assert_connection_clean(handler, db_backend, session_id)
        after = handler.load(session_id)["n"]
        assert after in (before, before + 1)  # the increment landed whole or not at all
        completed += after - before
        if finished:
            break
    else:
        pytest.fail("the request never completed within 300 loop iterations and 2 seconds")
    assert completed >= 1


def test_a_pool_reset_rolls_back_what_a_cancelled_request_left(
    db_backend: Backend, one_connection: DatabaseHandler
) -> None:
    """Belt and braces: a connection returned mid-transaction comes back clean from the pool."""
    handler = one_connection
    with handler.engine.connect() as conn:
        conn.exec_driver_sql("BEGIN")
        conn.execute(sa.select(sa.literal(1)))
    with handler.engine.connect() as conn:
        driver = conn.connection.driver_connection
        if db_backend.name == "postgresql":
            assert driver.info.transaction_status == 0
        elif db_backend.name == "sqlite":
            assert not driver.in_transaction


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_a_blocking_request_that_lost_its_lock_writes_its_saves_again(pg_backend: Backend, mode: str) -> None:
    """The database ends a hold past block_lock_seconds and rolls back its saves: they are written again,
    merged three-way onto what others stored meanwhile (increments keep their deltas)."""
    handler = DatabaseHandler(pg_backend.engine, SessionConfig(block_wait_seconds=5, block_lock_seconds=0.5))
    session_id = stored(handler, n=0)

    def meanwhile() -> None:
        time.sleep(1.2)  # the database has killed the holder's connection by now
        other = handler.load(session_id)
        other.increment("n")
        other.push("log", "other")
        other.save()

    async def async_request() -> None:
        store = AsyncSessionStore(handler)
        try:
            held = await store.open_blocking(session_id)
            held.session.increment("n")
            held.session.push("log", "mid")
            await held.session.asave(end_of_request=False)  # inside the transaction that will be lost
            held.session["late"] = True
            await asyncio.to_thread(meanwhile)
            await held.finish()
        finally:
            await store.aclose()

    if mode == "async":
        asyncio.run(async_request())
    else:
        held = BlockingSession.open(handler, session_id)
        held.session.increment("n")
        held.session.push("log", "mid")
        held.session.save(end_of_request=False)
        held.session["late"] = True
        meanwhile()
        held.finish()
    data = handler.load(session_id).all()
    assert data["n"] == 2 and sorted(data["log"]) == ["mid", "other"] and data["late"] is True


class SlowWrites(DatabaseHandler):
    """Each write takes 0.3 s: time to cancel the request inside it."""

    def write_on(self, conn: Any, unit: Any, *, held: bool = False) -> Any:
        time.sleep(0.3)
        return super().write_on(conn, unit, held=held)


def cancel_during_finish(
    handler: DatabaseHandler, session_id: str, before_finish: Callable[[Session], Awaitable[None]], cancel_after: float
) -> list[str]:
    """Run a blocking request that registers a job, cancel it *cancel_after* seconds in (inside its final
    save), and return the jobs that were sent once everything settled."""
    sent: list[str] = []

    async def scenario() -> None:
        store = AsyncSessionStore(handler)

        async def request() -> None:
            held = await store.open_blocking(session_id)
            await before_finish(held.session)
            held.session.on_saved(lambda: sent.append("job"), "job")
            try:
                await held.finish()
            finally:
                await held.release()

        task = asyncio.create_task(request())
        await asyncio.sleep(cancel_after)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        for _ in range(150):
            if sent:
                break
            await asyncio.sleep(0.02)
        await store.aclose()

    asyncio.run(scenario())
    return sent


def test_a_request_cancelled_during_its_final_save_still_sends_its_jobs(db_backend: Backend) -> None:
    """The save runs to its end (and commits) after the cancel: its on_saved callbacks follow the commit."""
    handler = SlowWrites(db_backend.engine, SessionConfig(block_wait_seconds=5, block_lock_seconds=5))
    session_id = stored(handler, n=0)

    async def edit(session: Session) -> None:
        session["n"] = 1

    assert cancel_during_finish(handler, session_id, edit, cancel_after=0.15) == ["job"]
    assert handler.load(session_id)["n"] == 1


def test_a_blocking_request_that_lost_its_lock_after_a_logout_stores_its_new_session(pg_backend: Backend) -> None:
    handler = DatabaseHandler(pg_backend.engine, SessionConfig(block_wait_seconds=5, block_lock_seconds=0.5))
    session_id = stored(handler, secret=1)
    held = BlockingSession.open(handler, session_id)
    held.session.logout()
    held.session.flash("msg", "bye")
    held.session.save(end_of_request=False)  # a new row, inserted inside the transaction that is lost
    held.session["step"] = 2
    time.sleep(1.2)
    held.finish()
    assert handler.load(session_id).is_new
    assert handler.load(held.session.id).all() == {"msg": "bye", "step": 2, "_flash": {"new": [], "old": ["msg"]}}
    assert handler.stats().live == 1  # no orphan row


def test_cancelling_while_an_async_engine_connection_opens_leaks_nothing(pg_backend: Backend) -> None:
    pytest.importorskip("greenlet")
    handler = DatabaseHandler(pg_backend.engine, SessionConfig(block_wait_seconds=5, block_lock_seconds=5))
    session_id = stored(handler)

    async def scenario() -> int:
        store = AsyncSessionStore(handler, async_engine="auto")
        assert store.mode == "async-engine"
        for steps in range(1, 8):
            task = asyncio.create_task(store.open_blocking(session_id))
            for step in range(steps):
                await asyncio.sleep(0 if step < 300 else 0.001)
            task.cancel()
            try:
                held = await task
                await held.release()
            except asyncio.CancelledError:
                pass
        await asyncio.sleep(0.5)
        engine: Any = store._engine  # the pool the store created
        checked_out = int(engine.pool.checkedout())
        await store.aclose()
        return checked_out

    assert asyncio.run(scenario()) == 0


def test_a_cancelled_final_save_after_a_lost_lock_still_writes_and_sends(pg_backend: Backend) -> None:
    handler = SlowWrites(pg_backend.engine, SessionConfig(block_wait_seconds=5, block_lock_seconds=0.5))
    session_id = stored(handler, a=0)

    async def edit(session: Session) -> None:
        session["a"] = 1
        await session.asave(end_of_request=False)
        await asyncio.sleep(1.0)  # the database ends the idle transaction: the lock is lost
        session["b"] = 2

    # 0.3 s mid-request save, 1 s idle (the database ends the transaction), then finish: the
    # rewrite without the lock (0.3 s per save) is under way when the request is cancelled.
    assert cancel_during_finish(handler, session_id, edit, cancel_after=1.45) == ["job"]
    assert handler.load(session_id).all() == {"a": 1, "b": 2}


def test_a_burst_on_a_blocking_route_does_not_starve_other_users(db_backend: Backend) -> None:
    """One browser fires 30 requests at a blocking route: past one waiter and a short queue per session
    they are answered 423 at once, holding no thread and no connection; other users are served."""
    engine = create_session_engine(db_backend.url, autocommit=True, pool_size=6, max_overflow=0, pool_timeout=2)
    handler = DatabaseHandler(engine, SessionConfig(block_wait_seconds=3, block_lock_seconds=5, lottery=(0, 1)))
    burst_id, others = stored(handler, n=0), [stored(handler, n=0) for _ in range(10)]

    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["path"] == "/blocking":
            await asyncio.sleep(0.2)  # a slow checkout step, holding the session's lock
        scope["session"].increment("n")
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    middleware = AsgiMiddleware(app, handler=handler, blocking=["/blocking"])

    async def scenario() -> tuple[list[int], list[int], float]:
        transport = httpx.ASGITransport(app=middleware)
        async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=30) as client:
            burst = [client.post("/blocking", headers={"Cookie": f"session={burst_id}"}) for _ in range(30)]
            burst_tasks = [asyncio.ensure_future(call) for call in burst]
            await asyncio.sleep(0.1)
            started = time.monotonic()
            plain = await asyncio.gather(*(client.post("/", headers={"Cookie": f"session={i}"}) for i in others))
            elapsed = time.monotonic() - started
            blocking = await asyncio.gather(*burst_tasks)
        await middleware.aclose()
        return [r.status_code for r in blocking], [r.status_code for r in plain], elapsed

    try:
        blocking, plain, elapsed = asyncio.run(scenario())
        counted = handler.load(burst_id)["n"]
    finally:
        engine.dispose()
    assert plain == [200] * 10 and elapsed < 2
    assert set(blocking) <= {200, 423} and blocking.count(200) >= 2 and blocking.count(423) >= 10
    assert counted == blocking.count(200)  # the ones answered 200 ran one at a time


def test_a_burst_on_a_blocking_route_does_not_starve_other_users_of_a_wsgi_server(db_backend: Backend) -> None:
    """The same burst at a threaded WSGI server: one request per session holds a connection, a short
    queue waits holding none, the rest are answered 423 at once; other users keep the pool."""
    from concurrent.futures import ThreadPoolExecutor
    from wsgiref.util import setup_testing_defaults

    from sqla_sessions.wsgi import SessionMiddleware as WsgiMiddleware

    engine = create_session_engine(db_backend.url, autocommit=True, pool_size=6, max_overflow=0, pool_timeout=2)
    handler = DatabaseHandler(engine, SessionConfig(block_wait_seconds=3, block_lock_seconds=5, lottery=(0, 1)))
    burst_id, others = stored(handler, n=0), [stored(handler, n=0) for _ in range(10)]

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        if environ["PATH_INFO"] == "/blocking":
            time.sleep(0.2)  # a slow checkout step, holding the session's lock
        environ["sqla_sessions.session"].increment("n")
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"ok"]

    middleware = WsgiMiddleware(app, handler=handler, blocking=["/blocking"])

    def request(path: str, session_id: str) -> int:
        environ: dict[str, Any] = {"PATH_INFO": path, "REQUEST_METHOD": "POST", "HTTP_COOKIE": f"session={session_id}"}
        setup_testing_defaults(environ)
        status: list[str] = []
        body = middleware(environ, lambda s, h, e=None: status.append(s))
        b"".join(body)
        getattr(body, "close", lambda: None)()
        return int(status[0].split()[0])

    try:
        with ThreadPoolExecutor(40) as pool:  # the server's threads
            burst = [pool.submit(request, "/blocking", burst_id) for _ in range(30)]
            time.sleep(0.1)
            started = time.monotonic()
            plain = list(pool.map(lambda i: request("/", i), others))
            elapsed = time.monotonic() - started
            blocking = [future.result() for future in burst]
        counted = handler.load(burst_id)["n"]
    finally:
        engine.dispose()
    assert plain == [200] * 10 and elapsed < 2
    assert set(blocking) <= {200, 423} and blocking.count(200) >= 2 and blocking.count(423) >= 10
    assert counted == blocking.count(200)


def test_a_holder_past_block_lock_seconds_keeps_no_one_waiting_in_its_process(pg_backend: Backend) -> None:
    """The database ends an idle hold after block_lock_seconds; the per-process gate in front of it
    lets the next request of the session through then too (ASGI store and sync BlockingSession)."""
    handler = DatabaseHandler(pg_backend.engine, SessionConfig(block_wait_seconds=3, block_lock_seconds=0.5))
    session_id = stored(handler, n=0)

    async def two_requests() -> float:
        store = AsyncSessionStore(handler)
        first = await store.open_blocking(session_id)
        await asyncio.sleep(0.8)  # idle past the bound: the database has ended its transaction
        started = time.monotonic()
        second = await store.open_blocking(session_id)
        waited = time.monotonic() - started
        second.session.increment("n")
        await second.finish()
        await first.release()
        await store.aclose()
        return waited

    assert asyncio.run(two_requests()) < 1.0
    held = BlockingSession.open(handler, session_id)
    time.sleep(0.8)
    started = time.monotonic()
    other = BlockingSession.open(handler, session_id)
    assert time.monotonic() - started < 1.0
    other.release()
    held.release()
    assert handler.load(session_id)["n"] == 1
