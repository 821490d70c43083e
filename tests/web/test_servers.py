"""Over real HTTP: Starlette and FastAPI under uvicorn, Flask and a bare WSGI app under gunicorn
(threads), each on PostgreSQL and on a SQLite file."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import httpx
import pytest

from tests.conftest import backend_for
from tests.web.served_app import ServedApp, cookie_of, free_port, sent, wait_until_up

__all__ = ["cookie_of", "free_port", "sent", "wait_until_up"]  # imported from here by other tests

ROOT = Path(__file__).resolve().parents[2]
FRAMEWORKS = {
    "starlette": "uvicorn",
    "fastapi": "uvicorn",
    "flask": "gunicorn",
    "wsgi": "gunicorn",
}
DATABASES = ("sqlite", "postgresql")


@dataclass
class Server(ServedApp):
    framework: str
    process: subprocess.Popen[bytes]

    def statements(self, client: httpx.Client) -> int:
        return int(client.get("/stats").json()["statements"])

    def hot_statements(self, client: httpx.Client) -> int:
        """Of `statements`, those sent on the path production runs (`handlers.runner`)."""
        return int(client.get("/stats").json()["hot"])


def start_server(
    framework: str, url: str, port: int, log: BinaryIO, *, module: str = "tests.web.apps"
) -> subprocess.Popen[bytes]:
    if framework in ("starlette", "fastapi"):
        command = [
            sys.executable, "-m", "uvicorn", f"{module}:{framework}_app", "--factory",
            "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning",
        ]  # fmt: skip
    else:
        command = [
            sys.executable, "-m", "gunicorn", "--workers", "1", "--worker-class", "gthread", "--threads", "16",
            "--bind", f"127.0.0.1:{port}", "--log-level", "warning", "--limit-request-field_size", "32768",
            f"{module}:{framework}_app()",
        ]  # fmt: skip
    env = {**os.environ, "SQLA_SESSIONS_DATABASE_URL": url, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)


@pytest.fixture(scope="module", params=[(f, d) for f in FRAMEWORKS for d in DATABASES], ids=lambda p: f"{p[0]}-{p[1]}")
def server(request: pytest.FixtureRequest, tmp_root: Path) -> Iterator[Server]:
    framework, database = request.param
    backend = backend_for(database, tmp_root)
    port = free_port()
    log = tmp_root / f"{framework}-{database}.log"
    with log.open("wb") as log_file:
        process = start_server(framework, backend.url, port, log_file)
        try:
            wait_until_up(process, port, log)
            yield Server(database, f"http://127.0.0.1:{port}", backend.engine, framework=framework, process=process)
        finally:
            process.terminate()
            process.wait(10)


@pytest.fixture
def srv(server: Server) -> Server:
    """The module's server, with an empty sessions table."""
    with server.engine.begin() as conn:
        conn.exec_driver_sql("DELETE FROM sessions")
    return server


def test_fifty_concurrent_requests_of_one_session_lose_nothing(srv: Server) -> None:
    with srv.client() as client:
        first = client.post("/set/seed")
        cookie = cookie_of(first)
        assert cookie

    async def fire() -> list[int]:
        async with httpx.AsyncClient(base_url=srv.base_url, timeout=60, headers=sent(cookie)) as client:
            responses = await asyncio.gather(*(client.post(f"/set/k{n}") for n in range(50)))
        return [r.status_code for r in responses]

    assert asyncio.run(fire()) == [200] * 50
    with srv.client() as client:
        data = client.get("/read", headers=sent(cookie)).json()["data"]
    assert data == {"seed": True, **{f"k{n}": True for n in range(50)}}


def test_a_read_only_request_is_one_statement_and_sends_no_cookie(srv: Server) -> None:
    with srv.client() as client:
        cookie = cookie_of(client.post("/set/a"))
        assert cookie
        client.post("/stats")
        response = client.get("/read", headers=sent(cookie))
        assert response.json()["data"] == {"a": True}
        assert response.headers.get_list("set-cookie") == []
        assert "Cookie" in response.headers.get("vary", "")
        assert srv.statements(client) == 1
        assert srv.hot_statements(client) == 1  # the production path, whatever listens to the engine


