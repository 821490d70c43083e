"""The one path of the hot statements (`handlers.runner`) with the engines users bring: async engines,
psycopg's client-side cursors, engines already in autocommit or not, without `hide_parameters`, and
what it leaves on the engine when the handler closes. Each case here broke once in review."""

from __future__ import annotations

import asyncio
from pathlib import Path

import psycopg
import pytest
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite

from sqla_sessions import DatabaseHandler, SaveAction, SessionConfig
from sqla_sessions.store.aio import AsyncSessionStore
from sqla_sessions.store.handlers.engines import create_session_engine
from sqla_sessions.store.handlers.runner import Compiled
from tests.conftest import Backend, StatementCounter, backend_for


@pytest.fixture
def pg(tmp_root: Path) -> Backend:
    return backend_for("postgresql", tmp_root)


def _rows(backend: Backend) -> list[tuple[int, bytes]]:
    with backend.engine.connect() as conn:
        return [(row[0], bytes(row[1])) for row in conn.exec_driver_sql("SELECT version, payload FROM sessions")]


@pytest.mark.parametrize("passed_in", [False, True], ids=["auto", "passed-in"])
def test_an_async_engine_runs_the_hot_statements_and_stores_them(db_backend: Backend, passed_in: bool) -> None:
    """psycopg's async dialect calls its driver "psycopg" too: its adapter takes no `prepare`/`binary`.
    An async engine passed in that is not in autocommit has its writes committed all the same."""
    from sqla_sessions.store.aio_runner import async_url

    url = async_url(db_backend.engine.url)
    if url is None:
        pytest.skip(f"no async driver for {db_backend.name} here")
    from sqlalchemy.ext.asyncio import create_async_engine

    handler = DatabaseHandler(db_backend.url, SessionConfig(database_url=db_backend.url))
    async_engine = create_async_engine(url) if passed_in else "auto"
    store = AsyncSessionStore(handler, async_engine=async_engine)
    assert store.mode == "async-engine"

    async def scenario() -> tuple[SaveAction, SaveAction, int]:
        session = await store.load(None)
        session["a"] = 1
        inserted = await store.save(session)
        loaded = await store.load(session.id)
        loaded["a"] = 2
        updated = await store.save(loaded)
        return inserted, updated, (await store.load(session.id))["a"]

    try:
        with StatementCounter(db_backend.engine) as counter:
            outcome = asyncio.run(scenario())
    finally:
        asyncio.run(store.aclose())
        if passed_in:
            asyncio.run(async_engine.dispose())  # type: ignore[union-attr]
        handler.close()
    assert outcome == (SaveAction.INSERTED, SaveAction.UPDATED, 2)
    assert [version for version, _ in _rows(db_backend)] == [2]
    assert counter.hot  # the runner's path, on the async engine's connections


def test_a_statement_is_compiled_for_each_dialect_it_runs_on() -> None:
    """An async engine of another driver (asyncpg's `$1`, say) gets SQL of its own paramstyle."""
    engine = sa.create_engine("sqlite://")
    statement = sa.select(sa.literal_column("x")).where(sa.column("k") == sa.bindparam("k"))
    compiled = Compiled(statement, engine)
    other = postgresql.dialect(paramstyle="numeric_dollar")
    sql, names = compiled.for_dialect(other)
    assert "$1" in sql and names == ("k",)
    assert compiled.for_dialect(engine.dialect) == (compiled.sql, compiled.names) and "?" in compiled.sql
    assert compiled.for_dialect(sqlite.dialect())[0] == compiled.sql
    engine.dispose()


def test_an_engine_with_psycopgs_client_side_cursors_works(pg: Backend) -> None:
    engine = create_session_engine(pg.url, autocommit=True, connect_args={"cursor_factory": psycopg.ClientCursor})
    handler = DatabaseHandler(engine, SessionConfig())
    try:
        session = handler.load(None)
        session["a"] = b"\x00bytes"
        assert session.save() is SaveAction.INSERTED
        loaded = handler.load(session.id)
        loaded.increment("n")
        assert loaded.save() is SaveAction.UPDATED
        assert handler.load(session.id)["n"] == 1 and handler.load(session.id)["a"] == b"\x00bytes"
    finally:
        handler.close()
        engine.dispose()


