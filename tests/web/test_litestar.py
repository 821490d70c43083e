"""Over real HTTP: a Litestar app on `SqlaSessionsPlugin` under uvicorn, on PostgreSQL and on a SQLite
file. Litestar's own session calls (`request.session`, `set_session`, `clear_session`) keep their
meaning, and keep ours: per-key merges, a new id at login, a deleted row at logout."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.web.served_app import ServedApp, cookie_of, sent, serve_app
from tests.web.session_routes import SessionRouteTests

pytest.importorskip("litestar")

ROOT = Path(__file__).resolve().parents[2]
DATABASES = ("sqlite", "postgresql")


@pytest.fixture(scope="module", params=DATABASES)
def server(request: pytest.FixtureRequest, tmp_root: Path) -> Iterator[ServedApp]:
    command = [
        sys.executable, "-m", "uvicorn", "tests.web.litestar_apps:litestar_app", "--factory",
        "--host", "127.0.0.1", "--port", "{port}", "--log-level", "warning",
    ]  # fmt: skip
    with serve_app("litestar", str(request.param), tmp_root, command) as served:
        yield served


@pytest.fixture
def srv(server: ServedApp) -> ServedApp:
    """The module's server, with an empty sessions table."""
    return server.empty()


def test_fifty_concurrent_set_session_replacements_merge_per_key(srv: ServedApp) -> None:
    """Each request reads the session, waits, and replaces it with one more item: the replacement is
    a change set against what the request loaded, so the 49 others are merged, not overwritten."""
    with srv.client() as client:
        cookie = cookie_of(client.post("/set/seed"))
    assert srv.fire(cookie, [f"/replace-append/r{n}" for n in range(50)]) == [200] * 50
    data = srv.read(cookie)["data"]
    assert isinstance(data, dict)
    assert sorted(data["items"]) == sorted(f"r{n}" for n in range(50))
    assert data["seed"] is True


def test_clear_session_then_set_session_logs_out_into_a_new_session(srv: ServedApp) -> None:
    with srv.client() as client:
        cookie = cookie_of(client.post("/login/alice"))
        logout = client.post("/logout-with-notice", headers=sent(cookie))
    fresh = cookie_of(logout)
    assert fresh is not None and fresh != cookie
    assert srv.read(cookie) == {"data": {}, "user": None, "key": None}  # the logged-in id is dead
    after = srv.read(fresh)
    assert after["user"] is None and after["data"] == {"notice": "You are logged out"}


def test_set_session_replaces_the_data(srv: ServedApp) -> None:
    with srv.client() as client:
        cookie = cookie_of(client.post("/set/kept"))
        client.post("/set/dropped", headers=sent(cookie))
        key = srv.read(cookie)["key"]
        replaced = client.post("/replace", headers=sent(cookie))
        assert replaced.headers.get_list("set-cookie") == []  # the same session, the same id
        assert srv.read(cookie) == {"data": {"fresh": True, "kept": True}, "user": None, "key": key}

        # A data container is stored as Litestar's own backends store it: as its JSON form.
        client.post("/replace-model", headers=sent(cookie))
        assert srv.read(cookie)["data"] == {"name": "ada", "langs": ["en", "fr"]}

        # get_session() applies a replacement at once, and the Session goes back into the scope.
        assert client.post("/replace-then-read", headers=sent(cookie)).json() == {"data": {"only": 1}}
        assert srv.read(cookie)["data"] == {"only": 1}
    assert srv.rows() == 1


def test_a_request_no_route_matches_makes_no_session(srv: ServedApp) -> None:
    with srv.client() as client:
        cookie_of(client.post("/set/a"))
        assert client.get("/no-such-route").status_code == 404
    assert srv.rows() == 1


class TestSessionRoutes(SessionRouteTests):
    """`clear_session()` is the logout; `get_session(request).push()` the append."""
