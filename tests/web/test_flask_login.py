"""Flask-Login's `login_user()` / `logout_user()` are our `login()` / `logout()`, with no extra call."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import flask
import flask_login
import pytest
import sqlalchemy as sa

from sqla_sessions import DatabaseHandler, SessionConfig
from sqla_sessions.flask import init_app
from sqla_sessions.store.locking import blocking
from sqla_sessions.store.schema import sessions_table
from tests.conftest import Backend
from tests.web.flask_login_apps import LEGACY_REMEMBER_UNTIL, SECRET_KEY, flask_login_app
from tests.web.served_app import ServedApp, cookie_of, sent, serve_app


class User(flask_login.UserMixin):
    def __init__(self, user_id: str) -> None:
        self.id = user_id


def _app(db_backend: Backend, config: SessionConfig | None = None) -> tuple[flask.Flask, DatabaseHandler]:
    app = flask.Flask(__name__)
    app.secret_key = "not used by sqla_sessions"
    handler = DatabaseHandler(db_backend.engine, config or SessionConfig(lottery=(0, 1)))
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


def test_a_remember_token_from_before_is_refused_by_default(
    db_backend: Backend, caplog: pytest.LogCaptureFixture
) -> None:
    app, handler = _app(db_backend)
    client = app.test_client()
    with app.test_request_context():
        token = flask_login.utils.encode_cookie("ada")  # a remember_token Flask-Login issued earlier
    client.set_cookie("remember_token", token)
    me = client.get("/me")
    assert me.status_code == 401  # nobody logged in by it
    assert any(h.startswith("remember_token=;") for h in me.headers.getlist("Set-Cookie"))  # deleted
    assert [r.getMessage() for r in caplog.records if "remember_token" in r.getMessage()] == [
        "Flask-Login remember_token cookie refused (legacy_remember_until is not set): deleted, nobody logged in by it"
    ]
    assert handler.list_sessions("ada") == [] and _rows(handler) == 0


def test_a_remember_token_from_before_logs_in_once_into_a_rotated_remembered_session(db_backend: Backend) -> None:
    app, handler = _app(db_backend, SessionConfig(lottery=(0, 1), legacy_remember_until="2100-01-01"))
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


def test_the_marker_refusing_old_tokens_is_no_device_and_goes_with_the_window(db_backend: Backend) -> None:
    now = [1_000_000.0]
    config = SessionConfig(lottery=(0, 1), legacy_remember_until=datetime.fromtimestamp(1_000_100, UTC))
    handler = DatabaseHandler(db_backend.engine, config, clock=lambda: now[0])
    assert not handler.legacy_tokens_refused("ada")
    assert handler.revoke_user("ada") == 0 and handler.revoke_user("ada") == 0  # twice: one marker
    assert handler.legacy_tokens_refused("ada") and not handler.legacy_tokens_refused("bob")
    assert handler.list_sessions("ada") == [] and handler.list_sessions("") == [] and _rows(handler) == 1
    assert handler.gc() == 0
    now[0] = 1_000_100.0  # the window closed: the marker is garbage
    assert handler.gc() == 1 and _rows(handler) == 0


def _rows(handler: DatabaseHandler) -> int:
    with handler.engine.connect() as conn:
        return int(conn.execute(sa.select(sa.func.count()).select_from(sessions_table())).scalar_one())


def test_permanent_is_false_by_default_true_when_remembered_and_kept_when_set(db_backend: Backend) -> None:
    app, handler = _app(db_backend, SessionConfig(lottery=(0, 1), expire_on_close=True))

    @app.get("/permanent")
    def permanent() -> dict[str, Any]:
        return {"permanent": flask.session.permanent}

    @app.post("/permanent")
    def make_permanent() -> str:
        flask.session.permanent = True
        return "ok"

    @app.post("/plain/<name>")
    def plain(name: str) -> str:
        flask_login.login_user(User(name))
        return "ok"

    client = app.test_client()
    assert client.get("/permanent").json == {"permanent": False}
    assert client.post("/permanent").headers.get("Set-Cookie") is None  # the flag alone stores no row
    added = client.post("/cart/apple")
    assert "Max-Age" not in added.headers["Set-Cookie"]  # expire_on_close: a browser-session cookie
    assert client.get("/permanent").json == {"permanent": False}
    made = client.post("/permanent")
    assert "Max-Age=" in made.headers["Set-Cookie"]  # now it outlives the browser
    assert client.get("/permanent").json == {"permanent": True}  # stored with the session
    assert handler.load(_cookie(made))["_permanent"] is True  # where Flask keeps it

    other = app.test_client()
    assert "Max-Age" not in other.post("/plain/bob").headers["Set-Cookie"]
    assert other.get("/permanent").json == {"permanent": False}
    login = other.post("/login/ada")  # login_user(remember=True)
    assert "Max-Age=" in login.headers["Set-Cookie"]
    assert other.get("/permanent").json == {"permanent": True}


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


MALLORY = {"User-Agent": "Mallory/1.0"}


def test_strong_protection_logs_out_a_cookie_replayed_from_another_agent_unless_permanent(served: ServedApp) -> None:
    served.empty()
    # Control: Flask's own cookie sessions (SESSION_PROTECTION = "strong", the same app).
    control = flask_login_app(server_side=False).test_client()
    control.post("/login/ada")
    assert control.get("/whoami", headers=MALLORY).json == {"user": None, "fresh": None, "permanent": False}
    control.post("/login/ada")
    control.post("/permanent")
    assert control.get("/whoami", headers=MALLORY).json == {"user": "ada", "fresh": False, "permanent": True}

    with served.client() as client:
        plain = cookie_of(client.post("/login/ada"))
        assert client.get("/whoami", headers=sent(plain)).json() == {"user": "ada", "fresh": True, "permanent": False}
        stolen = client.get("/whoami", headers={**sent(plain), **MALLORY})
        assert stolen.json() == {"user": None, "fresh": None, "permanent": False}  # logged out, as Flask does
        assert client.get("/whoami", headers=sent(plain)).json()["user"] is None  # the row is gone (server-side)

        remembered = cookie_of(client.post("/login/ada?remember=1"))
        assert client.get("/whoami", headers=sent(remembered)).json()["permanent"] is True
        stolen = client.get("/whoami", headers={**sent(remembered), **MALLORY})
        assert stolen.json() == {"user": "ada", "fresh": False, "permanent": True}  # only marked not fresh

        made = cookie_of(client.post("/login/bob"))
        assert client.post("/permanent", headers=sent(made)).text == "ok"
        stolen = client.get("/whoami", headers={**sent(made), **MALLORY})
        assert stolen.json() == {"user": "bob", "fresh": False, "permanent": True}  # kept across requests


def test_a_replayed_remember_token_logs_in_nobody_after_revoke_user(served: ServedApp) -> None:
    served.empty()
    with flask_login_app(server_side=False).test_request_context():
        assert flask.current_app.secret_key == SECRET_KEY
        token = flask_login.utils.encode_cookie("ada")  # issued by Flask-Login before the switch
    replay = {"Cookie": f"remember_token={token}"}
    with served.client() as client:
        first = client.get("/read", headers=replay)  # inside legacy_remember_until: accepted once
        assert first.json()["user"] == "ada" and cookie_of(first) is not None
        handler = DatabaseHandler(served.engine, SessionConfig(legacy_remember_until=LEGACY_REMEMBER_UNTIL))
        assert handler.revoke_user("ada") == 1
        for _ in range(2):
            again = client.get("/read", headers=replay)
            assert again.json() == {"user": None, "items": [], "devices": []}  # the marker is no device
            assert cookie_of(again) is None
            assert any(h.startswith("remember_token=;") for h in again.headers.get_list("set-cookie"))
    assert served.rows() == 1  # the marker, gone with the window


@pytest.mark.parametrize("window", [False, True])
def test_a_hostile_remember_token_on_a_blocking_route_leaves_nothing_held(db_backend: Backend, window: bool) -> None:
    """A cookie Flask-Login cannot decode (non-ASCII) on a blocking route, many times from one
    address: each request is answered, and no lock, connection or share of the pool stays taken."""
    until = {"legacy_remember_until": datetime.now(UTC) + timedelta(days=1)} if window else {}
    app, handler = _app(db_backend, SessionConfig(lottery=(0, 1), **until))

    @app.post("/pay")
    @blocking
    def pay() -> str:
        flask.session["paid"] = True
        return "paid"

    client = app.test_client()
    cookie = _cookie(client.post("/cart/apple"))
    for _ in range(handler.share.per_address + 5):
        client.set_cookie("session", cookie)
        client.set_cookie("remember_token", "1|\u00e9")
        assert client.post("/pay", environ_base={"REMOTE_ADDR": "10.9.9.9"}).status_code < 500
    assert handler.share.held(address="10.9.9.9") == 0
    assert handler.share.held(session_key=cookie.split(".")[0]) == 0
    client.delete_cookie("remember_token")
    client.set_cookie("session", cookie)
    assert client.post("/pay", environ_base={"REMOTE_ADDR": "10.9.9.9"}).status_code == 200
