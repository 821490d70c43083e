"""Fair share of the pool (sqla_sessions.store.fairshare), bounded row-lock waits, and bodies read before a
lock (sqla_sessions.http.bodies). The attacks through real servers are in tests/web/test_fair_share.py."""

from __future__ import annotations

import asyncio
import io
import threading
import time
from typing import Any

import pytest

from sqla_sessions import DatabaseHandler, LockTimeout, SessionConfig, TooManyRequests
from sqla_sessions.http.bodies import BodyRefused, ClientGone, read_asgi_body, read_wsgi_body
from sqla_sessions.store.fairshare import MAX_WAITING_PER_SESSION, FairShare, SessionSlots
from sqla_sessions.store.locking import BlockingSession
from tests.conftest import Backend


def share(**settings: Any) -> FairShare:
    return FairShare(SessionConfig(**settings))


def test_the_default_shares_follow_the_pool() -> None:
    assert (share().per_session, share().per_address) == (10, 20)
    assert (share(pool_size=4).per_session, share(pool_size=4).per_address) == (1, 2)
    assert share(session_connections=3, address_connections=5).per_address == 5


def test_a_session_past_its_share_waits_its_turn_or_is_refused_at_once_without_a_wait() -> None:
    fair = share(session_connections=2)
    first, second = fair.hold_save("k", None, wait=0), fair.hold_save("k", None, wait=0)
    started = time.monotonic()
    with pytest.raises(LockTimeout):
        fair.hold_save("k", None, wait=0)
    assert time.monotonic() - started < 0.1
    fair.hold_save("other", None, wait=0)  # another session is not held up
    first()
    first()  # twice is once
    assert fair.held(session_key="k") == 1
    threading.Timer(0.2, second).start()
    started = time.monotonic()
    fair.hold_save("k", None, wait=5)  # the first slot is free: at once
    fair.hold_save("k", None, wait=5)()  # the second: when `second` ends
    assert 0.15 < time.monotonic() - started < 2
    fair.hold_save("k", None, wait=0)  # the share is taken again
    with pytest.raises(LockTimeout) as refused:
        fair.hold_save("k", None, wait=0.2)
    assert refused.value.waited == 0.2


def test_an_address_past_its_share_of_blocking_requests_gets_too_many_requests() -> None:
    fair = share(address_connections=2)
    ends = [fair.hold_blocking(f"s{n}", "10.0.0.1", wait=0) for n in range(2)]
    with pytest.raises(TooManyRequests) as refused:
        fair.hold_blocking("s9", "10.0.0.1", wait=5)
    assert refused.value.status == 429
    assert fair.held(session_key="s9") == 0  # nothing counted for a refusal
    fair.hold_blocking("s9", "10.0.0.2", wait=0)  # another client is served
    ends[0]()
    fair.hold_blocking("s8", "10.0.0.1", wait=0)


def test_a_save_waits_while_a_blocking_request_holds_its_session_here() -> None:
    fair = share()
    end = fair.locked_here("k")
    threading.Timer(0.2, end).start()
    started = time.monotonic()
    fair.hold_save("k", "10.0.0.1", wait=5)()
    assert 0.15 < time.monotonic() - started < 2
    fair.hold_save("other", "10.0.0.1", wait=0)()  # other sessions do not wait
    fair.locked_here("k")
    with pytest.raises(LockTimeout):
        fair.hold_save("k", None, wait=0.1)


def test_a_blocking_request_past_block_lock_seconds_no_longer_holds_up_saves() -> None:
    fair = share(block_lock_seconds=0.2)
    fair.locked_here("k")  # never released (a stuck request)
    started = time.monotonic()
    fair.hold_save("k", None, wait=5)()
    assert 0.15 < time.monotonic() - started < 2


def test_a_blocking_request_waits_for_the_sessions_saves_instead_of_a_refusal() -> None:
    fair = share(session_connections=1)
    end = fair.hold_save("k", None, wait=0)
    threading.Timer(0.2, end).start()
    fair.hold_blocking("k", "10.0.0.1", wait=5)()


