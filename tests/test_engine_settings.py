"""The engine sqla_sessions builds from a config: pool sizing that does not churn, timeouts that answer
503 instead of hanging, and prepared statements that can be turned off for PgBouncer."""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from sqlalchemy.engine import make_url

from sqla_sessions import ConfigurationError, DatabaseHandler, SessionConfig, upgrade
from sqla_sessions.asgi import SessionMiddleware as AsgiMiddleware
from sqla_sessions.store.handlers.engines import create_session_engine, engine_options
from sqla_sessions.store.locking import BlockingSession
from sqla_sessions.wsgi import SessionMiddleware as WsgiMiddleware
from tests.conftest import Backend


def test_engine_settings_have_defaults_that_never_churn_and_come_from_the_environment() -> None:
    config = SessionConfig()
    assert (config.pool_size, config.max_overflow, config.pool_timeout) == (40, 0, 5)
    assert (config.pool_recycle, config.pool_pre_ping, config.connect_timeout) == (3600, False, 5)
    assert config.prepared_statements == "auto"
    env = {
        "SQLA_SESSIONS_POOL_SIZE": "12",
        "SQLA_SESSIONS_MAX_OVERFLOW": "3",
        "SQLA_SESSIONS_POOL_TIMEOUT": "2.5",
        "SQLA_SESSIONS_POOL_RECYCLE": "-1",
        "SQLA_SESSIONS_POOL_PRE_PING": "yes",
        "SQLA_SESSIONS_CONNECT_TIMEOUT": "3",
        "SQLA_SESSIONS_PREPARED_STATEMENTS": "off",
    }
    loaded = SessionConfig.from_env(env)
    assert (loaded.pool_size, loaded.max_overflow, loaded.pool_timeout, loaded.pool_recycle) == (12, 3, 2.5, -1)
    assert loaded.pool_pre_ping is True and loaded.connect_timeout == 3 and loaded.prepared_statements == "off"


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("pool_size", 0),
        ("max_overflow", -1),
        ("pool_timeout", 0),
        ("connect_timeout", "5"),
        ("pool_recycle", -2),
        ("prepared_statements", "sometimes"),
        ("touch_interval", 7200),
    ],  # fmt: skip
)
def test_invalid_engine_settings_name_the_field(field: str, value: object) -> None:
    with pytest.raises(ConfigurationError, match=field):
        SessionConfig(**{field: value})


def test_engine_options_follow_the_config() -> None:
    config = SessionConfig(pool_size=7, connect_timeout=1.2)
    options = engine_options("postgresql://app@db:5432/app", config)
    assert (options["pool_size"], options["max_overflow"], options["pool_timeout"]) == (7, 0, 5)
    pg_args = options["connect_args"]
    assert pg_args["connect_timeout"] == 2  # libpq wants whole seconds, at least 2
    assert pg_args["client_encoding"] == "utf8" and pg_args["keepalives"] == 1 and pg_args["tcp_user_timeout"] > 0
    behind_pgbouncer = engine_options("postgresql://app@db:6432/app", config)["connect_args"]
    assert behind_pgbouncer["prepare_threshold"] is None  # "auto" turns prepares off on PgBouncer's port
    unix_socket = engine_options("postgresql://app@/app?host=/run/pgbouncer&port=6432", config)["connect_args"]
    assert unix_socket["prepare_threshold"] is None
    forced_on = engine_options("postgresql://app@db:6432/app", config.replace(prepared_statements="on"))
    assert "prepare_threshold" not in forced_on["connect_args"]
    mysql_args = engine_options("mysql+pymysql://root@db/app", config)["connect_args"]
    assert mysql_args["connect_timeout"] == 2 and mysql_args["charset"] == "utf8mb4"
    # connect_timeout + the longest legitimate lock wait (2 x the longer of the block bounds, + 5 s)
    assert mysql_args["read_timeout"] == mysql_args["write_timeout"] == 27
    assert "pool_size" not in engine_options("sqlite://", config)  # one shared in-memory connection


def test_the_handler_builds_its_engine_from_the_config(pg_backend: Backend) -> None:
    handler = DatabaseHandler(pg_backend.url, SessionConfig(pool_size=3, max_overflow=0, pool_timeout=1))
    try:
        pool: Any = handler.engine.pool
        assert pool.size() == 3 and pool.timeout() == 1
        held = [handler.engine.connect() for _ in range(3)]
        started = time.monotonic()
        with pytest.raises(sa.exc.TimeoutError):
            handler.engine.connect()  # no overflow connection is opened (and closed again) under load
        assert time.monotonic() - started < 3
        for conn in held:
            conn.close()
    finally:
        handler.close()


