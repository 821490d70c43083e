"""The serial-merge issue's table, as regression tests on every store: each row read as its last
column (what running the requests one after the other gives), whichever commits first."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from sqla_sessions import DatabaseHandler
from sqla_sessions.aio import AsyncSessionStore
from sqla_sessions.handlers.base import BaseHandler
from tests.conftest import HandlerFactory


def seeded(handler: BaseHandler[Any], **values: Any) -> str:
    session = handler.load(None)
    session.put(values)
    session.save()
    return session.id


def remove_a_push_b(session: Any) -> None:
    session["list"].remove("a")
    session.push("list", "b")


def remove_a(session: Any) -> None:
    session["list"].remove("a")


@pytest.mark.parametrize("b_first", [True, False], ids=["B saves first", "A saves first"])
@pytest.mark.parametrize(("start", "want"), [(["a"], ["b"]), (["x", "a"], ["x", "b"])])
def test_an_insertion_survives_the_removal_of_the_item_it_replaced(
    make_handler: HandlerFactory, start: list[str], want: list[str], b_first: bool
) -> None:
    handler = make_handler()
    session_id = seeded(handler, list=start)
    a, b = handler.load(session_id), handler.load(session_id)
    remove_a_push_b(b)
    remove_a(a)
    for session in (b, a) if b_first else (a, b):
        session.save()
    assert handler.load(session_id)["list"] == want


def test_a_save_whose_caller_timed_out_is_applied_once(make_handler: HandlerFactory) -> None:
    """`asave()` under `asyncio.wait_for`: the write goes on in its thread after the timeout; the end
    of the request's save must not write the same increment and push again."""
    handler = make_handler()
    session_id = seeded(handler, n=0, log=[])
    write_on = handler.write_on

    def slow_write(*args: Any, **kwargs: Any) -> Any:
        time.sleep(0.3)  # a slow database: the caller's timeout runs out first
        return write_on(*args, **kwargs)

    handler.write_on = slow_write  # type: ignore[method-assign]

    async def request() -> None:
        store = AsyncSessionStore(handler)
        try:
            session = await store.load(session_id)
            session.increment("n")
            session.push("log", "once")
            try:
                await asyncio.wait_for(session.asave(end_of_request=False), 0.05)
            except TimeoutError:
                pass  # the app carries on
            session["after"] = True  # a change made after the timed-out save froze its changes
            await store.save(session, end_of_request=True)
        finally:
            await store.aclose()

    asyncio.run(request())
    stored = handler.load(session_id)
    assert stored["n"] == 1
    assert stored["log"] == ["once"]
    assert stored["after"] is True


def test_a_timed_out_save_that_merged_keeps_the_other_writer(make_handler: HandlerFactory) -> None:
    """The late save merged onto another request's write: the next save keeps both, and its own."""
    handler = make_handler()
    if not isinstance(handler, DatabaseHandler):
        pytest.skip("the memory handler's save runs inline: it cannot be left behind by a timeout")
    session_id = seeded(handler, n=0, log=[])
    other = handler.load(session_id)
    write_on = handler.write_on

    def slow_write(*args: Any, **kwargs: Any) -> Any:
        time.sleep(0.3)
        return write_on(*args, **kwargs)

    async def request() -> None:
        store = AsyncSessionStore(handler)
        try:
            session = await store.load(session_id)
            other.push("log", "other")
            other.save()  # another request wrote first: the timed-out save will merge
            handler.write_on = slow_write  # type: ignore[method-assign]
            session.increment("n", 5)
            session.push("log", "mine")
            try:
                await asyncio.wait_for(session.asave(end_of_request=False), 0.05)
            except TimeoutError:
                pass
            session.push("log", "later")
            session.increment("n")
            await store.save(session, end_of_request=True)
        finally:
            await store.aclose()

    asyncio.run(request())
    stored = handler.load(session_id)
    assert stored["n"] == 6
    assert stored["log"] == ["other", "mine", "later"]
