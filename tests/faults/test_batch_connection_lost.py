"""A batch of saves is up to three statements (first writes, changes, touches), each committing by
itself. The connection killed between two of them (`pg_terminate_backend` from another connection,
on a real PostgreSQL): each request is told what became of its own save. Those whose statement ran
are told it was saved; those of the statement sent on the dead connection get an error (the outcome
of a statement on a lost connection is unknown, as for a save alone); those of a statement never
sent are saved alone on a fresh connection. Retrying what failed applies nothing twice."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from sqla_sessions import DatabaseHandler, SaveAction, SessionConfig
from sqla_sessions.errors import StoreUnavailable
from sqla_sessions.store.aio import AsyncSessionStore
from tests.conftest import Backend, FakeClock, backend_for


@pytest.fixture
def pg(tmp_root: Path) -> Backend:
    return backend_for("postgresql", tmp_root)


@pytest.fixture
def killer(pg: Backend) -> Iterator[sa.Engine]:
    engine = sa.create_engine(pg.url, poolclass=sa.pool.NullPool, isolation_level="AUTOCOMMIT")
    yield engine
    engine.dispose()


def _terminate(killer: sa.Engine, pid: int) -> None:
    """End the server process of another connection, and wait until it is gone."""
    with killer.connect() as conn:
        assert conn.execute(sa.text("SELECT pg_terminate_backend(:pid)"), {"pid": pid}).scalar()
        deadline = time.monotonic() + 10
        alive = sa.text("SELECT count(*) FROM pg_stat_activity WHERE pid = :pid")
        while conn.execute(alive, {"pid": pid}).scalar():
            assert time.monotonic() < deadline, "the backend outlived pg_terminate_backend"
            time.sleep(0.01)


def _stored(handler: DatabaseHandler, **data: Any) -> str:
    session = handler.load(None)
    session.put(data)
    session.save()
    return session.id


@pytest.mark.parametrize(
    ("killed_before", "told_error"),
    [("_update_many", "changes"), ("_touch_many", "touches")],
    ids=["after-the-first-writes", "after-the-changes"],
)
def test_each_request_of_a_batch_cut_between_its_statements_is_told_its_own_outcome(
    pg: Backend,
    killer: sa.Engine,
    clock: FakeClock,
    monkeypatch: pytest.MonkeyPatch,
    killed_before: str,
    told_error: str,
) -> None:
    handler = DatabaseHandler(pg.url, SessionConfig(), clock=clock)
    store = AsyncSessionStore(handler)
    changed_ids = [_stored(handler, count=0) for _ in range(3)]
    touched_ids = [_stored(handler, n=n) for n in range(3)]
    clock.advance(handler.config.touch_interval + 1)  # activity is due: a read-only request touches
    assert handler.batches_writes

    killed: list[int] = []
    statement = getattr(handler, killed_before)

    def killed_first(conn: sa.Connection, rows: list[Any], now: int) -> set[str]:
        if not killed:  # the batch's statements before this one have run and committed
            pid = conn.connection.dbapi_connection.info.backend_pid  # type: ignore[union-attr]
            _terminate(killer, pid)
            killed.append(pid)
        result: set[str] = statement(conn, rows, now)
        return result

    monkeypatch.setattr(handler, killed_before, killed_first)

    async def requests() -> tuple[dict[str, list[Any]], dict[str, list[Any]], list[str]]:
        newcomers = [await store.load(None) for _ in range(3)]
        for n, newcomer in enumerate(newcomers):
            newcomer["hello"] = n
        changers = [await store.load(session_id) for session_id in changed_ids]
        for changer in changers:
            changer.increment("count")
        readers = [await store.load(session_id) for session_id in touched_ids]
        for reader in readers:
            reader.get("n")
        kinds = {"first writes": newcomers, "changes": changers, "touches": readers}
        everyone = [session for sessions in kinds.values() for session in sessions]
        # Queued in the same turn of the loop: one batch.
        told = iter(await asyncio.gather(*(s.asave() for s in everyone), return_exceptions=True))
        first = {kind: [next(told) for _ in sessions] for kind, sessions in kinds.items()}
        retried = {  # a caller told "failed" tries again
            kind: [
                await session.asave() if isinstance(outcome, BaseException) else None
                for session, outcome in zip(sessions, first[kind], strict=True)
            ]
            for kind, sessions in kinds.items()
        }
        await store.aclose()
        return first, retried, [newcomer.id for newcomer in newcomers]

    try:
        first, retried, new_ids = asyncio.run(requests())
        assert len(killed) == 1

        written = {"first writes": SaveAction.INSERTED, "changes": SaveAction.UPDATED, "touches": SaveAction.TOUCHED}
        for kind, outcomes in first.items():
            if kind == told_error:  # sent on the dead connection: not known to be written
                assert all(isinstance(outcome, StoreUnavailable) for outcome in outcomes), outcomes
                assert retried[kind] == [written[kind]] * 3
            else:  # committed before the kill, or never sent and saved alone: told so
                assert outcomes == [written[kind]] * 3, (kind, outcomes)
                assert retried[kind] == [None] * 3

        direct = DatabaseHandler(pg.engine, SessionConfig(), clock=clock)
        assert [direct.load(session_id)["count"] for session_id in changed_ids] == [1] * 3  # once, not twice
        assert [direct.load(session_id).last_activity for session_id in touched_ids] == [handler.now()] * 3
        assert [direct.load(session_id)["hello"] for session_id in new_ids] == [0, 1, 2]
        with pg.engine.connect() as conn:
            assert conn.exec_driver_sql("SELECT count(*) FROM sessions").scalar() == 9  # each first write once
    finally:
        handler.close()
