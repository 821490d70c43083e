"""BlockingSession on every handler: exclusion, bounded wait, release, and a hold that outlives its bound."""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import pytest

from sqla_sessions import DatabaseHandler, LockTimeout, SaveAction
from sqla_sessions.store.handlers.base import BaseHandler
from sqla_sessions.store.locking import BlockingSession, blocking, blocking_matcher, is_marked_blocking
from tests.conftest import HandlerFactory


def stored_id(handler: BaseHandler[Any]) -> str:
    session = handler.load(None)
    session["n"] = 0
    session.save()
    return session.id


@pytest.fixture
def real_clock_handler(make_handler: HandlerFactory) -> BaseHandler[Any]:
    handler = make_handler(block_wait_seconds=0.5, block_lock_seconds=5)
    handler._clock = time.time  # leases are timed: use the real clock
    return handler


def test_a_second_blocking_request_waits_for_the_first(real_clock_handler: BaseHandler[Any]) -> None:
    handler = real_clock_handler
    session_id = stored_id(handler)
    first = BlockingSession.open(handler, session_id)
    assert first.locked
    entered = threading.Event()
    second: list[BlockingSession] = []

    def wait_for_it() -> None:
        second.append(BlockingSession.open(handler, session_id))
        entered.set()

    thread = threading.Thread(target=wait_for_it)
    thread.start()
    assert not entered.wait(0.2)  # still held
    first.session.increment("n")
    assert first.finish() is SaveAction.UPDATED
    assert entered.wait(5)  # handed over when the first saved
    thread.join()
    assert second[0].session["n"] == 1
    second[0].session.increment("n")
    second[0].finish()
    assert handler.load(session_id)["n"] == 2


def test_the_wait_is_bounded(real_clock_handler: BaseHandler[Any]) -> None:
    handler = real_clock_handler
    session_id = stored_id(handler)
    holder = BlockingSession.open(handler, session_id)
    started = time.monotonic()
    with pytest.raises(LockTimeout) as caught:
        BlockingSession.open(handler, session_id)
    assert 0.4 <= time.monotonic() - started < 3.0
    assert caught.value.waited == 0.5
    holder.release()
    BlockingSession.open(handler, session_id).release()  # free again


def test_release_without_saving_discards_changes_and_frees_the_session(real_clock_handler: BaseHandler[Any]) -> None:
    handler = real_clock_handler
    session_id = stored_id(handler)
    held = BlockingSession.open(handler, session_id)
    held.session["discarded"] = True
    held.release()
    held.release()  # idempotent
    again = BlockingSession.open(handler, session_id)
    assert "discarded" not in again.session
    again.release()


def test_nothing_to_lock_gives_a_fresh_session(real_clock_handler: BaseHandler[Any]) -> None:
    for cookie in (None, "garbage", "a" * 32 + "." + "A" * 40):
        held = BlockingSession.open(real_clock_handler, cookie)
        assert not held.locked and held.session.is_new
        held.session["x"] = 1
        assert held.finish() is SaveAction.INSERTED


def test_a_wrong_secret_locks_nothing(real_clock_handler: BaseHandler[Any]) -> None:
    handler = real_clock_handler
    session_id = stored_id(handler)
    key, secret = session_id.split(".")
    forged = BlockingSession.open(handler, f"{key}.{secret[::-1] if secret[::-1] != secret else 'A' * 40}")
    assert not forged.locked and forged.session.is_new and "n" not in forged.session
    started = time.monotonic()
    owner = BlockingSession.open(handler, session_id)  # not kept waiting by the forged request
    assert owner.locked and time.monotonic() - started < 0.4
    owner.session.increment("n")
    owner.finish()
    forged.session["planted"] = 1
    forged.finish()
    assert forged.session.key != key and handler.load(session_id).all() == {"n": 1}


