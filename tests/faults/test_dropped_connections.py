"""Every pooled connection ended by the server at once (`pg_terminate_backend`, as a restart or a
failover does): reads are sent again on a fresh connection, so no request that only reads fails.
Writes are not: a statement lost with its connection has an unknown outcome (see
test_batch_connection_lost.py)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import sqlalchemy as sa

from sqla_sessions import DatabaseHandler, SessionConfig
from sqla_sessions.store.aio import AsyncSessionStore
from tests.conftest import Backend, backend_for


@pytest.fixture
def pg(tmp_root: Path) -> Backend:
    return backend_for("postgresql", tmp_root)


def _end_every_connection(handler: DatabaseHandler, pg: Backend, count: int) -> None:
    """Open *count* pooled connections, then have the server end each of them."""
    conns = [handler.engine.connect() for _ in range(count)]
    pids = [conn.exec_driver_sql("SELECT pg_backend_pid()").scalar_one() for conn in conns]
    for conn in conns:
        conn.close()
    killer = sa.create_engine(pg.url, poolclass=sa.pool.NullPool, isolation_level="AUTOCOMMIT")
    with killer.connect() as conn:
        for pid in pids:
            conn.execute(sa.text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})
    killer.dispose()


@pytest.mark.parametrize("batched", [True, False])
def test_reads_after_the_server_ended_every_pooled_connection_all_succeed(pg: Backend, batched: bool) -> None:
    config = SessionConfig(database_url=pg.url, pool_size=5, batch_requests=batched)
    handler = DatabaseHandler(pg.url, config)
    try:
        session = handler.load(None)
        session["a"] = 1
        session.save()
        _end_every_connection(handler, pg, 5)
        assert [handler.load(session.id)["a"] for _ in range(8)] == [1] * 8
    finally:
        handler.close()


def test_async_reads_after_the_server_ended_every_pooled_connection_all_succeed(pg: Backend) -> None:
    handler = DatabaseHandler(pg.url, SessionConfig(database_url=pg.url, pool_size=5))
    store = AsyncSessionStore(handler)

    async def scenario() -> list[int]:
        session = await store.load(None)
        session["a"] = 1
        await store.save(session)
        await asyncio.to_thread(_end_every_connection, handler, pg, 5)
        loaded = await asyncio.gather(*(store.load(session.id) for _ in range(16)))
        return [s["a"] for s in loaded]

    try:
        assert asyncio.run(scenario()) == [1] * 16
    finally:
        asyncio.run(store.aclose())
        handler.close()
