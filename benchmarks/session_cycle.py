"""Session cycle on PostgreSQL: DatabaseHandler vs raw psycopg issuing the same statements, same run.

    python benchmarks/session_cycle.py [--url postgresql+psycopg://postgres@127.0.0.1/postgres] [--seconds 3]

Prints operations per second for a read-only request (load) and a writing request (load + one
compare-and-set UPDATE), and our throughput as a ratio of two baselines on one connection each:
raw psycopg (`connection.execute`, what an application would write by hand) and raw libpq
(prepared statements through `psycopg.pq`, binary values: about the floor for Python).
"""

from __future__ import annotations

import argparse
import time
import uuid
from collections.abc import Callable

import psycopg
import sqlalchemy as sa

from sqla_sessions import DatabaseHandler, SessionConfig, upgrade
from sqla_sessions.core.ids import session_key_of
from sqla_sessions.store.handlers.engines import create_session_engine


def rate(fn: Callable[[], object], seconds: float) -> float:
    for _ in range(200):  # warm caches, prepared statements, the pool
        fn()
    n, start = 0, time.perf_counter()
    deadline = start + seconds
    while time.perf_counter() < deadline:
        for _ in range(50):
            fn()
        n += 50
    return n / (time.perf_counter() - start)


def run(url: str, seconds: float) -> list[tuple[str, float, float, float]]:
    """Return (cycle, ours, raw psycopg, raw libpq) per second for the read-only and write cycles."""
    table = f"bench_{uuid.uuid4().hex[:8]}"
    engine = create_session_engine(url, autocommit=True, pool_size=2)
    upgrade(engine, table=table)
    handler = DatabaseHandler(engine, SessionConfig(table=table))
    seed = handler.load(None)
    seed.put({"user": "ada", "cart": ["apple", "pear"], "counter": 0, "prefs": {"theme": "dark"}})
    seed.save()
    session_id = seed.id

    def ours_read() -> None:
        handler.load(session_id).save()

    def ours_write() -> None:
        session = handler.load(session_id)
        session["counter"] += 1
        session.save()

    dsn = sa.make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)
    raw = psycopg.connect(dsn, autocommit=True)
    key = session_key_of(session_id)
    select = (
        f"SELECT key, id_hash, user_id, payload, version, created_at, last_activity, expires_at, ip_address, "
        f"user_agent FROM {table} WHERE key = %s AND expires_at > %s"
    )
    update = (
        f"UPDATE {table} SET id_hash=%s, user_id=%s, ip_address=%s, user_agent=%s, payload=%s, version=%s, "
        f"created_at=%s, last_activity=%s, expires_at=%s WHERE key = %s AND version = %s AND expires_at > %s"
    )

    def raw_read() -> None:
        raw.execute(select, (key, int(time.time()))).fetchone()

    def raw_write() -> None:
        now = int(time.time())
        row = raw.execute(select, (key, now)).fetchone()
        assert row is not None
        raw.execute(
            update, (row[1], row[2], row[8], row[9], row[3], row[4] + 1, row[5], now, now + 7200, row[0], row[4], now)
        )

    floor = psycopg.connect(dsn, autocommit=True).pgconn
    columns = "key, id_hash, user_id, payload, version, created_at, last_activity, expires_at, ip_address, user_agent"
    int8, varchar, bytea = 20, 1043, 17
    floor.prepare(
        b"bench_select",
        f"SELECT {columns} FROM {table} WHERE key = $1 AND expires_at > $2".encode(),
        [varchar, int8],
    )
    floor.prepare(
        b"bench_update",
        (
            f"UPDATE {table} SET id_hash=$1, user_id=$2, ip_address=$3, user_agent=$4, payload=$5, version=$6, "
            "created_at=$7, last_activity=$8, expires_at=$9 WHERE key = $10 AND version = $11 AND expires_at > $12"
        ).encode(),
        [varchar, varchar, varchar, varchar, bytea, int8, int8, int8, int8, varchar, int8, int8],
    )
    binary_key = key.encode()

    def int8_value(n: int) -> bytes:
        return n.to_bytes(8, "big", signed=True)

    def libpq_select(now: int) -> tuple[bytes | None, ...]:
        result = floor.exec_prepared(b"bench_select", [binary_key, int8_value(now)], [1, 1], 1)
        assert result.ntuples == 1
        return tuple(result.get_value(0, i) for i in range(10))

    def libpq_read() -> None:
        libpq_select(int(time.time()))

    def libpq_write() -> None:
        now = int(time.time())
        row = libpq_select(now)
        version = int.from_bytes(row[4] or b"", "big", signed=True)
        values = [row[1], row[2], row[8], row[9], row[3], int8_value(version + 1), row[5], int8_value(now),
                  int8_value(now + 7200), row[0], int8_value(version), int8_value(now)]  # fmt: skip
        result = floor.exec_prepared(b"bench_update", values, [1] * 12, 1)
        assert result.command_tuples == 1

    results = []
    for name, ours, baseline, floor_fn in (
        ("read-only", ours_read, raw_read, libpq_read),
        ("write", ours_write, raw_write, libpq_write),
    ):
        theirs_rate = rate(baseline, seconds)
        ours_rate = rate(ours, seconds)
        floor_rate = rate(floor_fn, seconds)
        results.append((name, ours_rate, theirs_rate, floor_rate))
    raw.close()
    floor.finish()
    with engine.begin() as conn:
        conn.exec_driver_sql(f"DROP TABLE {table}")
        conn.exec_driver_sql(f"DROP TABLE sqla_sessions_alembic_version_{table}")
    engine.dispose()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--url", default="postgresql+psycopg://postgres@127.0.0.1:5432/postgres")
    parser.add_argument("--seconds", type=float, default=3.0)
    args = parser.parse_args()
    print(f"{'cycle':<10} {'sqla_sessions/s':>16} {'raw psycopg/s':>14} {'ratio':>6} {'raw libpq/s':>12} {'ratio':>6}")
    for name, ours, raw, floor in run(args.url, args.seconds):
        print(f"{name:<10} {ours:>16.0f} {raw:>14.0f} {ours / raw:>6.2f} {floor:>12.0f} {ours / floor:>6.2f}")


if __name__ == "__main__":
    main()
