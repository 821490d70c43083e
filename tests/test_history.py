"""The history checker in CI: about a minute of random concurrent histories (fixed seeds) against
uvicorn, gunicorn gthread, a Dramatiq worker on Redis and direct handler calls, every one checked
against the definition of the merge (`tests/history`). Longer runs: `python -m tests.history`."""

from __future__ import annotations

import itertools
import os
import shutil

import pytest
import redis
import sqlalchemy as sa

from tests import conftest
from tests.conftest import PG_ADMIN_URL, unavailable
from tests.history.run import check_histories

SECONDS = float(os.environ.get("SQLA_SESSIONS_HISTORY_SECONDS", "60"))


@pytest.mark.slow
def test_random_concurrent_histories_keep_every_acknowledged_operation_exactly_once() -> None:
    try:
        with sa.create_engine(PG_ADMIN_URL, poolclass=sa.pool.NullPool).connect():
            pass
        redis.Redis.from_url(os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379/0")).ping()
    except Exception as exc:
        unavailable("PostgreSQL and Redis (the history checker's database and broker)", exc)
    restart = None
    if shutil.which("pg_ctlcluster") and os.path.isdir("/etc/postgresql"):  # a local cluster: restart it once
        from tests.faults.test_database_restart import restart_postgresql

        restart = restart_postgresql
    try:
        report = check_histories(SECONDS, itertools.count(1), restart=restart, shrink_seconds=90)
    finally:
        if restart is not None:
            for backend in conftest._backends.values():  # the restart killed every pooled connection
                backend.engine.dispose()
    print(report.summary())
    assert report.histories >= 5, report.summary()
    assert not report.failures, "\n".join(report.failures)
