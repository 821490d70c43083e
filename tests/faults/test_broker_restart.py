"""The Redis broker restarted while jobs are queued: no job is lost (with a durable Redis).

Dramatiq's Redis broker keeps queued messages in Redis itself, so they survive a restart exactly when
Redis persists them. The machine's shared Redis runs without persistence (`--save "" --appendonly
no`), so this test starts a Redis of its own with the append-only file on, as production should.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

from tests.conftest import RUN_ID, backend_for, unavailable
from tests.jobs.test_workers import Stack, wait_for
from tests.web.test_servers import ROOT, cookie_of, free_port, wait_until_up


def start_redis(port: int, folder: Path) -> subprocess.Popen[bytes]:
    server = shutil.which("redis-server")
    if server is None:
        unavailable("redis-server", FileNotFoundError("redis-server"))
    assert server is not None
    command = [server, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(folder),
               "--appendonly", "yes", "--appendfsync", "always", "--save", ""]  # fmt: skip
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(100):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return process
        except OSError:
            time.sleep(0.05)
    raise RuntimeError("redis did not start")


def test_jobs_queued_before_a_broker_restart_all_run(tmp_root: Path) -> None:
    backend = backend_for("postgresql", tmp_root)
    folder = tmp_root / "durable-redis"
    folder.mkdir(exist_ok=True)
    redis_port, web_port = free_port(), free_port()
    redis_url = f"redis://127.0.0.1:{redis_port}/0"
    redis = start_redis(redis_port, folder)
    signals = tmp_root / "signals-restart"
    signals.mkdir(exist_ok=True)
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "SQLA_SESSIONS_DATABASE_URL": backend.url,
        "TEST_BROKER": "redis",
        "TEST_REDIS_URL": redis_url,
        "TEST_NAMESPACE": f"sqla-{RUN_ID}-restart",
        "TEST_SIGNAL_DIR": str(signals),
        "TEST_HYDRATE_SECONDS": "0.05",
    }
    stack = Stack("restart", env, f"http://127.0.0.1:{web_port}", backend.engine, signals, tmp_root)
    try:
        web_log = tmp_root / "restart-web.log"
        handle = web_log.open("wb")
        stack.files.append(handle)
        stack.web = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "tests.jobs.webapp:app", "--factory", "--port", str(web_port),
             "--log-level", "warning"],
            cwd=ROOT, env=env, stdout=handle, stderr=subprocess.STDOUT,
        )  # fmt: skip
        wait_until_up(stack.web, web_port, web_log)
        cookies = []
        with stack.client() as client:  # no worker runs yet: the jobs wait in Redis
            for n in range(5):
                cookie = cookie_of(client.post(f"/login/user{n}"))
                assert cookie
                cookies.append(cookie)
        # Restart the broker with the five jobs queued.
        subprocess.run(["redis-cli", "-p", str(redis_port), "shutdown"], check=False, capture_output=True)
        redis.wait(30)
        redis = start_redis(redis_port, folder)
        stack.start_workers()
        for cookie in cookies:
            wait_for(lambda c=cookie: stack.dashboard(c)["dashboard"], 60, "a job queued before the restart")
    finally:
        stack.stop()
        redis.terminate()
        redis.wait(30)
