"""A Flask-Login app on `sqla_sessions.flask`, served by gunicorn in tests/web/test_flask_login.py."""

from __future__ import annotations

import os
from typing import Any

import flask
import flask_login

from sqla_sessions import SessionConfig
from sqla_sessions.flask import init_app


class User(flask_login.UserMixin):
    def __init__(self, user_id: str) -> None:
        self.id = user_id


def flask_login_app() -> flask.Flask:
    app = flask.Flask(__name__)
    app.secret_key = "for Flask-Login's remember cookie"
    init_app(app, SessionConfig(database_url=os.environ["SQLA_SESSIONS_DATABASE_URL"], lottery=(0, 1)))
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

    @app.post("/logout")
    def logout() -> str:
        flask_login.logout_user()
        return "bye"

    @app.get("/read")
    def read() -> dict[str, Any]:
        user = flask_login.current_user
        return {
            "user": user.get_id() if user.is_authenticated else None,
            "items": flask.session.get("items", []),
            "devices": [d.key for d in app.extensions["sqla_sessions"].list_sessions("ada")],
        }

    return app
