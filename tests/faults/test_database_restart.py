"""PostgreSQL restarted under HTTP load: quick 503s during the outage, recovery by itself, no
acknowledged write lost."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests import conftest
from tests.conftest import backend_for, unavailable
from tests.web.test_servers import ROOT, cookie_of, free_port, sent, wait_until_up


def restart_postgresql() -> None:
    versions = sorted(os.listdir("/etc/postgresql")) if os.path.isdir("/etc/postgresql") else []
    if not versions or shutil.which("pg_ctlcluster") is None:
        unavailable("pg_ctlcluster (a local PostgreSQL cluster to restart)", FileNotFoundError("pg_ctlcluster"))
    subprocess.run(
        ["pg_ctlcluster", "--skip-systemctl-redirect", versions[-1], "main", "restart", "-m", "fast"],
        check=True,
        capture_output=True,
        timeout=120,
    )


@pytest.mark.parametrize("framework", ["starlette", "flask"])
def test_a_database_restart_under_load(framework: str, tmp_root: Path) -> None:
    backend = backend_for("postgresql", tmp_root)
    port = free_port()
    log = tmp_root / f"restart-{framework}.log"
    url = backend.url + "?connect_timeout=3"
    env = {**os.environ, "SQLA_SESSIONS_DATABASE_URL": url, "PYTHONPATH": str(ROOT)}
    if framework == "starlette":
        command = [sys.executable, "-m", "uvicorn", "tests.web.apps:starlette_app", "--factory",
                   "--port", str(port), "--log-level", "critical"]  # fmt: skip
    else:
        command = [sys.executable, "-m", "gunicorn", "--threads", "16", "--worker-class", "gthread",
                   "--bind", f"127.0.0.1:{port}", "--log-level", "critical", "tests.web.apps:flask_app()"]  # fmt: skip
    with log.open("wb") as handle:
        server = subprocess.Popen(command, cwd=ROOT, env=env, stdout=handle, stderr=subprocess.STDOUT)
        try:
            wait_until_up(server, port, log)
            base = f"http://127.0.0.1:{port}"
            with httpx.Client(base_url=base, timeout=15) as client:
                client.event_hooks["response"] = [lambda response: client.cookies.clear()]
                cookies = [cookie_of(client.post("/set/start")) for _ in range(6)]
            assert all(cookies) and len(set(cookies)) == 6
            acknowledged: dict[str, list[str]] = {str(c): [] for c in cookies}
            failures: list[tuple[int, float]] = []
            recovered_at: list[float] = []
            stop = time.monotonic() + 14

            async def writer(cookie: str) -> None:
                n = 0
                async with httpx.AsyncClient(base_url=base, timeout=15, headers=sent(cookie)) as http:
                    while time.monotonic() < stop:
                        n += 1
                        key = f"w{n}"
                        started = time.monotonic()
                        try:
                            response = await http.post(f"/set/{key}")
                        except httpx.HTTPError:
                            failures.append((0, time.monotonic() - started))
                            continue
                        if response.status_code == 200:
                            acknowledged[cookie].append(key)
                            if failures:
                                recovered_at.append(time.monotonic())
                        else:
                            failures.append((response.status_code, time.monotonic() - started))
                            await asyncio.sleep(0.05)

            async def scenario() -> None:
                tasks = [asyncio.create_task(writer(str(c))) for c in cookies]
                await asyncio.sleep(1.5)
                await asyncio.to_thread(restart_postgresql)
                await asyncio.gather(*tasks)

            asyncio.run(scenario())
        finally:
            server.terminate()
            server.wait(15)
            for other in conftest._backends.values():  # the restart killed every pooled connection
                other.engine.dispose()

    assert failures, "the outage should have been noticed"
    assert {status for status, _ in failures} <= {503}, failures[:5]
    assert max(elapsed for _, elapsed in failures) < 5.0  # answered quickly, no hang
    assert recovered_at, "service must resume by itself"
    # Every write that was acknowledged with a 200 is in the database.
    from sqla_sessions.core.ids import session_key_of

    for cookie, keys in acknowledged.items():
        with backend.engine.connect() as conn:
            payload = conn.exec_driver_sql(
                "SELECT payload FROM sessions WHERE key = %(k)s", {"k": session_key_of(cookie)}
            ).scalar_one()
        stored = bytes(payload)
        missing = [key for key in keys if f'"{key}"'.encode() not in stored]
        assert not missing, f"acknowledged but lost: {missing[:5]}"
        assert len(keys) > 5
