"""The hot path on PostgreSQL as the server sees it: psycopg's prepared statements in binary, what goes on
the wire (libpq's own trace: it changes nothing on the path), and every way out of it."""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from psycopg import pq
from sqlalchemy.engine import Engine

from sqla_sessions import DatabaseHandler, SaveAction, SessionConfig
from sqla_sessions.errors import StoreUnavailable
from sqla_sessions.store.handlers.engines import create_session_engine
from tests.conftest import Backend, FakeClock, backend_for


@pytest.fixture
def pg(tmp_root: Path) -> Backend:
    return backend_for("postgresql", tmp_root)


@pytest.fixture
def one_connection(pg: Backend) -> Iterator[Engine]:
    """An autocommit engine with a single pooled connection, so a test can look at the one its handler used."""
    engine = create_session_engine(pg.url, autocommit=True, pool_size=1, max_overflow=0)
    yield engine
    engine.dispose()


def _prepared(engine: Engine) -> set[str]:
    with engine.connect() as conn:
        rows = conn.exec_driver_sql("SELECT name FROM pg_prepared_statements WHERE name LIKE '_pg3_%%'")
        return {row[0] for row in rows}


def _wire(engine: Engine, action: Any) -> list[str]:
    """The frontend messages *action* sends on the engine's one connection (libpq's own trace)."""
    with engine.connect() as conn:
        pgconn = conn.connection.dbapi_connection.pgconn  # type: ignore[union-attr]
    with tempfile.TemporaryFile("w+") as trace:
        pgconn.trace(trace.fileno())
        pgconn.set_trace_flags(pq.Trace.SUPPRESS_TIMESTAMPS | pq.Trace.REGRESS_MODE)
        try:
            action()
        finally:
            pgconn.untrace()
        trace.seek(0)
        return [line.split("\t")[2] for line in trace.read().splitlines() if line.startswith("F\t")]


def _stored(handler: DatabaseHandler) -> str:
    session = handler.load(None)
    session["counter"] = 0
    session.save()
    return session.id


def test_a_read_only_request_is_one_bind_and_execute_of_a_prepared_statement(
    one_connection: Engine, clock: FakeClock
) -> None:
    handler = DatabaseHandler(one_connection, SessionConfig(), clock=clock)
    session_id = _stored(handler)
    handler.load(session_id)  # prepares the SELECT on this connection

    messages = _wire(one_connection, lambda: handler.load(session_id))

    # One round trip (one Sync), one statement (one Execute); no Parse (prepared once), no BEGIN or COMMIT.
    assert messages == ["Bind", "Describe", "Execute", "Sync"]
    assert len(_prepared(one_connection)) == 2  # the INSERT and the SELECT


def test_a_changed_key_is_one_more_prepared_update(one_connection: Engine, clock: FakeClock) -> None:
    handler = DatabaseHandler(one_connection, SessionConfig(), clock=clock)
    session_id = _stored(handler)
    for _ in range(2):  # the second round runs on prepared statements only
        session = handler.load(session_id)
        session.increment("counter")

        messages = _wire(one_connection, lambda session=session: session.save())

    assert session.save() is SaveAction.NOTHING
    assert messages == ["Bind", "Describe", "Execute", "Sync"]
    assert handler.load(session_id)["counter"] == 2


def test_statements_dropped_by_discard_all_are_prepared_again(one_connection: Engine, clock: FakeClock) -> None:
    handler = DatabaseHandler(one_connection, SessionConfig(), clock=clock)
    session_id = _stored(handler)
    handler.load(session_id)
    with one_connection.connect() as conn:
        conn.exec_driver_sql("DISCARD ALL")  # what a connection pooler may do between clients
    assert _prepared(one_connection) == set()

    assert handler.load(session_id)["counter"] == 0
    assert handler.load(session_id)["counter"] == 0
    # psycopg 3.3 saw the DISCARD ALL and prepares the SELECT afresh; 3.2 did not, so its next use of
    # the name was refused ("does not exist"), which "auto" takes for a pooler: unnamed from then on.
    assert len(_prepared(one_connection)) == 1 or handler.prepared.off


@contextmanager
def _table_of_its_own(pg: Backend, table: str) -> Iterator[Engine]:
    """A sessions table of the test's own (its schema is altered) and an engine of one connection."""
    from sqla_sessions import upgrade

    upgrade(pg.engine, table=table)
    engine = create_session_engine(pg.url, autocommit=True, pool_size=1, max_overflow=0)
    try:
        yield engine
    finally:
        engine.dispose()
        with pg.engine.begin() as conn:
            conn.exec_driver_sql(f"DROP TABLE {table}")
            conn.exec_driver_sql(f"DROP TABLE sqla_sessions_alembic_version_{table}")


