"""Contention: 50 concurrent writers on one session, each writing its own key, for a while.

    python benchmarks/contention.py [--pg URL] [--seconds 5] [--writers 50]

Prints saves per second, how many saves needed the locked merge, and lost keys (must be 0): at the
end every writer's key must hold the last value that writer saved.
"""

from __future__ import annotations

import argparse
import threading
import time
import uuid

from sqla_sessions import DatabaseHandler, SaveAction, SessionConfig, upgrade
from sqla_sessions.store.handlers.engines import create_session_engine


def run(url: str, seconds: float, writers: int) -> dict[str, float]:
    table = f"bench_{uuid.uuid4().hex[:8]}"
    upgrade(create_session_engine(url), table=table)
    engine = create_session_engine(url, autocommit=True, pool_size=writers, max_overflow=0)
    handler = DatabaseHandler(engine, SessionConfig(table=table))
    seed = handler.load(None)
    seed["seed"] = True
    seed.save()
    session_id = seed.id
    last: dict[int, int] = {}
    merged = saves = 0
    lock = threading.Lock()
    deadline = time.monotonic() + seconds

    def writer(n: int) -> None:
        nonlocal merged, saves
        value = 0
        while time.monotonic() < deadline:
            value += 1
            session = handler.load(session_id)
            session[f"w{n}"] = value
            action = session.save()
            with lock:
                saves += 1
                merged += action is SaveAction.MERGED
                last[n] = value

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(writers)]
    started = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.monotonic() - started
    final = handler.load(session_id).all()
    lost = sum(final.get(f"w{n}") != value for n, value in last.items())
    with engine.begin() as conn:
        conn.exec_driver_sql(f"DROP TABLE {table}")
        conn.exec_driver_sql(f"DROP TABLE sqla_sessions_alembic_version_{table}")
    engine.dispose()
    return {"saves_per_second": saves / elapsed, "merged_share": merged / max(saves, 1), "lost_keys": lost}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--pg", default="postgresql+psycopg://postgres@127.0.0.1:5432/postgres")
    parser.add_argument("--seconds", type=float, default=5)
    parser.add_argument("--writers", type=int, default=50)
    args = parser.parse_args()
    result = run(args.pg, args.seconds, args.writers)
    print(
        f"{args.writers} writers on one session: {result['saves_per_second']:.0f} saves/s, "
        f"{result['merged_share']:.0%} merged under the lock, {result['lost_keys']:.0f} lost keys"
    )


if __name__ == "__main__":
    main()
