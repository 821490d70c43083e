"""A database that answers but refuses what the config names: one clear line and a 500, not a 503.

A missing table (not migrated), database or role is no outage: no retry helps, so the middlewares
answer 500 without `Retry-After` and log one line saying what to fix; an unreachable server stays a
503. `handler.check()` (or `check_on_startup`) says the same once, at startup.
"""

from __future__ import annotations

import logging
import uuid
from pathlib import Path
from typing import Any

import flask
import pytest
import sqlalchemy as sa

from sqla_sessions import DatabaseHandler, SessionConfig, upgrade
from sqla_sessions.asgi import SessionMiddleware as AsgiMiddleware
from sqla_sessions.errors import StoreMisconfigured, StoreUnavailable, misconfiguration
from sqla_sessions.flask import init_app
from sqla_sessions.wsgi import SessionMiddleware as WsgiMiddleware
from tests.conftest import Backend
from tests.web.test_middleware import asgi_app, call

WELL_FORMED = "a" * 32 + "." + "A" * 40


def _unmigrated(db_backend: Backend) -> DatabaseHandler:
    return DatabaseHandler(db_backend.engine, SessionConfig(table=f"nope_{uuid.uuid4().hex[:8]}"))


def test_a_missing_table_is_one_line_and_a_500_on_every_server_interface(
    db_backend: Backend, caplog: pytest.LogCaptureFixture
) -> None:
    handler = _unmigrated(db_backend)
    table = handler.table.name
    with caplog.at_level(logging.ERROR, logger="sqla_sessions"):
        asgi = call(AsgiMiddleware(asgi_app(lambda s: s.put("a", 1)), handler=handler), cookie=WELL_FORMED)
        asgi_write = call(AsgiMiddleware(asgi_app(lambda s: s.put("a", 1)), handler=handler), "POST")
        captured: list[Any] = []
        WsgiMiddleware(lambda e, sr: [b""], handler=handler)(
            {
                "REQUEST_METHOD": "GET",
                "PATH_INFO": "/",
                "wsgi.url_scheme": "http",
                "HTTP_COOKIE": f"session={WELL_FORMED}",
            },
            lambda status, headers, exc_info=None: captured.extend([status, headers]),
        )
        wsgi_status, wsgi_headers = captured
        app = flask.Flask(__name__)
        init_app(app, handler=handler)
        app.add_url_rule("/", "index", lambda: "ok")
        client = app.test_client()
        client.set_cookie("session", WELL_FORMED)
        flasked = client.get("/")
    assert asgi.status_code == asgi_write.status_code == 500 and "retry-after" not in asgi.headers
    assert wsgi_status.startswith("500") and "Retry-After" not in dict(wsgi_headers)
    assert flasked.status_code == 500 and "Retry-After" not in flasked.headers
    for headers in (asgi.headers, dict(wsgi_headers), flasked.headers):  # one policy, every integration
        assert headers["Cache-Control"] == "no-store" and headers["Content-Type"] == "text/plain; charset=utf-8"
    lines = [r for r in caplog.records if "misconfigured" in r.getMessage()]
    assert len(lines) == 4 and all(r.exc_info is None for r in lines)  # one line each, no traceback
    assert f"table not found: table '{table}' in " in lines[0].getMessage()
    assert "run `sqla-sessions migrate`" in lines[0].getMessage()
    assert not [r for r in caplog.records if "unreachable" in r.getMessage()]


def test_a_refused_role_or_database_is_a_500_and_an_unreachable_server_a_503(pg_backend: Backend) -> None:
    url = sa.make_url(pg_backend.url)
    refused = [
        url.set(username=f"nobody_{uuid.uuid4().hex[:6]}"),
        url.set(database=f"nodb_{uuid.uuid4().hex[:6]}"),
    ]
    for bad in refused:
        handler = DatabaseHandler(bad.render_as_string(hide_password=False), SessionConfig())
        response = call(AsgiMiddleware(asgi_app(lambda s: s.put("a", 1)), handler=handler), cookie=WELL_FORMED)
        assert response.status_code == 500, bad
        with pytest.raises(StoreMisconfigured, match="not found"):
            handler.check()
        handler.close()
    down = DatabaseHandler("postgresql+psycopg://postgres@127.0.0.1:1/x?connect_timeout=2", SessionConfig())
    assert call(AsgiMiddleware(asgi_app(lambda s: s.put("a", 1)), handler=down), cookie=WELL_FORMED).status_code == 503
    with pytest.raises(StoreUnavailable):
        down.check()