def _drained_pool_handler(backend: Backend) -> tuple[DatabaseHandler, sa.Connection]:
    handler = DatabaseHandler(backend.url, SessionConfig(pool_size=1, pool_timeout=0.5, lottery=(0, 1)))
    session = handler.load(None)
    session["a"] = 1
    session.save()
    return handler, handler.engine.connect()  # the only connection, held: the pool is dry


def _asgi_app(scope: Any, receive: Any, send: Any) -> Any:
    async def app() -> None:
        scope["session"]["b"] = 2
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    return app()


def post_through_asgi(app: Any, handler: DatabaseHandler, headers: dict[str, str] | None = None) -> httpx.Response:
    async def call() -> httpx.Response:
        transport = httpx.ASGITransport(app=AsgiMiddleware(app, handler=handler))
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            return await client.post("/", headers=headers)

    return asyncio.run(call())


def test_a_pool_that_runs_dry_answers_503_with_retry_after(pg_backend: Backend) -> None:
    handler, held = _drained_pool_handler(pg_backend)
    try:
        response = post_through_asgi(_asgi_app, handler)
        assert response.status_code == 503 and response.headers["retry-after"]

        def wsgi_app(environ: Any, start_response: Any) -> list[bytes]:
            environ["sqla_sessions.session"]["b"] = 2
            start_response("200 OK", [("Content-Type", "text/plain")])
            return [b"ok"]

        with httpx.Client(transport=httpx.WSGITransport(app=WsgiMiddleware(wsgi_app, handler=handler))) as client:
            response = client.post("http://test/")
        assert response.status_code == 503 and response.headers["retry-after"]
    finally:
        held.close()
        handler.close()


@pytest.fixture
def silent_server() -> Iterator[int]:
    """A TCP port that accepts connections and never says a word (a database host that hangs)."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(64)
        yield listener.getsockname()[1]


@pytest.mark.parametrize("scheme", ["postgresql+psycopg", "mysql+pymysql"])
def test_a_database_that_never_answers_is_a_503_within_the_connect_timeout(silent_server: int, scheme: str) -> None:
    url = f"{scheme}://app@127.0.0.1:{silent_server}/app"
    config = SessionConfig(connect_timeout=2, block_wait_seconds=2, block_lock_seconds=2, lottery=(0, 1))
    handler = DatabaseHandler(url, config)
    cookie = {"Cookie": "session=" + "a" * 32 + "." + "A" * 40}  # a well-formed cookie: the load must ask the database
    try:
        started = time.monotonic()
        response = post_through_asgi(_asgi_app, handler, headers=cookie)
        assert response.status_code == 503
        assert time.monotonic() - started < 20
    finally:
        handler.close()


def _increments_past_psycopgs_threshold(handler: DatabaseHandler, between: Callable[[], object] = lambda: None) -> str:
    """A session counted to 8 by 8 loads and saves, past psycopg's automatic threshold (5); *between*
    runs after each save. Returns the session's id."""
    session = handler.load(None)
    session["n"] = 0
    session.save()
    assert session.id is not None
    for _ in range(8):
        loaded = handler.load(session.id)
        loaded.increment("n")
        loaded.save()
        between()
    assert handler.load(session.id)["n"] == 8
    return session.id


@pytest.mark.parametrize(("setting", "named"), [("on", True), ("off", False)])
def test_prepared_statements_on_or_off(pg_backend: Backend, setting: str, named: bool) -> None:
    handler = DatabaseHandler(pg_backend.url, SessionConfig(prepared_statements=setting, pool_size=1))
    try:
        _increments_past_psycopgs_threshold(handler)
        with handler.engine.connect() as conn:  # the pool's one connection: the one that ran them
            prepared = conn.exec_driver_sql("SELECT count(*) FROM pg_prepared_statements").scalar_one()
        assert (prepared > 0) is named
    finally:
        handler.close()


def _forget_prepared_statements_behind_psycopgs_back(handler: DatabaseHandler) -> None:
    """What a pooler does to a client connection: the server it reaches next lacks what psycopg prepared."""
    with handler.engine.connect() as conn:  # the pool's one connection
        conn.connection.driver_connection.pgconn.exec_(b"DEALLOCATE ALL")  # type: ignore[union-attr]


def _prepared_by_psycopg(handler: DatabaseHandler) -> None:
    """Run one statement through SQLAlchemy past psycopg's threshold (5): it is prepared as `_pg3_0`."""
    for n in range(7):
        handler.destroy(f"no-such-key-{n}")


