"""Blocking-session lock hand-off latency: from the holder releasing until the waiter proceeds.

    python benchmarks/lock_handoff.py [--pg URL] [--rounds 200]

PostgreSQL hands a row lock over inside the server at COMMIT/ROLLBACK; the SQLite fallback is a lease
the waiter polls for (5 ms, growing to 50 ms). Prints median and p99 for each, and their ratio.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import threading
import time
import uuid
from pathlib import Path

from sqla_sessions import DatabaseHandler, SessionConfig, upgrade
from sqla_sessions.store.handlers.engines import create_session_engine
from sqla_sessions.store.locking import BlockingSession


def measure(handler: DatabaseHandler, rounds: int) -> list[float]:
    seed = handler.load(None)
    seed["n"] = 0
    seed.save()
    session_id = seed.id
    latencies = []
    for _ in range(rounds):
        holder = BlockingSession.open(handler, session_id)
        acquired: list[float] = []
        waiter = threading.Thread(target=_open_and_stamp, args=(handler, session_id, acquired))
        waiter.start()
        time.sleep(0.02)  # the waiter is waiting now
        released_at = time.perf_counter()
        holder.release()
        waiter.join()
        latencies.append(acquired[0] - released_at)
    return latencies


def _open_and_stamp(handler: DatabaseHandler, session_id: str, stamps: list[float]) -> None:
    held = BlockingSession.open(handler, session_id)
    stamps.append(time.perf_counter())
    held.release()


def summary(latencies: list[float]) -> tuple[float, float]:
    ordered = sorted(latencies)
    return statistics.median(ordered) * 1000, ordered[int(len(ordered) * 0.99) - 1] * 1000


def run(pg: str, rounds: int) -> dict[str, tuple[float, float]]:
    """Return {store: (median ms, p99 ms)} for PostgreSQL's row lock and the SQLite lease."""
    table = f"bench_{uuid.uuid4().hex[:8]}"
    config = SessionConfig(table=table)
    results: dict[str, tuple[float, float]] = {}
    pg_engine = create_session_engine(pg, autocommit=True)
    upgrade(create_session_engine(pg), table=table)
    results["postgresql (row lock)"] = summary(measure(DatabaseHandler(pg_engine, config), rounds))
    with pg_engine.begin() as conn:
        conn.exec_driver_sql(f"DROP TABLE {table}")
        conn.exec_driver_sql(f"DROP TABLE sqla_sessions_alembic_version_{table}")
    pg_engine.dispose()

    with tempfile.TemporaryDirectory() as folder:
        url = f"sqlite:///{Path(folder) / 'bench.db'}"
        upgrade(url, table=table)
        sqlite = DatabaseHandler(url, config)
        results["sqlite (lease, polled)"] = summary(measure(sqlite, rounds))
        sqlite.close()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--pg", default="postgresql+psycopg://postgres@127.0.0.1:5432/postgres")
    parser.add_argument("--rounds", type=int, default=200)
    args = parser.parse_args()
    results = run(args.pg, args.rounds)

    print(f"{'lock hand-off':<24} {'median ms':>10} {'p99 ms':>8}")
    for name, (median, p99) in results.items():
        print(f"{name:<24} {median:>10.2f} {p99:>8.2f}")
    pg, lite = results["postgresql (row lock)"], results["sqlite (lease, polled)"]
    print(f"sqlite / postgresql: median x{lite[0] / pg[0]:.1f}, p99 x{lite[1] / pg[1]:.1f}")


if __name__ == "__main__":
    main()