def test_the_apps_own_save_on_a_missing_table_raises_store_misconfigured(db_backend: Backend) -> None:
    handler = _unmigrated(db_backend)
    session = handler.load(None)
    session["a"] = 1
    with pytest.raises(StoreMisconfigured, match="table not found"):
        session.save()


def test_check_passes_on_a_migrated_table_and_names_what_to_fix_otherwise(db_backend: Backend) -> None:
    DatabaseHandler(db_backend.engine, SessionConfig()).check()
    handler = _unmigrated(db_backend)
    with pytest.raises(StoreMisconfigured, match=r"table 'nope_\w+' in .* not found: run `sqla-sessions migrate`"):
        handler.check()
    old = f"old_{uuid.uuid4().hex[:8]}"
    upgrade(db_backend.engine, table=old, revision="sqla_sessions_0001")  # before the lease columns
    with pytest.raises(
        StoreMisconfigured,
        match=r"lacks columns \['absolute_lifetime', 'idle_lifetime', 'lease_owner', 'lease_until', "
        r"'previous_id_hash'\]",
    ):
        DatabaseHandler(db_backend.engine, SessionConfig(table=old)).check()


def test_check_on_startup_stops_the_middleware_at_construction(tmp_path: Path) -> None:
    config = SessionConfig(database_url=f"sqlite:///{tmp_path / 'empty.db'}", check_on_startup=True)
    with pytest.raises(StoreMisconfigured, match="run `sqla-sessions migrate`"):
        WsgiMiddleware(lambda e, sr: [b""], config=config)
    upgrade(config.database_url)
    WsgiMiddleware(lambda e, sr: [b""], config=config)  # migrated: starts


def test_the_embedded_sqlite_default_is_named_in_a_warning(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.chdir(tmp_path)
    with caplog.at_level(logging.WARNING, logger="sqla_sessions"):
        DatabaseHandler(None, SessionConfig()).close()
    assert "no database configured: sessions are stored in sqlite:///sessions.db" in caplog.text
    assert str(tmp_path) in caplog.text


@pytest.mark.parametrize(
    ("orig", "expected"),
    [
        (type("E", (Exception,), {"sqlstate": "57P01"})("terminating connection"), None),
        (type("E", (Exception,), {"sqlstate": None})("server closed the connection unexpectedly"), None),
        (Exception(2013, "Lost connection to server during query"), None),
        (Exception(1146, "Table 'test.x' doesn't exist"), "table not found"),
        (Exception("no such table: sessions"), "table not found"),
    ],
)
def test_only_refusals_count_as_misconfiguration(orig: Any, expected: str | None) -> None:
    assert misconfiguration(sa.exc.OperationalError("SELECT 1", {}, orig)) == expected


def test_check_names_a_missing_grant(pg_backend: Backend) -> None:
    role = f"reader_{uuid.uuid4().hex[:8]}"
    admin = pg_backend.engine.execution_options(isolation_level="AUTOCOMMIT")
    database = sa.make_url(pg_backend.url).database
    with admin.connect() as conn:
        conn.exec_driver_sql(f"CREATE ROLE {role} LOGIN")
        conn.exec_driver_sql(f'GRANT CONNECT ON DATABASE "{database}" TO {role}')
    url = sa.make_url(pg_backend.url).set(username=role).render_as_string(hide_password=False)
    handler = DatabaseHandler(url, SessionConfig())
    try:
        with pytest.raises(StoreMisconfigured, match="permission denied"):
            handler.check()  # no grant on the table at all
        with admin.connect() as conn:
            conn.exec_driver_sql(f"GRANT SELECT ON sessions TO {role}")
        with pytest.raises(StoreMisconfigured, match="may not insert, update and delete"):
            handler.check()  # reads, but every save would fail
        with admin.connect() as conn:
            conn.exec_driver_sql(f"GRANT INSERT, UPDATE, DELETE ON sessions TO {role}")
        handler.check()
    finally:
        handler.close()
        with admin.connect() as conn:
            conn.exec_driver_sql(f"DROP OWNED BY {role}")
            conn.exec_driver_sql(f"DROP ROLE {role}")