def test_a_bind_refused_for_another_clients_statement_is_sent_again_unnamed(pg: Backend) -> None:
    """A pooler's 08P01 ("bind message supplies 15 parameters, but prepared statement … requires 3"):
    nothing ran and the connection is in good order; it must not be taken for a dead one."""
    handler = DatabaseHandler(pg.url, SessionConfig(pool_size=1))
    try:
        session = handler.load(None)
        session["a"] = 1
        session.save()  # the INSERT, prepared
        loaded = handler.load(session.id)  # the SELECT
        loaded["a"] = 1.5
        loaded.save()  # the compare-and-set
        with handler.connect() as conn:
            pid = conn.exec_driver_sql("SELECT pg_backend_pid()").scalar_one()
            names = conn.exec_driver_sql("SELECT name FROM pg_prepared_statements").scalars().all()
            for name in names:  # behind psycopg's back: another client's statements under its names
                conn.exec_driver_sql(f"DEALLOCATE {name}")
                conn.exec_driver_sql(f"PREPARE {name} AS SELECT $1::text, $2::int, $3::int")
        assert names
        loaded = handler.load(session.id)
        loaded["b"] = 2
        assert loaded.save() is SaveAction.UPDATED
        assert dict(handler.load(session.id)) == {"a": 1.5, "b": 2}
        assert handler.prepared.off  # "auto": a pooler was seen
        with handler.connect() as conn:
            assert conn.exec_driver_sql("SELECT pg_backend_pid()").scalar_one() == pid  # not replaced
    finally:
        handler.close()


def test_closing_a_handler_leaves_no_listener_on_an_engine_passed_in(pg: Backend) -> None:
    engine = create_session_engine(pg.url, autocommit=True)
    before = (len(engine.pool.dispatch.checkout), len(engine.pool.dispatch.connect))
    for _ in range(5):
        DatabaseHandler(engine, SessionConfig()).close()
    assert (len(engine.pool.dispatch.checkout), len(engine.pool.dispatch.connect)) == before
    engine.dispose()


def test_an_engine_passed_in_already_in_autocommit_is_used_as_it_is(db_backend: Backend) -> None:
    engine = create_session_engine(db_backend.url, autocommit=True)
    handler = DatabaseHandler(engine, SessionConfig())
    try:
        handler.load(None)
        with handler.connect():
            pass
        assert handler._autocommit is engine  # no isolation switch and reset at every checkout
    finally:
        handler.close()
        engine.dispose()


def test_an_engine_passed_in_without_hide_parameters_leaks_no_payload(pg: Backend) -> None:
    engine = sa.create_engine(pg.url, isolation_level="AUTOCOMMIT")  # hide_parameters not set
    handler = DatabaseHandler(engine, SessionConfig(batch_requests=False))
    with engine.connect() as conn:  # any server error in a merge's UPDATE (through Connection.execute)
        conn.exec_driver_sql(
            "CREATE FUNCTION refuse_merges() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN RAISE EXCEPTION "
            "'refused'; END $$; CREATE TRIGGER refuse_merges BEFORE UPDATE ON sessions FOR EACH ROW "
            "WHEN (NEW.version > 2) EXECUTE FUNCTION refuse_merges()"
        )
    try:
        session = handler.load(None)
        session["card"] = "4111 1111 1111 1111"
        session.save()
        first, second = handler.load(session.id), handler.load(session.id)
        first["a"] = 1
        first.save()
        second["b"] = "also secret"
        with pytest.raises(sa.exc.DBAPIError) as raised:
            second.save()  # lost the race: the merge's UPDATE is refused
        assert "4111" not in str(raised.value) and "also secret" not in str(raised.value)
        assert "hidden" in str(raised.value)
    finally:
        with engine.connect() as conn:
            conn.exec_driver_sql("DROP TRIGGER refuse_merges ON sessions; DROP FUNCTION refuse_merges()")
        handler.close()
        engine.dispose()
