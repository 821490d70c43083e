"""End to end: uvicorn + the `dramatiq` CLI (2 processes x 2 threads) + PostgreSQL, on Redis and RabbitMQ."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa

from tests.conftest import RUN_ID, backend_for, unavailable
from tests.web.test_servers import cookie_of, free_port, sent, wait_until_up

ROOT = Path(__file__).resolve().parents[2]
PORTS = {"redis": 6379, "rabbitmq": 5672}


def wait_for(predicate: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


@dataclass
class Stack:
    kind: str
    env: dict[str, str]
    base_url: str
    engine: sa.Engine
    signals: Path
    logs: Path
    workers: subprocess.Popen[bytes] | None = None
    web: subprocess.Popen[bytes] | None = None
    files: list[Any] = field(default_factory=list)

    def _log(self, name: str) -> Any:
        handle = (self.logs / f"{self.kind}-{name}.log").open("ab")
        self.files.append(handle)
        return handle

    def start_workers(self) -> None:
        command = [sys.executable, "-m", "dramatiq", "tests.jobs.worker", "--processes", "2", "--threads", "2"]
        log = self._log("workers")
        # Its own process group, so a test can SIGKILL the whole pool as a crashed machine would.
        self.workers = subprocess.Popen(
            command, cwd=ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )

    def kill_workers(self) -> None:
        assert self.workers is not None
        os.killpg(self.workers.pid, signal.SIGKILL)
        self.workers.wait(10)

    def stop(self) -> None:
        for process in (self.web, self.workers):
            if process is not None and process.poll() is None:
                process.terminate()
                try:
                    process.wait(15)
                except subprocess.TimeoutExpired:
                    process.kill()
        for handle in self.files:
            handle.close()

    def client(self) -> httpx.Client:
        client = httpx.Client(base_url=self.base_url, timeout=30)
        client.event_hooks["response"] = [lambda response: client.cookies.clear()]
        return client

    def dashboard(self, cookie: str) -> dict[str, Any]:
        with self.client() as client:
            return dict(client.get("/dashboard", headers=sent(cookie)).json())


def _reachable(port: int) -> None:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2):
            pass
    except OSError as exc:
        unavailable(f"broker on port {port}", exc)


def _cleanup_broker(kind: str, namespace: str) -> None:
    import redis

    client = redis.Redis.from_url("redis://127.0.0.1:6379/0")
    for key in client.scan_iter(f"{namespace}*"):
        client.delete(key)
    client.close()
    if kind == "rabbitmq":
        import pika

        connection = pika.BlockingConnection(pika.URLParameters("amqp://guest:guest@127.0.0.1:5672/"))
        channel = connection.channel()
        for suffix in ("", ".DQ", ".XQ"):
            channel.queue_delete(f"{namespace}-jobs{suffix}")
        connection.close()


@pytest.fixture(scope="module", params=["redis", "rabbitmq"])
def stack(request: pytest.FixtureRequest, tmp_root: Path) -> Iterator[Stack]:
    kind = str(request.param)
    _reachable(PORTS[kind])
    _reachable(PORTS["redis"])  # the results backend
    backend = backend_for("postgresql", tmp_root)
    namespace = f"sqla-{RUN_ID}-{kind}"
    signals = tmp_root / f"signals-{kind}"
    signals.mkdir(exist_ok=True)
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "SQLA_SESSIONS_DATABASE_URL": backend.url,
        "TEST_BROKER": kind,
        "TEST_NAMESPACE": namespace,
        "TEST_SIGNAL_DIR": str(signals),
    }
    port = free_port()
    stack = Stack(kind, env, f"http://127.0.0.1:{port}", backend.engine, signals, tmp_root)
    try:
        stack.start_workers()
        web_log = tmp_root / f"{kind}-web.log"
        handle = web_log.open("wb")
        stack.files.append(handle)
        stack.web = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "tests.jobs.webapp:app", "--factory", "--port", str(port),
             "--log-level", "warning"],
            cwd=ROOT, env=env, stdout=handle, stderr=subprocess.STDOUT,
        )  # fmt: skip
        wait_until_up(stack.web, port, web_log)
        yield stack
    finally:
        stack.stop()
        _cleanup_broker(kind, namespace)


def _login(stack: Stack, user: str) -> tuple[str, str]:
    with stack.client() as client:
        response = client.post(f"/login/{user}")
        assert response.status_code == 200
        cookie = cookie_of(response)
        assert cookie
        return cookie, str(response.json()["marker"])


def test_seed_scenario_login_dispatches_hydration_and_the_next_request_sees_it(stack: Stack) -> None:
    cookie, marker = _login(stack, "ada")
    board = wait_for(lambda: stack.dashboard(cookie)["dashboard"], 30, "the hydration job")
    assert board == {"orders": 3, "marker": marker, "user": "ada"}
    assert stack.dashboard(cookie)["hydrations"] == [marker]
    # What reached the broker names the session by its key; the cookie id never leaves the web app.
    sent_messages = (stack.signals / "enqueued.jsonl").read_bytes()
    assert marker.encode() in sent_messages and cookie.encode() not in sent_messages
    with stack.engine.connect() as conn:
        key = conn.exec_driver_sql("SELECT key FROM sessions WHERE user_id = 'ada'").scalar_one()
    assert key.encode() in sent_messages


def test_requests_during_the_job_and_the_job_lose_nothing(stack: Stack) -> None:
    if stack.kind == "rabbitmq":
        pytest.skip("the broker does not matter here; run once, on Redis")
    cookie, marker = _login(stack, "bea")

    async def burst() -> list[int]:
        async with httpx.AsyncClient(base_url=stack.base_url, timeout=30, headers=sent(cookie)) as client:
            responses = await asyncio.gather(*(client.post(f"/set/k{n}") for n in range(20)))
        return [r.status_code for r in responses]

    assert asyncio.run(burst()) == [200] * 20  # while the 500 ms job runs
    wait_for(lambda: stack.dashboard(cookie)["dashboard"], 30, "the hydration job")
    final = stack.dashboard(cookie)
    assert {f"k{n}" for n in range(20)} <= set(final["all"])
    assert final["dashboard"]["marker"] == marker and final["hydrations"] == [marker]


def test_logout_during_the_job_stays_logged_out(stack: Stack) -> None:
    if stack.kind == "rabbitmq":
        pytest.skip("the broker does not matter here; run once, on Redis")
    cookie, _ = _login(stack, "cid")
    with stack.client() as client:
        assert client.post("/logout", headers=sent(cookie)).status_code == 200
    time.sleep(2.5)  # the job (500 ms) has run by now
    with stack.engine.connect() as conn:
        assert conn.exec_driver_sql("SELECT count(*) FROM sessions WHERE user_id = 'cid'").scalar_one() == 0


def test_regenerate_during_the_job_lands_the_results_on_the_new_id(stack: Stack) -> None:
    if stack.kind == "rabbitmq":
        pytest.skip("the broker does not matter here; run once, on Redis")
    cookie, marker = _login(stack, "dan")
    with stack.client() as client:
        new_cookie = cookie_of(client.post("/regenerate", headers=sent(cookie)))
    assert new_cookie and new_cookie != cookie
    board = wait_for(lambda: stack.dashboard(new_cookie)["dashboard"], 30, "the hydration job")
    assert board["marker"] == marker


def test_a_worker_killed_mid_job_is_redelivered_and_lands_once(stack: Stack) -> None:
    with stack.client() as client:
        cookie = cookie_of(client.post("/set/start"))
        assert cookie
        tag = f"kill-{stack.kind}"
        assert client.post(f"/append/{tag}?seconds=3", headers=sent(cookie)).status_code == 200
    wait_for(lambda: list(stack.signals.glob(f"{tag}.*")), 30, "the job to start")
    stack.kill_workers()  # SIGKILL the whole pool mid-job: nothing acked, nothing saved
    assert stack.dashboard(cookie)["runs"] is None
    stack.start_workers()
    runs = wait_for(lambda: stack.dashboard(cookie)["runs"], 60, "the redelivered job")
    assert runs == [tag]
    time.sleep(2)
    assert stack.dashboard(cookie)["runs"] == [tag]  # exactly once
