"""The hot path, counted with SQLAlchemy engine events on every real database."""

from __future__ import annotations

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
    # failed compare-and-set, BEGIN, (PostgreSQL: the lock wait's bound, set_config), SELECT … FOR UPDATE,
    # UPDATE, COMMIT
    bounded = db_backend.name == "postgresql"
    assert counter.count == 5 + bounded
    assert "set_config" in counter.statements[2] or not bounded
    assert "FOR UPDATE" in counter.statements[2 + bounded] or db_backend.name == "sqlite"


def test_the_same_counts_without_the_fast_path(db_backend: Backend, clock: FakeClock) -> None:
    handler = DatabaseHandler(db_backend.engine, SessionConfig(), clock=clock, fast_path=False)
    with StatementCounter(db_backend.engine) as counter:
        session_id = _stored_id(handler)  # the first write: one INSERT through SQLAlchemy's path
    assert counter.count == 1 and counter.statements[0].lstrip().upper().startswith("INSERT")
    with StatementCounter(db_backend.engine) as counter:
        session = handler.load(session_id)
        session["counter"] = 1
        assert session.save() is SaveAction.UPDATED
    assert counter.count == 2


def test_a_driver_error_on_the_fast_path_is_retried_through_sqlalchemy(db_backend: Backend, clock: FakeClock) -> None:
    handler = _handler(db_backend, clock)
    session_id = _stored_id(handler)
    handler._fast_by_key.sql = "SELEC this is not sql"  # the driver raises; SQLAlchemy's path answers
    if handler._fast_by_key.libpq is not None:  # PostgreSQL: the libpq statement too
        handler._fast_by_key.libpq.sql, handler._fast_by_key.libpq.name = b"SELEC oops", b"broken_select"
    assert handler.load(session_id)["counter"] == 0
    handler._fast_update.sql = "UPDATE nothing at all"
    if handler._fast_update.libpq is not None:
        handler._fast_update.libpq.sql, handler._fast_update.libpq.name = b"UPDATE oops", b"broken_update"
    session = handler.load(session_id)
    session["counter"] = 5
    assert session.save() is SaveAction.UPDATED
    assert handler.load(session_id)["counter"] == 5


def test_every_per_request_statement_addresses_one_row_by_its_key(db_backend: Backend, clock: FakeClock) -> None:
    """Split-token ids: load, save, touch, lost race, login and logout all name the row by its primary
    key (what a sharded PostgreSQL routes by); none looks a session up by its secret's hash."""
    handler = _handler(db_backend, clock)
    with StatementCounter(db_backend.engine) as counter:
        session_id = _stored_id(handler)
        first, second = handler.load(session_id), handler.load(session_id)
        first.increment("counter")
        first.save()
        second.increment("counter")
        second.save()  # a lost race: the locked merge
        clock.advance(handler.config.touch_interval + 1)
        handler.load(session_id).save()  # a due touch
        login = handler.load(session_id)
        login.login("ada")
        login.save()
        out = handler.load(login.id)
        out.logout()
        out.save()
    assert handler.load(login.id).is_new
    for statement in counter.statements:
        sql = " ".join(statement.split()).lower()
        if sql.split(" ", 1)[0] in ("begin", "commit", "rollback", "savepoint", "release") or sql.startswith(
            ("set ", "select set_config(")
        ):
            continue
        if sql.startswith("insert"):
            continue  # a new row names its key in its values
        assert " where " in sql, sql
        where = sql.split(" where ", 1)[1]
        assert "key" in where, sql
        assert "id_hash" not in where, sql


def test_the_load_is_a_primary_key_lookup(db_backend: Backend, clock: FakeClock) -> None:
    if db_backend.name != "postgresql":
        return
    handler = _handler(db_backend, clock)
    session_id = _stored_id(handler)
    with StatementCounter(db_backend.engine) as counter:
        handler.load(session_id)
    statements = counter.statements
    key = session_id.split(".")[0]
    with db_backend.engine.connect() as conn:
        conn.exec_driver_sql("SET enable_seqscan = off")  # a tiny table: ask which index the planner would use
        sql = statements[0].replace("%(b_key)s", f"'{key}'").replace("%(now)s", "0")
        plan = "\n".join(row[0] for row in conn.exec_driver_sql(f"EXPLAIN {sql}"))
    assert "pk_sessions" in plan, plan