def test_a_column_type_changed_under_a_prepared_statement(pg: Backend, clock: FakeClock) -> None:
    table = "libpq_altered"
    with _table_of_its_own(pg, table) as engine:
        handler = DatabaseHandler(engine, SessionConfig(table=table), clock=clock)
        session_id = _stored(handler)
        handler.load(session_id)
        with engine.connect() as conn:  # "cached plan must not change result type" for the prepared SELECT
            conn.exec_driver_sql(f"ALTER TABLE {table} ALTER COLUMN user_agent TYPE text")

        assert handler.load(session_id)["counter"] == 0
        assert handler.load(session_id)["counter"] == 0
        # psycopg 3.3 saw the ALTER on its connection and forgot what it had prepared: the SELECT again.
        # 3.2 did not: the stale statement's refusal turned prepared statements off ("auto").
        assert len(_prepared(engine)) == 1 or handler.prepared.off


def test_no_prepared_statements_when_psycopg_is_told_not_to_prepare(pg: Backend, clock: FakeClock) -> None:
    # prepare_threshold=None is how psycopg users run behind PgBouncer in transaction mode.
    engine = create_session_engine(
        pg.url, autocommit=True, pool_size=1, max_overflow=0, connect_args={"prepare_threshold": None}
    )
    try:
        handler = DatabaseHandler(engine, SessionConfig(), clock=clock)
        session_id = _stored(handler)
        session = handler.load(session_id)
        session.increment("counter")
        session.save()
        assert handler.load(session_id)["counter"] == 1
        assert _prepared(engine) == set()
    finally:
        engine.dispose()


def test_a_connection_in_another_client_encoding_gets_its_text_right(one_connection: Engine, clock: FakeClock) -> None:
    handler = DatabaseHandler(one_connection, SessionConfig(), clock=clock)
    with one_connection.connect() as conn:
        conn.exec_driver_sql("SET client_encoding TO 'LATIN1'")
    session = handler.load(None)
    session.login("Zoë Müller")
    session.save()

    loaded = handler.load(session.id)

    assert loaded.user_id == "Zoë Müller"
    with one_connection.connect() as conn:
        conn.exec_driver_sql("SET client_encoding TO 'UTF8'")
        stored = conn.execute(sa.select(handler.table.c.user_id)).scalar_one()
    assert stored == "Zoë Müller"  # stored as the same characters, not as mis-decoded bytes


def test_values_round_trip_in_binary(one_connection: Engine, clock: FakeClock) -> None:
    handler = DatabaseHandler(one_connection, SessionConfig(), clock=clock)
    session = handler.load(None)
    session.login("用户 🙂")
    session["blob"] = "x" * 100_000  # a payload far beyond one network packet
    session.save()
    handler.load(session.id)  # prepared

    loaded = handler.load(session.id)

    assert loaded.user_id == "用户 🙂"
    assert loaded["blob"] == "x" * 100_000
    assert loaded.created_at == session.created_at and loaded.expires_at == session.expires_at


def test_a_nul_in_text_is_refused_not_cut_short(one_connection: Engine, clock: FakeClock) -> None:
    # In libpq's text format a NUL would silently cut the string short; in binary the server refuses it.
    handler = DatabaseHandler(one_connection, SessionConfig(), clock=clock)
    session = handler.load(None)
    session.user_agent = "Bot\x00Mozilla"  # (user ids with a NUL are refused at login already)
    session["x"] = 1

    with pytest.raises(sa.exc.DataError):
        session.save()

    with one_connection.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(handler.table)).scalar_one() == 0


def test_a_killed_connection_is_one_error_and_then_a_new_connection(one_connection: Engine, pg: Backend) -> None:
    handler = DatabaseHandler(one_connection, SessionConfig())
    session_id = _stored(handler)
    handler.load(session_id)
    with one_connection.connect() as conn:
        pid = conn.exec_driver_sql("SELECT pg_backend_pid()").scalar_one()
    with pg.engine.connect() as admin:
        admin.exec_driver_sql(f"SELECT pg_terminate_backend({pid})")

    assert handler.load(session_id)["counter"] == 0  # a read is sent again, on a new connection
    with one_connection.connect() as conn:
        assert conn.exec_driver_sql("SELECT pg_backend_pid()").scalar_one() != pid
        pid = conn.exec_driver_sql("SELECT pg_backend_pid()").scalar_one()
    session = handler.load(session_id)
    session.increment("counter")
    with pg.engine.connect() as admin:
        admin.exec_driver_sql(f"SELECT pg_terminate_backend({pid})")

    with pytest.raises(StoreUnavailable) as raised:  # a write is not: its outcome would be unknown
        session.save()

    cause = raised.value.__cause__
    assert isinstance(cause, sa.exc.DBAPIError) and cause.connection_invalidated  # the pool drops it
    assert handler.load(session_id)["counter"] == 0


