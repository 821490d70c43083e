"""The serial-merge issue's table, as regression tests on every store: each row read as its last
column (what running the requests one after the other gives), whichever commits first."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from sqla_sessions import DatabaseHandler
from sqla_sessions.store.aio import AsyncSessionStore
from sqla_sessions.store.handlers.base import BaseHandler
from tests.conftest import HandlerFactory


def slowed(write_on: Any) -> Any:
    """*write_on*, 0.3 s slower: a save that outlives its caller's timeout (the write goes on)."""

    def slow_write(*args: Any, **kwargs: Any) -> Any:
        time.sleep(0.3)
        return write_on(*args, **kwargs)

    return slow_write


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
    handler.write_on = slowed(handler.write_on)  # type: ignore[method-assign]  # the caller's timeout runs out first

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
    slow_write = slowed(write_on)

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


# -- found by review: identical items, and identity changes around a timed-out save ----------------------


def test_a_removal_beside_an_edit_of_an_identical_item_takes_the_untouched_copy(make_handler: HandlerFactory) -> None:
    handler = make_handler()
    line = {"sku": "A", "qty": 1}
    for edit_first in (True, False):
        session_id = seeded(handler, cart=[dict(line), dict(line)])
        editor, remover = handler.load(session_id), handler.load(session_id)
        editor["cart"][1]["qty"] = 3
        del remover["cart"][0]
        for session in (editor, remover) if edit_first else (remover, editor):
            session.save()
        assert handler.load(session_id)["cart"] == [{"sku": "A", "qty": 3}]  # both orders: serial


def late_save_then(handler: BaseHandler[Any], before: Any, after: Any, meanwhile: Any = None) -> tuple[Any, str]:
    """*before*, a save that times out (the write goes on), *after*, the end of the request's save
    (*meanwhile*: what another request does once the late write landed, given the session id)."""
    session_id = seeded(handler, secret="S")
    write_on = handler.write_on
    slow_write = slowed(write_on)

    async def request() -> Any:
        store = AsyncSessionStore(handler)
        handler.write_on = slow_write  # type: ignore[method-assign]
        try:
            session = await store.load(session_id)
            before(session)
            try:
                await asyncio.wait_for(session.asave(end_of_request=False), 0.05)
            except TimeoutError:
                pass
            after(session)
            await asyncio.sleep(0.5)  # the late write lands and is taken in
            if meanwhile is not None:
                handler.write_on = write_on  # type: ignore[method-assign]
                meanwhile(session_id)
            await store.save(session, end_of_request=True)
            return session
        finally:
            await store.aclose()
            handler.write_on = write_on  # type: ignore[method-assign]

    return asyncio.run(request()), session_id


def test_changes_after_a_timed_out_login_are_kept(make_handler: HandlerFactory) -> None:
    handler = make_handler()
    if not isinstance(handler, DatabaseHandler):
        pytest.skip("the memory handler's save runs inline: it cannot be left behind by a timeout")

    def after(session: Any) -> None:
        session["after"] = 1
        del session["secret"]

    session, _ = late_save_then(handler, lambda s: s.login("u1"), after)
    stored = handler.load(session.id)
    assert stored is not None and stored.user_id == "u1"
    assert stored.all() == {"after": 1}


@pytest.mark.parametrize("after", ["logout", "login as another user"])
def test_a_logout_after_a_timed_out_login_is_not_undone(make_handler: HandlerFactory, after: str) -> None:
    handler = make_handler()
    if not isinstance(handler, DatabaseHandler):
        pytest.skip("the memory handler's save runs inline: it cannot be left behind by a timeout")

    def then(session: Any) -> None:
        session.logout() if after == "logout" else session.login("u2")

    session, _ = late_save_then(handler, lambda s: s.login("u1"), then)
    assert session.user_id == (None if after == "logout" else "u2")
    assert handler.list_sessions("u1") == []  # the row the late login moved was destroyed where it went
    stored = handler.load(session.id)
    assert stored is None or (stored.user_id == session.user_id and "secret" not in stored)


def test_an_assignment_after_a_timed_out_increment_is_an_assignment(make_handler: HandlerFactory) -> None:
    handler = make_handler()
    if not isinstance(handler, DatabaseHandler):
        pytest.skip("the memory handler's save runs inline: it cannot be left behind by a timeout")

    def after(session: Any) -> None:
        session["n"] = 100

    def another_request(session_id: str) -> None:
        other = handler.load(session_id)
        other.increment("n")
        other.save()

    session, session_id = late_save_then(handler, lambda s: s.increment("n", 5), after, another_request)
    assert handler.load(session_id)["n"] == 100  # increment, increment, assignment: the assignment