def test_a_request_that_writes_nothing_creates_no_row_and_no_cookie(srv: Server) -> None:
    with srv.client() as client:
        client.post("/stats")
        for path in ("/read", "/untouched", "/page"):
            response = client.get(path)
            assert response.status_code == 200
            assert response.headers.get_list("set-cookie") == []
        assert srv.statements(client) == 0
    assert srv.rows() == 0


@pytest.mark.parametrize(
    "cookie_header",
    [
        "session=garbage",
        "session=" + "A" * 8192,
        "session=" + "a" * 32 + "." + "A" * 40,  # well-formed, unknown
        "session=" + "a" * 32 + "." + "A" * 40 + "; session=" + "b" * 32 + "." + "B" * 40,  # duplicated
        "session=%00%0d%0a; other=1",
        "=;;;session",
        'session="' + "c" * 32 + "." + "C" * 40 + '"',
    ],
    ids=["malformed", "oversized-8k", "unknown", "duplicated", "control-chars", "broken-syntax", "quoted"],
)
def test_bad_cookies_get_a_fresh_session_and_a_200(srv: Server, cookie_header: str) -> None:
    with srv.client() as client:
        response = client.get("/read", headers={"Cookie": cookie_header})
        assert response.status_code == 200
        assert response.json()["data"] == {}
        written = client.post("/set/x", headers={"Cookie": cookie_header})
        assert written.status_code == 200
        fresh = cookie_of(written)
        assert fresh and fresh not in cookie_header  # a planted id is never adopted


def test_a_duplicated_cookie_uses_the_live_one_when_it_comes_first(srv: Server) -> None:
    with srv.client() as client:
        cookie = cookie_of(client.post("/set/mine"))
        response = client.get("/read", headers={"Cookie": f"session={cookie}; session={'B' * 40}"})
        assert response.json()["data"] == {"mine": True}


def test_a_cookie_tossed_from_a_sibling_domain_neither_hides_nor_deletes_the_real_one(srv: Server) -> None:
    """A subdomain can plant `session=…` for the parent domain; the browser then sends both, the
    planted one first (longer Path) or not. The real session is found whichever comes first, and no
    response deletes a cookie while several were sent (the deletion would hit the real one). A
    planted cookie naming a live session of the attacker's cannot be told from the real one: only the
    `__Host-` prefix keeps it out (SECURITY.md)."""
    with srv.client() as client:
        real = cookie_of(client.post("/set/mine"))
    planted = ["a" * 32 + "." + "A" * 40, real.split(".")[0] + "." + "B" * 40, "garbage"]
    for tossed in planted:
        for header in (f"session={tossed}; session={real}", f"session={real}; session={tossed}"):
            with srv.client() as client:
                read = client.get("/read", headers={"Cookie": header})
                assert read.json()["data"].get("mine") is True, header
                written = client.post("/set/more", headers={"Cookie": header})
                assert written.status_code == 200 and written.headers.get_list("set-cookie") == []
                logout = client.post("/logout", headers={"Cookie": f"session={tossed}; session=x"})
                assert all("Max-Age=0" not in value for value in logout.headers.get_list("set-cookie"))
    with srv.client() as client:
        assert client.get("/read", headers=sent(real)).json()["data"] == {"mine": True, "more": True}


def test_session_content_cannot_inject_headers(srv: Server) -> None:
    with srv.client() as client:
        response = client.post("/inject")
        assert response.status_code == 200
        assert "x-injected" not in response.headers
        assert all("pwned" not in value for value in response.headers.get_list("set-cookie"))
        read = client.get("/read", headers=sent(cookie_of(response)))
        assert "x-injected" not in read.headers and read.headers.get_list("set-cookie") == []


def test_login_regenerates_and_logout_deletes_row_and_cookie(srv: Server) -> None:
    with srv.client() as client:
        before = cookie_of(client.post("/set/cart"))
        login = client.post("/login/alice", headers=sent(before))
        after = cookie_of(login)
        assert login.json()["user"] == "alice"
        assert after and after != before
        assert client.get("/read", headers=sent(before)).json()["data"] == {}  # fixation defeated
        me = client.get("/read", headers=sent(after)).json()
        assert me == {"data": {"cart": True}, "user": "alice"}
        assert srv.rows() == 2 - 1  # the fresh session made by the stale-cookie read wrote nothing

        logout = client.post("/logout", headers=sent(after))
        deletion = [h for h in logout.headers.get_list("set-cookie") if h.startswith("session=")]
        assert deletion and "Max-Age=0" in deletion[0]
        assert srv.rows() == 0


