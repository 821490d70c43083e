"""Over real HTTP: a Quart app on `sqla_sessions.quart.init_app` under hypercorn (Quart's own server),
on PostgreSQL and on a SQLite file. Flask's session idioms keep their meaning, and keep ours:
per-key merges, a new id at login, a deleted row when a logged-in session is cleared."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.web.served_app import ServedApp, serve_app
from tests.web.session_routes import SessionRouteTests

pytest.importorskip("quart")

ROOT = Path(__file__).resolve().parents[2]
DATABASES = ("sqlite", "postgresql")


@pytest.fixture(scope="module", params=DATABASES)
def server(request: pytest.FixtureRequest, tmp_root: Path) -> Iterator[ServedApp]:
    command = [
        sys.executable, "-m", "hypercorn", "--bind", "127.0.0.1:{port}", "--log-level", "warning",
        "tests.web.quart_apps:quart_app()",
    ]  # fmt: skip
    with serve_app("quart", str(request.param), tmp_root, command) as served:
        yield served


@pytest.fixture
def srv(server: ServedApp) -> ServedApp:
    """The module's server, with an empty sessions table."""
    return server.empty()


class TestSessionRoutes(SessionRouteTests):
    """`session.clear()` of a logged-in session is the logout; two idioms append."""

    append_routes = ("push", "append")  # session.push, and Flask's setdefault(...).append
