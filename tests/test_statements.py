"""The hot path, counted on every real database: on the driver's cursor (`handlers.runner`) for the
statements every request runs, through SQLAlchemy for the rest (`StatementCounter` sees both)."""

from __future__ import annotations

import pytest
import sqlalchemy as sa

from sqla_sessions import DatabaseHandler, SaveAction, SessionConfig
from tests.conftest import Backend, FakeClock, StatementCounter


def _handler(db_backend: Backend, clock: FakeClock) -> DatabaseHandler:
    return DatabaseHandler(db_backend.engine, SessionConfig(), clock=clock)


def _stored_id(handler: DatabaseHandler) -> str:
    session = handler.load(None)
    session["counter"] = 0
    session["profile"] = {"name": "Ada", "tags": ["x"]}
    session.save()
    return session.id


def test_loading_an_existing_session_is_one_statement(db_backend: Backend, clock: FakeClock) -> None:
    handler = _handler(db_backend, clock)
    session_id = _stored_id(handler)
    with StatementCounter(db_backend.engine) as counter:
        session = handler.load(session_id)
    assert session["counter"] == 0
    assert counter.count == 1 and counter.statements[0].lstrip().upper().startswith("SELECT")
    assert counter.hot == counter.statements  # the production path, not SQLAlchemy's


def test_a_read_only_request_inside_touch_interval_is_one_select_and_no_write(
    db_backend: Backend, clock: FakeClock
) -> None:
    handler = _handler(db_backend, clock)
    session_id = _stored_id(handler)
    clock.advance(10)
    with StatementCounter(db_backend.engine) as counter:
        session = handler.load(session_id)
        assert session["profile"]["tags"] == ["x"]
        assert session.save() is SaveAction.NOTHING
    assert counter.count == 1


def test_an_uncontended_save_of_changes_is_one_statement(db_backend: Backend, clock: FakeClock) -> None:
    handler = _handler(db_backend, clock)
    session = handler.load(_stored_id(handler))
    session["profile"]["tags"].append("y")
    session.increment("counter")
    with StatementCounter(db_backend.engine) as counter:
        assert session.save() is SaveAction.UPDATED
    assert counter.count == 1 and counter.statements[0].lstrip().upper().startswith("UPDATE")


def test_a_new_session_that_writes_nothing_runs_no_statement(db_backend: Backend, clock: FakeClock) -> None:
    handler = _handler(db_backend, clock)
    with StatementCounter(db_backend.engine) as counter:
        session = handler.load(None)
        _ = session.get("user")
        assert session.save() is SaveAction.NOTHING
    assert counter.count == 0


def test_a_first_write_is_one_insert(db_backend: Backend, clock: FakeClock) -> None:
    handler = _handler(db_backend, clock)
    session = handler.load(None)
    session["a"] = 1
    with StatementCounter(db_backend.engine) as counter:
        assert session.save() is SaveAction.INSERTED
    assert counter.count == 1 and counter.statements[0].lstrip().upper().startswith("INSERT")
    assert counter.hot == counter.statements


def test_a_due_touch_is_one_update(db_backend: Backend, clock: FakeClock) -> None:
    handler = _handler(db_backend, clock)
    session_id = _stored_id(handler)
    clock.advance(61)
    session = handler.load(session_id)
    with StatementCounter(db_backend.engine) as counter:
        assert session.save() is SaveAction.TOUCHED
    assert counter.count == 1


def test_a_contended_save_locks_merges_and_commits(db_backend: Backend, clock: FakeClock) -> None:
    handler = _handler(db_backend, clock)
    session_id = _stored_id(handler)
    first, second = handler.load(session_id), handler.load(session_id)
    first["a"] = 1
    first.save()
    second["b"] = 2
    with StatementCounter(db_backend.engine) as counter:
        assert second.save() is SaveAction.MERGED
    # PostgreSQL: the compare-and-set of a batch (of one: the save went through the batcher), skipping
    # nothing but finding the row changed; then the save alone: failed compare-and-set, BEGIN, (PostgreSQL:
    # the lock wait's bound, set_config), SELECT … FOR UPDATE, UPDATE, COMMIT
    postgresql = db_backend.name == "postgresql"
    assert counter.count == 5 + 2 * postgresql
    assert counter.hot == counter.statements[: 1 + postgresql]
    assert "set_config" in counter.statements[2 + postgresql] or not postgresql
    assert "FOR UPDATE" in counter.statements[2 + 2 * postgresql] or db_backend.name == "sqlite"


def test_a_driver_error_is_sqlalchemys_and_leaves_a_working_connection(db_backend: Backend, clock: FakeClock) -> None:
    handler = _handler(db_backend, clock)
    session_id = _stored_id(handler)
    good = handler._by_key.sql
    handler._by_key.sql = "SELEC this is not sql"  # the server refuses it: no second path answers instead
    with pytest.raises(sa.exc.DBAPIError) as raised:
        handler.read(handler.load_on, session_id)
    assert not raised.value.connection_invalidated and "hidden" in str(raised.value)
    handler._by_key.sql = good
    assert handler.load(session_id)["counter"] == 0  # the same pooled connection, still in good order