def test_the_same_on_psycopgs_pure_python_libpq_binding(pg: Backend, tmp_path: Path) -> None:
    # psycopg without its C extension (PSYCOPG_IMPL=python, ctypes over the system's libpq) has the
    # same PGconn API; a user without psycopg[binary] or psycopg[c] runs on it.
    import os
    import subprocess
    import sys

    script = tmp_path / "roundtrip.py"
    script.write_text(
        "import sys\n"
        "from psycopg import pq\n"
        "from sqla_sessions import DatabaseHandler, SessionConfig\n"
        "from sqla_sessions.store.handlers.engines import create_session_engine\n"
        "engine = create_session_engine(sys.argv[1], autocommit=True, pool_size=1, max_overflow=0)\n"
        "handler = DatabaseHandler(engine, SessionConfig())\n"
        "session = handler.load(None)\n"
        "session.login('Zoë')\n"
        "session['counter'] = 0\n"
        "session.save()\n"
        "for _ in range(3):\n"
        "    loaded = handler.load(session.id)\n"
        "    loaded.increment('counter')\n"
        "    loaded.save()\n"
        "loaded = handler.load(session.id)\n"
        "with engine.connect() as conn:\n"
        "    prepared = conn.exec_driver_sql(\n"
        "        \"SELECT count(*) FROM pg_prepared_statements WHERE name LIKE '_pg3_%%'\").scalar()\n"
        "print(pq.__impl__, loaded['counter'], loaded.user_id, prepared)\n"
    )
    env = {**os.environ, "PSYCOPG_IMPL": "python"}
    done = subprocess.run([sys.executable, str(script), pg.url], env=env, capture_output=True, text=True, timeout=60)

    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["python", "3", "Zoë", "3"]  # INSERT, SELECT and UPDATE prepared


def test_a_schema_translate_map_is_honoured(pg: Backend) -> None:
    """The prepared statements name the table without a schema; a translated engine must not bypass its map."""
    with pg.engine.begin() as conn:
        conn.exec_driver_sql("DROP SCHEMA IF EXISTS tenant_a CASCADE")
        conn.exec_driver_sql("CREATE SCHEMA tenant_a")
        conn.exec_driver_sql("CREATE TABLE tenant_a.sessions (LIKE public.sessions INCLUDING ALL)")
    engine = create_session_engine(pg.url, autocommit=True).execution_options(schema_translate_map={None: "tenant_a"})
    try:
        handler = DatabaseHandler(engine)
        session_id = _stored(handler)
        session = handler.load(session_id)
        assert session["counter"] == 0
        session["counter"] = 1
        assert session.save() is SaveAction.UPDATED
        with pg.engine.connect() as conn:
            assert conn.exec_driver_sql("SELECT count(*) FROM public.sessions").scalar() == 0
            assert conn.exec_driver_sql("SELECT count(*) FROM tenant_a.sessions").scalar() == 1
        # GC too: each tenant's sweep deletes from its own table, never another's.
        other = DatabaseHandler(pg.engine)
        _stored(other)  # one session in public
        with pg.engine.begin() as conn:
            for schema in ("public", "tenant_a"):
                conn.exec_driver_sql(f"UPDATE {schema}.sessions SET expires_at = 1")
        assert handler.gc() == 1
        with pg.engine.connect() as conn:
            assert conn.exec_driver_sql("SELECT count(*) FROM public.sessions").scalar() == 1
            assert conn.exec_driver_sql("SELECT count(*) FROM tenant_a.sessions").scalar() == 0
    finally:
        engine.dispose()
        with pg.engine.begin() as conn:
            conn.exec_driver_sql("DROP SCHEMA tenant_a CASCADE")


def test_a_migration_from_another_process_leaves_no_pooled_connection_failing(pg: Backend, clock: FakeClock) -> None:
    """The usual case of a schema change: a migration run elsewhere. Each pooled connection's prepared
    SELECT is then refused ("cached plan must not change result type"); it had not run, so it is sent
    again unnamed, and the connection is replaced when it goes back to the pool."""
    table = "wire_migrated"
    with _table_of_its_own(pg, table) as engine:
        handler = DatabaseHandler(engine, SessionConfig(table=table), clock=clock)
        session_id = _stored(handler)
        handler.load(session_id)
        with engine.connect() as conn:
            pid = conn.exec_driver_sql("SELECT pg_backend_pid()").scalar_one()
        with pg.engine.begin() as conn:  # another connection, as a migration from another process
            conn.exec_driver_sql(f"ALTER TABLE {table} ALTER COLUMN user_agent TYPE text")

        assert [handler.load(session_id)["counter"] for _ in range(3)] == [0, 0, 0]
        with engine.connect() as conn:
            assert conn.exec_driver_sql("SELECT pg_backend_pid()").scalar_one() != pid  # replaced
        assert not handler.prepared.off  # not taken for a pooler