def test_prepared_statements_on_raises_the_servers_refusal(pg_backend: Backend) -> None:
    handler = DatabaseHandler(pg_backend.url, SessionConfig(prepared_statements="on", pool_size=1))
    try:
        _prepared_by_psycopg(handler)
        _forget_prepared_statements_behind_psycopgs_back(handler)
        with pytest.raises(sa.exc.ProgrammingError, match="does not exist"):
            handler.destroy("no-such-key")
    finally:
        handler.close()


def _share_the_server_session_with_another_client(handler: DatabaseHandler) -> None:
    """What a pooler in transaction mode does: the server session this client reaches holds what
    another client prepared there, under the names psycopg gives (`_pg3_0`, …), which this
    connection does not know it has."""
    with handler.engine.connect() as conn:  # the pool's one connection
        conn.exec_driver_sql("DEALLOCATE ALL")  # psycopg forgets what it prepared (and the server)
        for n in range(40):  # and the other client's, under psycopg's names, arrive
            conn.exec_driver_sql(f"PREPARE _pg3_{n} AS SELECT {n}")


def test_auto_lets_psycopg_prepare_only_the_hot_statements(pg_backend: Backend) -> None:
    """psycopg's names (`_pg3_0`, …) are per client connection: behind a pooler, one client's name can
    reach another's statement. Under "auto" psycopg prepares only what the library asks it to (the
    hot statements), never the application's statements by counting their runs."""
    from sqla_sessions.store.handlers.engines import ONLY_WHEN_ASKED

    handler = DatabaseHandler(pg_backend.url, SessionConfig(pool_size=1))
    try:  # with a statement through SQLAlchemy beside each save: never prepared
        _increments_past_psycopgs_threshold(handler, between=lambda: handler.destroy("no-such-key"))
        with handler.engine.connect() as conn:
            assert conn.connection.driver_connection.prepare_threshold == ONLY_WHEN_ASKED  # type: ignore[union-attr]
            prepared = conn.exec_driver_sql("SELECT statement FROM pg_prepared_statements").scalars().all()
        assert prepared and not any(statement.startswith("DELETE") for statement in prepared), prepared
        assert any(statement.startswith("SELECT") for statement in prepared), prepared
    finally:
        handler.close()


def test_auto_turns_prepared_statements_off_at_the_first_refusal_and_runs_the_statement_again(
    pg_backend: Backend, caplog: pytest.LogCaptureFixture
) -> None:
    handler = DatabaseHandler(pg_backend.url, SessionConfig(pool_size=1))
    try:
        session = handler.load(None)
        session["n"] = 1
        session.save()
        assert handler.load(session.id)["n"] == 1  # the read is prepared on this connection
        _share_the_server_session_with_another_client(handler)
        with caplog.at_level(logging.WARNING, logger="sqla_sessions"):
            assert handler.load(session.id)["n"] == 1  # refused ("already exists"), then run unnamed
            for _ in range(10):
                assert handler.load(session.id)["n"] == 1
        assert [r.getMessage().count('prepared_statements="off"') for r in caplog.records] == [1]
        assert "SQLA_SESSIONS_PREPARED_STATEMENTS=off" in caplog.text
        handler.engine.dispose()  # a new connection: unprepared from the start
        assert handler.load(session.id)["n"] == 1
        with handler.engine.connect() as conn:
            named = conn.exec_driver_sql("SELECT count(*) FROM pg_prepared_statements WHERE NOT from_sql")
            assert named.scalar_one() == 0
    finally:
        handler.close()


def test_auto_on_the_async_engine_prepares_nothing(pg_backend: Backend) -> None:
    """`async_engine="auto"` has its own pool; its statements go through psycopg, which never prepares
    under "auto": nothing a pooler could refuse or confuse."""
    from sqla_sessions.store.aio import AsyncSessionStore

    handler = DatabaseHandler(pg_backend.url, SessionConfig(pool_size=1))
    store = AsyncSessionStore(handler, async_engine="auto")
    assert store.mode == "async-engine"

    async def run() -> int:
        try:
            for n in range(7):
                assert await store.run_on_connection(handler._delete, f"no-such-key-{n}") is False
            assert store._engine is not None
            async with store._engine.connect() as conn:
                return int((await conn.exec_driver_sql("SELECT count(*) FROM pg_prepared_statements")).scalar_one())
        finally:
            await store.aclose()

    try:
        assert asyncio.run(run()) == 0
    finally:
        handler.close()