def test_one_address_may_park_only_its_share_of_threads_waiting() -> None:
    fair = share(session_connections=1, address_connections=2)
    fair.hold_save("k", "10.0.0.1", wait=0)
    parked = [
        threading.Thread(target=lambda: pytest.raises(LockTimeout, fair.hold_save, "k", "10.0.0.1", wait=1))
        for _ in range(2)
    ]
    for thread in parked:
        thread.start()
    time.sleep(0.2)
    with pytest.raises(TooManyRequests):
        fair.hold_save("k", "10.0.0.1", wait=5)
    with pytest.raises(LockTimeout):  # another address may wait (and runs out of time here)
        fair.hold_save("k", "10.0.0.2", wait=0.1)
    for thread in parked:
        thread.join()


def test_async_slots_queue_a_burst_on_the_loop_and_hand_slots_on_in_order() -> None:
    slots = SessionSlots(share(session_connections=2))

    async def scenario() -> list[int]:
        order: list[int] = []

        async def save(n: int) -> None:
            leave = await slots.enter("k", 5)
            order.append(n)
            await asyncio.sleep(0.01)
            leave()

        await asyncio.gather(*(save(n) for n in range(10)))
        return order

    assert sorted(asyncio.run(scenario())) == list(range(10))


def test_async_slots_time_out_and_a_cancelled_waiter_leaves_nothing_behind() -> None:
    slots = SessionSlots(share(session_connections=1))

    async def scenario() -> None:
        leave = await slots.enter("k", 5)
        with pytest.raises(LockTimeout):
            await slots.enter("k", 0.05)
        waiter = asyncio.ensure_future(slots.enter("k", 5))
        await asyncio.sleep(0.01)
        waiter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiter
        leave()
        again = await asyncio.wait_for(slots.enter("k", 5), 1)  # the slot came back
        again()
        assert slots._slots == {}

    asyncio.run(scenario())


def test_async_slots_refuse_at_once_past_the_waiters_bound() -> None:
    slots = SessionSlots(share(session_connections=1))

    async def scenario() -> None:
        await slots.enter("k", 5)
        waiting = [asyncio.ensure_future(slots.enter("k", 5)) for _ in range(MAX_WAITING_PER_SESSION)]
        await asyncio.sleep(0.01)
        with pytest.raises(LockTimeout):
            await slots.enter("k", 5)
        for waiter in waiting:
            waiter.cancel()
        await asyncio.gather(*waiting, return_exceptions=True)

    asyncio.run(scenario())


# -- bodies -----------------------------------------------------------------------------------------


def test_a_wsgi_body_is_read_whole_and_handed_on_from_memory() -> None:
    environ: dict[str, Any] = {"CONTENT_LENGTH": "5", "wsgi.input": io.BytesIO(b"a=1&bmore")}
    read_wsgi_body(environ, 10)
    assert environ["wsgi.input"].read() == b"a=1&b"


@pytest.mark.parametrize(
    ("environ", "status"),
    [
        ({"CONTENT_LENGTH": "11", "wsgi.input": io.BytesIO(b"x" * 11)}, 413),
        ({"CONTENT_LENGTH": "8", "wsgi.input": io.BytesIO(b"csrf=")}, 400),  # the client stopped sending
        ({"wsgi.input_terminated": True, "wsgi.input": io.BytesIO(b"x" * 11)}, 413),  # chunked, too long
    ],
)
def test_a_wsgi_body_over_the_limit_or_cut_short_is_refused(environ: dict[str, Any], status: int) -> None:
    with pytest.raises(BodyRefused) as refused:
        read_wsgi_body(environ, 10)
    assert refused.value.status == status


