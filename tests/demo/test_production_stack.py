"""`sqla-sessions demo --database-url postgresql+psycopg://… --broker redis://…`: real worker processes."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

from tests.conftest import backend_for, unavailable
from tests.web.test_servers import ROOT, cookie_of, free_port, sent, wait_until_up

REDIS_DB = "redis://127.0.0.1:6379/14"  # a database of its own, emptied afterwards


def test_the_demo_on_postgresql_with_redis_and_worker_processes(tmp_root: Path) -> None:
    try:
        socket.create_connection(("127.0.0.1", 6379), timeout=2).close()
    except OSError as exc:
        unavailable("Redis", exc)
    backend = backend_for("postgresql", tmp_root)
    port = free_port()
    log = tmp_root / "demo-production.log"
    env = {**os.environ, "SQLA_SESSIONS_DEMO_JOB_SECONDS": "0.3"}
    command = [
        sys.executable, "-m", "sqla_sessions", "demo", "--port", str(port), "--database-url", backend.url,
        "--table", "demo_sessions", "--broker", REDIS_DB, "--workers", "2",
    ]  # fmt: skip
    with log.open("wb") as handle:
        # Its own process group: stopping it stops the worker processes it started too.
        process = subprocess.Popen(
            command, cwd=ROOT, env=env, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            wait_until_up(process, port, log)
            with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
                client.event_hooks["response"] = [lambda response: client.cookies.clear()]
                home = client.get("/")  # the form carries the session's CSRF token
                token = re.search(r'name="_token" value="([^"]+)"', home.text)
                assert token is not None
                no_token = client.post("/login", data={"name": "mallory"}, headers=sent(cookie_of(home)))
                assert no_token.status_code == 419  # login CSRF: refused
                login = client.post(
                    "/login", data={"name": "grace", "_token": token.group(1)}, headers=sent(cookie_of(home))
                )
                assert login.status_code == 303
                cookie = cookie_of(login)
                deadline = time.monotonic() + 60
                board = None
                while board is None and time.monotonic() < deadline:
                    board = client.get("/api/dashboard", headers=sent(cookie)).json()["dashboard"]
                    time.sleep(0.2)
                assert board is not None, log.read_text()[-3000:]
                worker_pid = int(board["computed_by"].rsplit(" ", 1)[1])
                assert worker_pid != process.pid  # computed by a dramatiq worker process, not the web server
        finally:
            os.killpg(process.pid, 15)
            process.wait(30)
            import redis

            client = redis.Redis.from_url(REDIS_DB)
            client.flushdb()
            client.close()
    with backend.engine.connect() as conn:
        assert conn.exec_driver_sql("SELECT count(*) FROM demo_sessions WHERE user_id = 'grace'").scalar_one() == 1