def test_a_blocking_requests_transaction_carries_no_named_statement_under_auto(
    pg_backend: Backend, caplog: pytest.LogCaptureFixture
) -> None:
    """A refusal inside it would abort the transaction holding the row lock, beyond retrying: so its
    statements go unnamed, and what a pooler drops meanwhile refuses nothing."""
    handler = DatabaseHandler(pg_backend.url, SessionConfig(pool_size=1))
    try:
        session = handler.load(None)
        session["n"] = 0
        session.save()
        sid = session.id or ""
        with caplog.at_level(logging.WARNING, logger="sqla_sessions"):
            for _ in range(7):  # BEGIN, the lock, the save and COMMIT: past psycopg's threshold
                held = BlockingSession.open(handler, sid)
                held.session.increment("n")
                held._conn.connection.driver_connection.pgconn.exec_(b"DEALLOCATE ALL")  # inside its transaction
                held.finish()
        assert handler.load(sid)["n"] == 7
        assert 'prepared_statements="off"' not in caplog.text  # nothing was refused
    finally:
        handler.close()


def test_a_caller_pool_class_takes_no_sizing(pg_backend: Backend) -> None:
    engine = create_session_engine(pg_backend.url, config=SessionConfig(), poolclass=sa.pool.NullPool)
    with engine.connect() as conn:
        assert conn.execute(sa.select(sa.literal(1))).scalar_one() == 1
    engine.dispose()


def test_a_non_ascii_user_agent_saves_whatever_the_database_encoding(pg_backend: Backend) -> None:
    """A database whose default client encoding cannot hold the user agent: text still travels as UTF-8."""
    admin = sa.create_engine(pg_backend.url, isolation_level="AUTOCOMMIT", poolclass=sa.pool.NullPool)
    name = f"{make_url(pg_backend.url).database}_win1251"
    with admin.connect() as conn:
        conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}"')
        conn.exec_driver_sql(
            f"CREATE DATABASE \"{name}\" ENCODING 'UTF8' LC_COLLATE 'C' LC_CTYPE 'C' TEMPLATE template0"
        )
        conn.exec_driver_sql(f"ALTER DATABASE \"{name}\" SET client_encoding = 'WIN1251'")
    url = make_url(pg_backend.url).set(database=name).render_as_string(hide_password=False)
    try:
        upgrade(url)
        handler = DatabaseHandler(url, SessionConfig())
        session = handler.load(None)
        session.user_agent = "Mozilla/5.0 (Linux) 微信 MicroMessenger"
        session.login("ünïcødé")
        session.save()
        assert handler.list_sessions("ünïcødé")[0].user_agent == "Mozilla/5.0 (Linux) 微信 MicroMessenger"
        handler.close()
    finally:
        with admin.connect() as conn:
            conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.dispose()


def test_an_unreachable_store_during_the_apps_own_save_is_a_503(pg_backend: Backend) -> None:
    handler, held = _drained_pool_handler(pg_backend)
    session_id = handler.load(None)
    try:

        async def app(scope: Any, receive: Any, send: Any) -> None:
            scope["session"]["x"] = 1
            await scope["session"].asave(end_of_request=False)  # the pool is dry: StoreUnavailable
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b"ok"})

        response = post_through_asgi(app, handler)
        assert response.status_code == 503 and response.headers["retry-after"]

        flask = pytest.importorskip("flask")
        from sqla_sessions.flask import init_app

        flask_app = flask.Flask(__name__)

        @flask_app.before_request
        def login_required() -> Any:  # registered before init_app: must not hide the 503
            return flask.redirect("/login") if "user" not in flask.session else None

        init_app(flask_app, handler=handler)

        @flask_app.post("/")
        def view() -> str:
            flask.session.save(end_of_request=False)
            return "ok"

        client = flask_app.test_client()
        client.set_cookie("session", "a" * 32 + "." + "A" * 40)
        assert client.post("/").status_code == 503  # the load found the store unreachable
        assert session_id.is_new
    finally:
        held.close()
        handler.close()


def test_payloads_never_reach_error_messages_from_engines_we_create(pg_backend: Backend) -> None:
    handler = DatabaseHandler(pg_backend.url, SessionConfig())
    try:
        session = handler.load(None)
        session["card"] = "4111 1111 1111 1111"
        session.user_agent = "Bot\x00"  # a value the server refuses: the statement fails
        with pytest.raises(sa.exc.DBAPIError) as failed:
            handler.save(session)
        assert "4111" not in str(failed.value) and "hidden" in str(failed.value).lower()
    finally:
        handler.close()