def test_a_chunked_wsgi_body_within_the_limit_gets_its_length() -> None:
    environ: dict[str, Any] = {"wsgi.input_terminated": True, "wsgi.input": io.BytesIO(b"abc")}
    read_wsgi_body(environ, 10)
    assert (environ["CONTENT_LENGTH"], environ["wsgi.input"].read()) == ("3", b"abc")


def test_a_wsgi_request_without_a_length_has_no_body_to_wait_for() -> None:
    stream = io.BytesIO(b"never read")
    environ: dict[str, Any] = {"wsgi.input": stream}
    read_wsgi_body(environ, 10)
    assert environ["wsgi.input"] is stream and stream.tell() == 0


def asgi_receive(messages: list[dict[str, Any]]) -> Any:
    queue = list(messages)

    async def receive() -> dict[str, Any]:
        return queue.pop(0) if queue else {"type": "http.disconnect"}

    return receive


def test_an_asgi_body_is_read_whole_then_replayed_then_the_server_answers() -> None:
    parts = [
        {"type": "http.request", "body": b"a=", "more_body": True},
        {"type": "http.request", "body": b"1", "more_body": False},
    ]

    async def scenario() -> list[dict[str, Any]]:
        replay = await read_asgi_body({"headers": []}, asgi_receive(parts), 10)
        return [await replay() for _ in range(3)]

    assert asyncio.run(scenario()) == [*parts, {"type": "http.disconnect"}]


def test_an_asgi_body_too_large_or_abandoned_is_refused() -> None:
    async def read(scope: dict[str, Any], messages: list[dict[str, Any]]) -> Any:
        return await read_asgi_body(scope, asgi_receive(messages), 10)

    with pytest.raises(BodyRefused):  # by its declared length, before reading anything
        asyncio.run(read({"headers": [(b"content-length", b"11")]}, []))
    with pytest.raises(BodyRefused):  # by what arrived
        asyncio.run(read({"headers": []}, [{"type": "http.request", "body": b"x" * 11, "more_body": True}]))
    with pytest.raises(ClientGone):
        asyncio.run(read({"headers": []}, [{"type": "http.request", "body": b"x", "more_body": True}]))


# -- bounded row-lock waits ---------------------------------------------------------------------------


@pytest.mark.parametrize("db_backend", ["postgresql", "mariadb"], indirect=True)
def test_a_save_meeting_a_held_row_waits_at_most_write_wait_seconds_then_lock_timeout(db_backend: Backend) -> None:
    config = SessionConfig(database_url=db_backend.url, pool_timeout=1, block_lock_seconds=30)
    handler = DatabaseHandler(db_backend.url, config)  # its own engine: MariaDB's wait is set at connect
    try:
        session = handler.load(None)
        session["n"] = 1
        handler.save(session)
        stale = handler.load(session.id)
        held = BlockingSession.open(handler, session.id)
        try:
            stale["other"] = True
            started = time.monotonic()
            with pytest.raises(LockTimeout):
                handler.save(stale)
            waited = time.monotonic() - started
            assert 0.5 < waited < 3, waited
        finally:
            held.finish()
        assert "other" not in handler.load(session.id)  # refused: nothing of it was written
        stale_again = handler.load(session.id)
        stale_again["other"] = True
        handler.save(stale_again)  # the lock is free: it saves
        assert handler.load(session.id)["other"] is True
    finally:
        handler.close()


