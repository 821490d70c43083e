"""A real server on a throwaway database, driven over HTTP, and the helpers the real-server tests share."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import sqlalchemy as sa

from tests.conftest import backend_for

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_until_up(process: subprocess.Popen[bytes], port: int, log: Path) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited: {log.read_text()[-3000:]}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"server did not start: {log.read_text()[-3000:]}")


def sent(cookie: str | None) -> dict[str, str]:
    return {"Cookie": f"session={cookie}"} if cookie else {}


def cookie_of(response: httpx.Response) -> str | None:
    for header in response.headers.get_list("set-cookie"):
        name, _, rest = header.partition("=")
        if name == "session":
            return rest.split(";", 1)[0]
    return None


@dataclass
class ServedApp:
    database: str
    base_url: str
    engine: sa.Engine

    def client(self) -> httpx.Client:
        """A client that keeps no cookies: each request carries exactly the cookie the test gives it."""
        client = httpx.Client(base_url=self.base_url, timeout=30)
        client.event_hooks["response"] = [lambda response: client.cookies.clear()]
        return client

    def rows(self) -> int:
        with self.engine.connect() as conn:
            return int(conn.exec_driver_sql("SELECT count(*) FROM sessions").scalar_one())

    def read(self, cookie: str | None) -> dict[str, object]:
        with self.client() as client:
            return dict(client.get("/read", headers=sent(cookie)).json())

    def fire(self, cookie: str | None, paths: list[str]) -> list[int]:
        """POST every path at once, all with the same cookie."""

        async def run() -> list[int]:
            async with httpx.AsyncClient(base_url=self.base_url, timeout=60, headers=sent(cookie)) as client:
                responses = await asyncio.gather(*(client.post(path) for path in paths))
            return [r.status_code for r in responses]

        return asyncio.run(run())

    def empty(self) -> ServedApp:
        with self.engine.begin() as conn:
            conn.exec_driver_sql("DELETE FROM sessions")
        return self


@contextmanager
def serve_app(name: str, database: str, tmp_root: Path, command: list[str]) -> Iterator[ServedApp]:
    """Run *command* (formatted with `{port}`) against a migrated *database*, until the block ends."""
    backend = backend_for(database, tmp_root)
    port = free_port()
    log = tmp_root / f"{name}-{database}.log"
    env = {**os.environ, "SQLA_SESSIONS_DATABASE_URL": backend.url, "PYTHONPATH": str(ROOT)}
    argv = [part.format(port=port) for part in command]
    with log.open("wb") as log_file:
        process = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=log_file, stderr=subprocess.STDOUT)
        try:
            wait_until_up(process, port, log)
            yield ServedApp(database, f"http://127.0.0.1:{port}", backend.engine)
        finally:
            process.terminate()
            process.wait(10)
