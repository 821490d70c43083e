"""Flask-Login's `login_user()` / `logout_user()` are our `login()` / `logout()`, with no extra call."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import flask
import flask_login
import pytest

from sqla_sessions import DatabaseHandler, SessionConfig
from sqla_sessions.flask import init_app
from tests.conftest import Backend
from tests.web.served_app import ServedApp, cookie_of, sent, serve_app


class User(flask_login.UserMixin):
    def __init__(self, user_id: str) -> None:
        self.id = user_id


def _app(db_backend: Backend) -> tuple[flask.Flask, DatabaseHandler]:
    app = flask.Flask(__name__)
    app.secret_key = "not used by sqla_sessions"
    handler = DatabaseHandler(db_backend.engine, SessionConfig(lottery=(0, 1)))
    init_app(app, handler=handler)
    manager = flask_login.LoginManager(app)
    manager.user_loader(User)

    @app.post("/cart/<item>")
    def add(item: str) -> dict[str, Any]:
        flask.session.setdefault("cart", []).append(item)
        return {"cart": flask.session["cart"]}

    @app.post("/login/<name>")
    def login(name: str) -> dict[str, Any]:
        flask_login.login_user(User(name), remember=True)
        return {"user": flask_login.current_user.get_id()}

    @app.post("/logout")
    def logout() -> str:
        flask_login.logout_user()
        return "bye"

    @app.get("/me")
    @flask_login.login_required
    def me() -> dict[str, Any]:
        return {"user": flask_login.current_user.get_id(), "cart": flask.session.get("cart", [])}

    return app, handler


def _cookie(response: Any) -> str:
    (header,) = [h for h in response.headers.getlist("Set-Cookie") if h.startswith("session=")]
    return str(header.split(";", 1)[0].split("=", 1)[1])


def test_login_user_regenerates_sets_the_user_and_logout_user_invalidates(db_backend: Backend) -> None:
    app, handler = _app(db_backend)
    client = app.test_client()
    first = _cookie(client.post("/cart/apple"))
    login = client.post("/login/ada")
    assert login.json == {"user": "ada"}
    after = _cookie(login)
    assert after != first and handler.load(first).is_new  # a new id: the planted/old one is dead
    assert client.get("/me").json == {"user": "ada", "cart": ["apple"]}  # Flask-Login's keys came along
    assert [device.key for device in handler.list_sessions("ada")] == [handler.load(after).key]
    remembered = handler.config.remember_lifetime * 60  # login_user(remember=True): a long-lived session
    assert handler.load(after).lifetime == (remembered, None) and any(
        h.startswith("session=") and "Max-Age=2592000" in h for h in login.headers.getlist("Set-Cookie")
    )

    other = client.post("/login/bob")  # another user on the same browser: an empty session, bob's
    assert other.json == {"user": "bob"}
    assert client.get("/me").json == {"user": "bob", "cart": []}
    assert handler.list_sessions("ada") == [] and len(handler.list_sessions("bob")) == 1

    assert client.post("/logout").text == "bye"
    assert handler.list_sessions("bob") == []
    assert client.get("/me").status_code == 401


@pytest.fixture(scope="module", params=("sqlite", "postgresql"))
def served(request: pytest.FixtureRequest, tmp_root: Path) -> Iterator[ServedApp]:
    command = [
        sys.executable, "-m", "gunicorn", "--workers", "2", "--worker-class", "gthread", "--threads", "8",
        "--bind", "127.0.0.1:{port}", "--log-level", "warning", "tests.web.flask_login_apps:flask_login_app()",
    ]  # fmt: skip
    with serve_app("flask-login", str(request.param), tmp_root, command) as app:
        yield app


def test_under_gunicorn_fifty_writes_are_kept_login_rotates_logout_invalidates(served: ServedApp) -> None:
    served.empty()
    with served.client() as client:
        cookie = cookie_of(client.post("/push/seed"))
    assert cookie is not None
    assert served.fire(cookie, [f"/push/i{n}" for n in range(50)]) == [200] * 50
    assert len(served.read(cookie)["items"]) == 51  # type: ignore[arg-type]
    with served.client() as client:
        login = client.post("/login/ada?remember=1", headers=sent(cookie))
        rotated = cookie_of(login)
    assert rotated is not None and rotated != cookie
    assert served.read(cookie)["user"] is None  # the id from before the login is dead
    after = served.read(rotated)
    assert after["user"] == "ada" and len(after["items"]) == 51  # type: ignore[arg-type]
    assert after["devices"] == [rotated.split(".")[0]]
    with served.client() as client:
        assert client.post("/logout", headers=sent(rotated)).text == "bye"
    assert served.read(rotated) == {"user": None, "items": [], "devices": []}
    assert served.rows() == 0


def test_remember_me_is_our_remembered_session_and_a_revocation_ends_it(db_backend: Backend) -> None:
    app, handler = _app(db_backend)
    client = app.test_client()
    login = client.post("/login/ada")  # login_user(remember=True)
    assert not any(h.startswith("remember_token=") for h in login.headers.getlist("Set-Cookie"))
    assert client.get("/me").status_code == 200
    assert handler.revoke_user("ada") == 1
    assert client.get("/me").status_code == 401  # no stateless token logs the user back in


def test_a_remember_token_from_before_logs_in_once_into_a_rotated_remembered_session(db_backend: Backend) -> None:
    app, handler = _app(db_backend)
    client = app.test_client()
    planted = _cookie(client.post("/cart/bait"))  # an anonymous session id an attacker could plant
    with app.test_request_context():
        token = flask_login.utils.encode_cookie("ada")  # a remember_token Flask-Login issued earlier
    client.set_cookie("remember_token", token)
    me = client.get("/me")
    assert me.json == {"user": "ada", "cart": ["bait"]}
    rotated = _cookie(me)
    assert rotated != planted and handler.load(planted).is_new  # a change of privilege: the planted id is dead
    assert any(h.startswith("remember_token=;") for h in me.headers.getlist("Set-Cookie"))  # converted
    (device,) = handler.list_sessions("ada")
    assert device.key == handler.load(rotated).key and handler.load(rotated).lifetime[0] is not None


def test_refreshing_remember_cookies_is_turned_off_and_duration_is_the_lifetime(db_backend: Backend) -> None:
    app, handler = _app(db_backend)
    app.config["REMEMBER_COOKIE_REFRESH_EACH_REQUEST"] = True  # set after init_app: still turned off

    @app.post("/short/<name>")
    def short(name: str) -> str:
        flask_login.login_user(User(name), remember=True, duration=timedelta(hours=1))
        return "ok"

    client = app.test_client()
    login = client.post("/short/ada")
    assert not any(h.startswith("remember_token=") for h in login.headers.getlist("Set-Cookie"))
    assert not any(h.startswith("remember_token=") for h in client.get("/me").headers.getlist("Set-Cookie"))
    assert app.config["REMEMBER_COOKIE_REFRESH_EACH_REQUEST"] is False
    assert handler.load(_cookie(login)).lifetime[0] == 3600  # duration= is the remembered lifetime
    handler.revoke_user("ada")
    assert client.get("/me").status_code == 401