@pytest.mark.parametrize("db_backend", ["postgresql", "mariadb"], indirect=True)
def test_a_hold_past_block_lock_seconds_gives_its_connection_back_before_the_app_ends(db_backend: Backend) -> None:
    """ASGI: the app of a blocking request runs on past `block_lock_seconds`; its connection goes back
    to the pool then (the database ends the lock's transaction), not when the app ends, and every save
    of the request still lands, the one made inside the lost transaction included."""
    from sqla_sessions.store.aio import EXPIRY_GRACE, AsyncSessionStore

    config = SessionConfig(database_url=db_backend.url, block_lock_seconds=1, pool_size=4)
    handler = DatabaseHandler(db_backend.url, config)
    store = AsyncSessionStore(handler)

    async def scenario() -> None:
        session = await store.load(None)
        session["n"] = 0
        await store.save(session)
        held = await store.open_blocking(session.id, address="10.0.0.1")
        assert held.locked and handler.engine.pool.checkedout() == 1
        held.session.increment("n")
        await held.save(held.session)  # inside the lock's transaction
        await asyncio.sleep(1 + EXPIRY_GRACE + 0.8)
        assert handler.engine.pool.checkedout() == 0  # given back while the app still runs
        other = await store.load(session.id)  # the row is free: another request writes at once
        other["other"] = True
        await asyncio.wait_for(store.save(other), 2)
        held.session["late"] = True
        await held.finish()
        stored = await store.load(session.id)
        assert (stored["n"], stored["late"], stored["other"]) == (1, True, True)
        assert handler.share.held(address="10.0.0.1") == 0

    try:
        asyncio.run(scenario())
    finally:
        asyncio.run(store.aclose())
        handler.close()


def test_a_stuck_blocking_hold_holds_the_sessions_saves_no_longer_than_its_bound_whatever_the_share() -> None:
    fair = share(session_connections=1, block_lock_seconds=0.3)
    fair.hold_blocking("k", None, wait=0)  # never released (a stuck request)
    fair.locked_here("k")
    started = time.monotonic()
    fair.hold_save("k", None, wait=5)()
    assert 0.25 < time.monotonic() - started < 1.5


def test_threads_waiting_at_a_blocking_gate_count_on_their_address() -> None:
    from sqla_sessions import MemoryHandler

    handler = MemoryHandler(SessionConfig(address_connections=2, block_wait_seconds=2))
    session = handler.load(None)
    session["a"] = 1
    handler.save(session)
    assert session.id is not None
    holder = BlockingSession.open(handler, session.id, address="10.0.0.1")
    outcomes: list[str] = []

    def queue_up() -> None:
        try:
            BlockingSession.open(handler, session.id, address="10.0.0.1").release()
            outcomes.append("served")
        except LockTimeout as exc:
            outcomes.append(type(exc).__name__)

    parked = [threading.Thread(target=queue_up) for _ in range(2)]
    for thread in parked:
        thread.start()
    time.sleep(0.3)
    with pytest.raises(TooManyRequests):  # two threads of the address wait at the gate already
        BlockingSession.open(handler, session.id, address="10.0.0.1")
    BlockingSession.open(handler, "a" * 32 + "." + "A" * 40, address="10.0.0.2").release()  # others are served
    holder.release()
    for thread in parked:
        thread.join()
    assert outcomes == ["served", "served"]


@pytest.mark.parametrize("db_backend", ["postgresql"], indirect=True)
def test_a_cancelled_finish_after_the_hold_expired_still_runs_the_callbacks_of_what_it_saved(
    db_backend: Backend,
) -> None:
    from sqla_sessions.store.aio import EXPIRY_GRACE, AsyncSessionStore

    url = db_backend.url
    handler = DatabaseHandler(url, SessionConfig(database_url=url, block_lock_seconds=0.5, pool_size=4))
    store = AsyncSessionStore(handler)
    ran: list[object] = []

    async def scenario() -> None:
        session = await store.load(None)
        session["a"] = 0
        await store.save(session)
        held = await store.open_blocking(session.id)
        held.session["a"] = 1
        held.session.on_saved(lambda: ran.append("job"))
        await asyncio.sleep(0.5 + EXPIRY_GRACE + 0.5)  # expired: the connection went back
        finishing = asyncio.ensure_future(held.finish())
        await asyncio.sleep(0)
        finishing.cancel()
        with pytest.raises(asyncio.CancelledError):
            await finishing
        await store.aclose()  # waits for the rewrite and its callbacks
        assert (await AsyncSessionStore(handler).load(session.id))["a"] == 1

    try:
        asyncio.run(scenario())
    finally:
        handler.close()
    assert ran == ["job"]
