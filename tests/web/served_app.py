"""One app under a real server on a throwaway database, driven over HTTP (the Litestar and Quart tests)."""

from __future__ import annotations

import asyncio
import os
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import sqlalchemy as sa

from tests.conftest import backend_for
from tests.web.test_servers import free_port, sent, wait_until_up

ROOT = Path(__file__).resolve().parents[2]


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