def test_a_wrong_secret_does_not_wait_for_the_owners_lock(real_clock_handler: BaseHandler[Any]) -> None:
    """InnoDB locks a primary-key record before it checks the rest of a WHERE clause: the secret is
    checked by a plain read first, so a known key tells nothing about the owner's blocking requests."""
    handler = real_clock_handler
    session_id = stored_id(handler)
    key = session_id.split(".")[0]
    owner = BlockingSession.open(handler, session_id)
    assert owner.locked
    started = time.monotonic()
    forged = BlockingSession.open(handler, f"{key}.{'A' * 40}")
    assert time.monotonic() - started < 0.3  # not the 0.5 s wait, nor a LockTimeout
    assert not forged.locked and forged.session.is_new
    forged.release()
    owner.session.increment("n")
    owner.finish()
    assert handler.load(session_id)["n"] == 1


@pytest.mark.parametrize("mysql_bound", ["idle_transaction_timeout", "wait_timeout"])
def test_a_hold_past_block_lock_seconds_is_ended_by_the_database_and_the_save_still_lands(
    make_handler: HandlerFactory,
    backend_name: str,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
    mysql_bound: str,
) -> None:
    """PostgreSQL: idle_in_transaction_session_timeout. MariaDB: idle_transaction_timeout; MySQL's
    wait_timeout (it has no idle_transaction_timeout), which MariaDB has too, so both run here."""
    if backend_name not in ("postgresql", "mariadb") or (
        backend_name == "postgresql" and mysql_bound == "wait_timeout"
    ):
        pytest.skip("SQLite holds leases, not locks; PostgreSQL runs once")
    handler = make_handler(block_lock_seconds=0.5)
    assert isinstance(handler, DatabaseHandler)
    monkeypatch.setattr(
        "sqla_sessions.store.handlers.dialects.mysql._is_mariadb", lambda conn: mysql_bound != "wait_timeout"
    )
    handler._clock = time.time
    session_id = stored_id(handler)
    held = BlockingSession.open(handler, session_id)
    time.sleep(1.2 if backend_name == "postgresql" else 2.5)  # the database ends the idle hold, releasing the lock
    other = BlockingSession.open(handler, session_id)  # not blocked by a stale lock
    other.release()
    held.session["late"] = True
    with caplog.at_level(logging.WARNING, logger="sqla_sessions"):
        held.finish()
    assert "past block_lock_seconds" in caplog.text
    assert handler.load(session_id)["late"] is True
    if backend_name == "mariadb":  # the bound ended with the lock: a pooled connection keeps the server's
        with handler.engine.connect() as conn:
            for _ in range(3):
                session_value = conn.exec_driver_sql(f"SELECT @@SESSION.{mysql_bound} = @@GLOBAL.{mysql_bound}")
                assert session_value.scalar() == 1


def test_blocking_matchers() -> None:
    globs = blocking_matcher(["/checkout/*", "/pay"], lambda environ: environ["PATH_INFO"])
    assert globs is not None
    assert globs({"PATH_INFO": "/checkout/step1"}) and globs({"PATH_INFO": "/pay"})
    assert not globs({"PATH_INFO": "/pay/x"}) and not globs({"PATH_INFO": "/"})
    assert blocking_matcher(None, str) is None
    always = blocking_matcher(lambda request: True, str)
    assert always is not None and always({})

    @blocking
    def view() -> None: ...

    assert is_marked_blocking(view) and not is_marked_blocking(lambda: None)


def test_a_holder_that_keeps_working_gives_its_lock_up_past_block_lock_seconds(make_handler: HandlerFactory) -> None:
    """The database bounds an idle hold only; a request that keeps saving gives the lock up itself at
    its first save past block_lock_seconds, and saves on as a non-blocking request (nothing lost)."""
    handler = make_handler(block_wait_seconds=0.5, block_lock_seconds=0.4)
    handler._clock = time.time  # leases and holds are timed: use the real clock
    session_id = stored_id(handler)
    held = BlockingSession.open(handler, session_id)
    held.session.increment("n")
    held.session.save(end_of_request=False)
    time.sleep(0.5)
    held.session["late"] = True
    held.session.save(end_of_request=False)  # past the bound: the lock is given up here
    assert not held.locked
    other = BlockingSession.open(handler, session_id)  # at once, not after a wait
    assert other.locked
    other.session.increment("n")
    other.finish()
    held.session["end"] = True
    held.finish()
    held.release()
    assert handler.load(session_id).all() == {"n": 2, "late": True, "end": True}
