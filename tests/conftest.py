"""Shared fixtures: a throwaway database per backend per test run, and one handler fixture for all four.

Services come from `SQLA_SESSIONS_TEST_PG_URL` / `SQLA_SESSIONS_TEST_MYSQL_URL` (defaults: the local
servers). A backend that is down skips its tests locally and fails them when `CI` is set.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine, make_url

from sqla_sessions import DatabaseHandler, MemoryHandler, SessionConfig, upgrade
from sqla_sessions.store.handlers.base import BaseHandler
from sqla_sessions.store.handlers.engines import create_session_engine

PG_ADMIN_URL = os.environ.get("SQLA_SESSIONS_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")
MYSQL_ADMIN_URL = os.environ.get("SQLA_SESSIONS_TEST_MYSQL_URL", "mysql+pymysql://root@127.0.0.1:3306/test")
IN_CI = bool(os.environ.get("CI"))
RUN_ID = uuid.uuid4().hex[:10]

DATABASE_BACKENDS = ("sqlite", "postgresql", "mariadb")
ALL_BACKENDS = ("memory", *DATABASE_BACKENDS)


def unavailable(what: str, error: BaseException) -> None:
    """Skip locally, fail in CI: a missing service must never pass CI silently."""
    message = f"{what} is not reachable: {error}"
    if IN_CI:
        pytest.fail(message, pytrace=False)
    pytest.skip(message)


class FakeClock:
    """A settable clock for handlers (expiry, touch throttling) that starts at the real time."""

    def __init__(self) -> None:
        import time

        self.now = float(int(time.time()))

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def _create_database(admin_url: str, kind: str) -> tuple[str, Callable[[], None]]:
    name = f"sqla_sessions_test_{RUN_ID}"
    admin = sa.create_engine(admin_url, isolation_level="AUTOCOMMIT", poolclass=sa.pool.NullPool)
    with admin.connect() as conn:
        if kind == "postgresql":
            conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}"')
            conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
        else:
            conn.exec_driver_sql(f"DROP DATABASE IF EXISTS `{name}`")
            conn.exec_driver_sql(f"CREATE DATABASE `{name}` CHARACTER SET utf8mb4")

    def drop() -> None:
        with admin.connect() as conn:
            if kind == "postgresql":
                conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            else:
                conn.exec_driver_sql(f"DROP DATABASE IF EXISTS `{name}`")
        admin.dispose()

    url = make_url(admin_url).set(database=name).render_as_string(hide_password=False)
    return url, drop


@dataclass
class Backend:
    name: str
    url: str
    engine: Engine


_backends: dict[str, Backend] = {}
_cleanups: list[Callable[[], None]] = []


def _backend(name: str, tmp_root: Path) -> Backend:
    if name in _backends:
        return _backends[name]
    if name == "sqlite":
        url = f"sqlite:///{tmp_root / 'sessions.db'}"
    else:
        admin = PG_ADMIN_URL if name == "postgresql" else MYSQL_ADMIN_URL
        try:
            url, drop = _create_database(admin, name)
        except Exception as exc:
            unavailable(name, exc)
        _cleanups.append(drop)
    engine = (
        create_session_engine(url, pool_size=20, max_overflow=60) if name != "sqlite" else create_session_engine(url)
    )
    upgrade(engine)
    _cleanups.append(engine.dispose)
    backend = _backends[name] = Backend(name, url, engine)
    return backend


@pytest.fixture(scope="session")
def tmp_root(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    yield tmp_path_factory.mktemp("sqla_sessions")
    for cleanup in reversed(_cleanups):
        cleanup()
    _cleanups.clear()
    _backends.clear()


def backend_for(name: str, tmp_root: Path) -> Backend:
    backend = _backend(name, tmp_root)
    with backend.engine.begin() as conn:
        conn.exec_driver_sql("DELETE FROM sessions")
    return backend


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


HandlerFactory = Callable[..., BaseHandler[Any]]


@pytest.fixture(params=ALL_BACKENDS)
def backend_name(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def make_handler(backend_name: str, tmp_root: Path, clock: FakeClock) -> HandlerFactory:
    """Build a handler on the parametrized backend (a clean table), with the test's fake clock."""
    backend = None if backend_name == "memory" else backend_for(backend_name, tmp_root)
    memory = MemoryHandler(clock=clock)  # every memory handler of a test shares one store

    def factory(config: SessionConfig | None = None, **overrides: Any) -> BaseHandler[Any]:
        cfg = (config or SessionConfig()).replace(**overrides)
        if backend is None:
            return memory.with_config(cfg)
        return DatabaseHandler(backend.engine, cfg, clock=clock)

    return factory


@pytest.fixture
def handler(make_handler: HandlerFactory) -> BaseHandler[Any]:
    return make_handler()


@pytest.fixture(params=DATABASE_BACKENDS)
def db_backend(request: pytest.FixtureRequest, tmp_root: Path) -> Backend:
    """A real database backend (clean table), for tests that need SQL."""
    return backend_for(str(request.param), tmp_root)


def stored_rows(handler: BaseHandler[Any]) -> int:
    """How many rows the handler's store holds (expired ones included)."""
    if isinstance(handler, MemoryHandler):
        return len(handler)
    assert isinstance(handler, DatabaseHandler)
    with handler.engine.connect() as conn:
        return int(conn.execute(sa.select(sa.func.count()).select_from(handler.table)).scalar_one())


class StatementCounter:
    """Counts the SQL statements an engine's handlers send while active, by either path: the hot
    statements on the driver's cursor (`handlers.runner.Runner`, observed around its one method, which
    still runs as in production) and every other through SQLAlchemy's `before_cursor_execute`.

    `hot` lists the statements that went the hot path: a test asserts on it that the path production
    runs is the one it measured."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.statements: list[str] = []
        self.hot: list[str] = []

    def _ours(self, conn: Any) -> bool:
        """A connection to this engine's database, by any driver (an async engine's too)."""
        url, ours = conn.engine.url, self.engine.url
        return (url.host, url.port, url.database) == (ours.host, ours.port, ours.database)

    def _on_execute(self, conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if self._ours(conn):
            self.statements.append(statement)

    def __enter__(self) -> StatementCounter:
        from sqla_sessions.store.handlers import runner

        counter, run = self, runner.Runner._run
        self._run = run

        def observed(self: Any, conn: Any, statement: Any, *args: Any) -> Any:
            if counter._ours(conn):
                counter.statements.append(statement.sql)
                counter.hot.append(statement.sql)
            return run(self, conn, statement, *args)

        runner.Runner._run = observed  # type: ignore[method-assign]
        sa.event.listen(Engine, "before_cursor_execute", self._on_execute)
        return self

    def __exit__(self, *exc: object) -> None:
        from sqla_sessions.store.handlers import runner

        runner.Runner._run = self._run  # type: ignore[method-assign]
        sa.event.remove(Engine, "before_cursor_execute", self._on_execute)

    @property
    def count(self) -> int:
        return len(self.statements)


@pytest.fixture
def pg_backend(tmp_root: Path) -> Backend:
    """PostgreSQL alone (clean table), for behaviour only it has (idle_in_transaction_session_timeout)."""
    return backend_for("postgresql", tmp_root)
