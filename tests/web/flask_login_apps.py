"""A Flask-Login app on `sqla_sessions.flask`, served by gunicorn in tests/web/test_flask_login.py."""

from __future__ import annotations

import os
from datetime import UTC, datetime
from typing import Any

import flask
import flask_login

from sqla_sessions import SessionConfig
from sqla_sessions.flask import init_app

SECRET_KEY = "for Flask-Login's remember cookie"
#: Flask-Login remember_token cookies from before the switch are accepted until then.
LEGACY_REMEMBER_UNTIL = datetime(2100, 1, 1, tzinfo=UTC)


class User(flask_login.UserMixin):
    def __init__(self, user_id: str) -> None:
        self.id = user_id


def flask_login_app(server_side: bool = True) -> flask.Flask:
    """*server_side* False: Flask's own cookie sessions, the control the tests compare with."""
    app = flask.Flask(__name__)
    app.secret_key = SECRET_KEY
    app.config["SESSION_PROTECTION"] = "strong"
    if server_side:
        config = SessionConfig(
            database_url=os.environ["SQLA_SESSIONS_DATABASE_URL"],
            lottery=(0, 1),
            legacy_remember_until=LEGACY_REMEMBER_UNTIL,
        )
        init_app(app, config)
    manager = flask_login.LoginManager(app)
    manager.user_loader(User)

    @app.post("/push/<item>")
    def push(item: str) -> dict[str, Any]:
        flask.session.setdefault("items", []).append(item)
        return {"n": len(flask.session["items"])}

    @app.post("/login/<name>")
    def login(name: str) -> dict[str, Any]:
        flask_login.login_user(User(name), remember=flask.request.args.get("remember") == "1")
        return {"user": name}

    @app.post("/permanent")
    def permanent() -> str:
        flask.session.permanent = True
        return "ok"

    @app.post("/logout")
    def logout() -> str:
        flask_login.logout_user()
        return "bye"

    @app.get("/read")
    def read() -> dict[str, Any]:
        user = flask_login.current_user
        handler = app.extensions.get("sqla_sessions")
        return {
            "user": user.get_id() if user.is_authenticated else None,
            "items": flask.session.get("items", []),
            "devices": [d.key for d in handler.list_sessions("ada")] if handler else [],
        }

    @app.get("/whoami")
    def whoami() -> dict[str, Any]:
        user = flask_login.current_user
        return {
            "user": user.get_id() if user.is_authenticated else None,
            "fresh": flask.session.get("_fresh"),
            "permanent": flask.session.permanent,
        }

    return app