def test_a_failing_request_saves_nothing(srv: Server) -> None:
    with srv.client() as client:
        cookie = cookie_of(client.post("/set/a"))
        response = client.post("/boom", headers=sent(cookie))
        assert response.status_code == 500
        assert client.get("/read", headers=sent(cookie)).json()["data"] == {"a": True}


def test_previous_url_is_recorded_for_html_pages_of_existing_sessions(srv: Server) -> None:
    with srv.client() as client:
        cookie = cookie_of(client.post("/set/a"))
        client.get("/page?from=1", headers=sent(cookie))
        page = client.get("/page", headers=sent(cookie))
        assert "/page?from=1" in page.text
        client.get("/page", headers={**sent(cookie), "X-Requested-With": "XMLHttpRequest"})
        assert "/page?from=1" not in client.get("/page", headers=sent(cookie)).text
        partials = ({"X-Requested-With": "XMLHttpRequest"}, {"HX-Request": "true"}, {"Turbo-Frame": "cart"})
        for partial in (*partials, {"Sec-Fetch-Mode": "cors"}):  # fragments and fetch() are not pages
            client.get("/page?partial=1", headers={**sent(cookie), **partial})
        assert "partial" not in client.get("/page", headers=sent(cookie)).text
        client.get("/page?nav=1", headers={**sent(cookie), "Sec-Fetch-Mode": "navigate"})
        assert "/page?nav=1" in client.get("/page", headers=sent(cookie)).text


def test_a_logout_in_another_tab_is_not_undone(srv: Server) -> None:
    with srv.client() as client:
        cookie = cookie_of(client.post("/login/bob"))

        async def race() -> None:
            async with httpx.AsyncClient(base_url=srv.base_url, timeout=30, headers=sent(cookie)) as tab:
                # Several slow writes are in flight when the logout lands.
                writes = [asyncio.create_task(tab.post(f"/set/w{n}")) for n in range(5)]
                await asyncio.sleep(0.005)
                await tab.post("/logout")
                await asyncio.gather(*writes)

        asyncio.run(race())
        assert client.get("/read", headers=sent(cookie)).json()["data"] == {}
    # Writes that arrived after the logout started fresh anonymous sessions; bob's is never back.
    with srv.engine.connect() as conn:
        assert conn.exec_driver_sql("SELECT count(*) FROM sessions WHERE user_id = 'bob'").scalar_one() == 0


def test_a_slow_database_call_does_not_stall_other_requests(srv: Server) -> None:
    if FRAMEWORKS[srv.framework] != "uvicorn":
        pytest.skip("one ASGI worker serves every request on one event loop; WSGI servers use threads")
    with srv.client() as client:
        slow_cookie = cookie_of(client.post("/set/a"))
        other_cookie = cookie_of(client.post("/set/b"))
    with srv.engine.connect() as blocker:
        # Given the first session's row (PostgreSQL) or the database's write lock (SQLite) held elsewhere,
        if srv.database == "sqlite":
            blocker.exec_driver_sql("BEGIN IMMEDIATE")
        else:
            blocker.exec_driver_sql("SELECT 1 FROM sessions FOR UPDATE")

        async def scenario() -> tuple[float, int]:
            async with httpx.AsyncClient(base_url=srv.base_url, timeout=60) as http:
                # when a request of that session has to wait for the database to save,
                slow = asyncio.create_task(http.post("/set/late", headers=sent(slow_cookie)))
                await asyncio.sleep(0.3)
                assert not slow.done()
                # then other requests on the same worker are still answered at once.
                started = time.monotonic()
                answers = await asyncio.gather(*(http.get("/read", headers=sent(other_cookie)) for _ in range(20)))
                elapsed = time.monotonic() - started
                assert all(a.json()["data"] == {"b": True} for a in answers)
                assert not slow.done()
                await asyncio.to_thread(blocker.rollback)
                return elapsed, (await slow).status_code

        elapsed, slow_status = asyncio.run(scenario())
    assert elapsed < 2.0
    assert slow_status == 200
    with srv.client() as client:
        assert client.get("/read", headers=sent(slow_cookie)).json()["data"] == {"a": True, "late": True}
