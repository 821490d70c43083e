"""The servers a history runs against, and the loop that runs, checks and shrinks histories."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy.engine import make_url

from sqla_sessions import upgrade
from tests.history.checker import History, Op, generate, make_handler
from tests.web.served_app import free_port, wait_until_up

ROOT = Path(__file__).resolve().parents[2]
PG_ADMIN_URL = os.environ.get("SQLA_SESSIONS_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")


@dataclass
class Report:
    histories: int = 0
    operations: int = 0
    failures: list[str] = field(default_factory=list)

    def summary(self) -> str:
        return f"{self.histories} histories, {self.operations} operations checked, {len(self.failures)} failing"


@contextmanager
def throwaway_database() -> Iterator[str]:
    name = f"sqla_sessions_history_{uuid.uuid4().hex[:8]}"
    admin = sa.create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT", poolclass=sa.pool.NullPool)
    with admin.connect() as conn:
        conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
    url = make_url(PG_ADMIN_URL).set(database=name).render_as_string(hide_password=False)
    try:
        upgrade(url)
        yield url
    finally:
        with admin.connect() as conn:
            conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.dispose()


@contextmanager
def servers(url: str, folder: Path) -> Iterator[dict[str, str]]:
    """uvicorn (Starlette), gunicorn gthread with 4 threads (Flask), and a Dramatiq worker."""
    namespace = f"sqla-sessions-history-{uuid.uuid4().hex[:8]}"
    os.environ["HISTORY_NAMESPACE"] = namespace
    os.environ["SQLA_SESSIONS_DATABASE_URL"] = url
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    asgi_port, wsgi_port = free_port(), free_port()
    commands = {
        "asgi": [sys.executable, "-m", "uvicorn", "tests.history.apps:starlette_app", "--factory",
                 "--port", str(asgi_port), "--log-level", "critical"],
        "wsgi": [sys.executable, "-m", "gunicorn", "--worker-class", "gthread", "--threads", "4",
                 "--bind", f"127.0.0.1:{wsgi_port}", "--log-level", "critical", "tests.history.apps:flask_app()"],
        "worker": [sys.executable, "-m", "dramatiq", "tests.history.worker", "--processes", "1", "--threads", "2"],
    }  # fmt: skip
    with ExitStack() as stack:
        processes = []
        for name, argv in commands.items():
            log = stack.enter_context((folder / f"{name}.log").open("wb"))
            process = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
            processes.append(process)
            stack.callback(_stop, process)
        wait_until_up(processes[0], asgi_port, folder / "asgi.log")
        wait_until_up(processes[1], wsgi_port, folder / "wsgi.log")
        yield {"asgi": f"http://127.0.0.1:{asgi_port}", "wsgi": f"http://127.0.0.1:{wsgi_port}"}


def _stop(process: subprocess.Popen[bytes]) -> None:
    process.terminate()
    try:
        process.wait(15)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(5)


def shrink(ops: list[Op], fails: Callable[[list[Op]], bool], budget_seconds: float) -> list[Op]:
    """The fewest operations (delta debugging: drop chunks while the history still fails) found in time."""
    deadline = time.monotonic() + budget_seconds
    chunk = max(1, len(ops) // 2)
    while chunk >= 1 and time.monotonic() < deadline:
        start, shrunk = 0, False
        while start < len(ops) and time.monotonic() < deadline:
            candidate = ops[:start] + ops[start + chunk :]
            if candidate and any(fails(candidate) for _ in range(2)):  # concurrency: give it two tries
                ops, shrunk = candidate, True
            else:
                start += chunk
        if not shrunk:
            chunk //= 2
    return ops


def check_histories(
    seconds: float, seeds: Iterator[int], *, restart: Callable[[], None] | None = None, shrink_seconds: float = 120
) -> Report:
    """Run histories until *seconds* have passed; each failing one is shrunk and described."""
    report = Report()
    logs = Path(tempfile.mkdtemp(prefix="sqla-sessions-history-"))  # kept: the servers' logs of a failure
    with throwaway_database() as url, servers(url, logs) as urls:
        handler = make_handler()
        admin = sa.create_engine(url, poolclass=sa.pool.NullPool)
        stop = time.monotonic() + seconds
        restarted = restart is None
        try:
            while time.monotonic() < stop:
                seed = next(seeds)
                ops = generate(seed)
                restarting = None
                if restart is not None and not restarted and time.monotonic() > stop - seconds / 2:
                    restarting = threading.Timer(0.5, restart)  # once, mid-run, under this history's requests
                    restarting.start()
                    restarted = True
                problems = History(ops, urls, handler, admin).run()
                if restarting is not None:
                    restarting.join()
                report.histories += 1
                report.operations += len(ops)
                if problems:

                    def fails(candidate: list[Op]) -> bool:
                        return bool(History(candidate, urls, handler, admin).run())

                    minimal = shrink(ops, fails, shrink_seconds)
                    steps = "\n    ".join(op.describe() for op in minimal)
                    report.failures.append(
                        f"seed {seed} (server logs in {logs}): {'; '.join(problems)}\n"
                        f"  minimal reproduction ({len(minimal)} of {len(ops)} operations; "
                        f"`python -m tests.history --seed {seed}`):\n    {steps}"
                    )
        finally:
            handler.engine.dispose()
            admin.dispose()
    return report
