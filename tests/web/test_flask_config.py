"""`init_app(app)` without a config reads one from the app: Flask's session settings where the app
changed them (what Flask-Session does), below `SQLA_SESSIONS_*` in `app.config` and the environment."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import flask
import pytest

from sqla_sessions import DatabaseHandler, SessionConfig
from sqla_sessions.flask import config_from_app, init_app
from sqla_sessions.store.migrate import upgrade


@pytest.fixture(autouse=True)
def no_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for name in list(os.environ):
        if name.startswith("SQLA_SESSIONS_"):
            monkeypatch.delenv(name)


def test_flasks_defaults_leave_ours() -> None:
    assert config_from_app(flask.Flask(__name__)) == SessionConfig()


def test_the_settings_an_app_changed_become_the_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    app = flask.Flask(__name__)
    app.config.update(
        SESSION_COOKIE_NAME="sid",
        SESSION_COOKIE_DOMAIN="example.com",
        SESSION_COOKIE_SECURE=True,
        SESSION_COOKIE_SAMESITE="Strict",
        SESSION_COOKIE_HTTPONLY=False,
        PERMANENT_SESSION_LIFETIME=timedelta(hours=1, seconds=1),
        APPLICATION_ROOT="/shop",
    )
    config = config_from_app(app)
    assert (config.cookie_name, config.cookie_domain, config.cookie_secure, config.cookie_same_site) == (
        "sid", "example.com", True, "strict"
    )  # fmt: skip
    assert (config.cookie_http_only, config.lifetime, config.cookie_path) == (False, 61, "/shop")
    app.config["SQLA_SESSIONS_COOKIE_NAME"] = "app_wins"
    monkeypatch.setenv("SQLA_SESSIONS_LIFETIME", "5")
    config = config_from_app(app)
    assert (config.cookie_name, config.lifetime) == ("app_wins", 5)  # app.config, then the environment
    app.config["SESSION_COOKIE_DOMAIN"] = False  # Flask's old spelling of "no domain"
    assert config_from_app(app).cookie_domain is None
    app.config["PERMANENT_SESSION_LIFETIME"] = 60  # seconds, as Flask also accepts
    monkeypatch.delenv("SQLA_SESSIONS_LIFETIME")
    assert config_from_app(app).lifetime == 1


def test_init_app_writes_the_cookie_flask_settings_describe(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'sessions.db'}"
    upgrade(url)
    app = flask.Flask(__name__)
    app.config.update(
        SQLA_SESSIONS_DATABASE_URL=url,
        SESSION_COOKIE_NAME="sid",
        SESSION_COOKIE_SAMESITE="Strict",
        PERMANENT_SESSION_LIFETIME=timedelta(minutes=30),
    )
    init_app(app)

    @app.post("/")
    def write() -> str:
        flask.session["x"] = 1
        return "ok"

    header = app.test_client().post("/").headers["Set-Cookie"]
    assert header.startswith("sid=") and "SameSite=Strict" in header and "Max-Age=1800" in header
    handler = app.extensions["sqla_sessions"]
    assert isinstance(handler, DatabaseHandler) and handler.config.database_url == url
    handler.close()


def test_quart_reads_the_same_settings() -> None:
    import quart

    from sqla_sessions.quart import config_from_app as quart_config

    app = quart.Quart(__name__)
    assert quart_config(app) == SessionConfig()
    app.config.update(SESSION_COOKIE_NAME="qsid", PERMANENT_SESSION_LIFETIME=timedelta(minutes=10))
    config = quart_config(app)
    assert (config.cookie_name, config.lifetime) == ("qsid", 10)
