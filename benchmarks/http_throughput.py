"""HTTP: Starlette + sqla_sessions on PostgreSQL vs Starlette's cookie sessions, same routes, same run.

    python benchmarks/http_throughput.py [--seconds 5] [--clients 64] [--pg URL]

The server (uvicorn, one worker) is pinned to core 0 and the load generator to core 1. 64 clients
each carry their own session cookie. Prints req/s, p50/p99 and the ratio to the cookie baseline for
a read-only route and for a route that increments a counter.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

from loadgen import Result, run  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start(factory: str, env: dict[str, str]) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    if factory.startswith(("flask_", "django_")):  # WSGI apps: gunicorn, one worker, threads
        command = ["taskset", "-c", "0", sys.executable, "-m", "gunicorn", "--workers", "1", "--worker-class",
                   "gthread", "--threads", "16", "--bind", f"127.0.0.1:{port}", "--log-level", "warning",
                   f"http_apps:{factory}()"]  # fmt: skip
    else:
        command = ["taskset", "-c", "0", sys.executable, "-m", "uvicorn", f"http_apps:{factory}", "--factory",
                   "--port", str(port), "--log-level", "warning", "--no-access-log"]  # fmt: skip
    process = subprocess.Popen(command, cwd=ROOT / "benchmarks", env=env)
    for _ in range(100):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return process, port
        except OSError:
            time.sleep(0.1)
    process.terminate()
    raise RuntimeError(f"server {factory} did not start")


def measure(factory: str, env: dict[str, str], clients: int, seconds: float) -> dict[str, Result]:
    process, port = start(factory, env)
    try:
        # Every client first gets a session of its own (one write), then the measured runs.
        _, cookies = asyncio.run(run("127.0.0.1", port, "POST", "/increment", [""] * clients, 0.3, warmup=0))
        results = {}
        read, cookies = asyncio.run(run("127.0.0.1", port, "GET", "/read", cookies, seconds))
        results["read-only"] = read
        increment, cookies = asyncio.run(run("127.0.0.1", port, "POST", "/increment", cookies, seconds))
        results["increment"] = increment
        return results
    finally:
        process.terminate()
        process.wait(10)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=5)
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--pg", default="postgresql+psycopg://postgres@127.0.0.1:5432/postgres")
    args = parser.parse_args()
    os.sched_setaffinity(0, {1})  # the load generator stays off the server's core

    from sqla_sessions import upgrade
    from sqla_sessions.store.handlers.engines import create_session_engine

    table = f"bench_{uuid.uuid4().hex[:8]}"
    engine = create_session_engine(args.pg)
    upgrade(engine, table=table)
    env = {**os.environ, "SQLA_SESSIONS_DATABASE_URL": args.pg, "SQLA_SESSIONS_TABLE": table,
           "PYTHONPATH": str(ROOT)}  # fmt: skip
    try:
        baseline = measure("cookie_app", env, args.clients, args.seconds)
        ours = measure("sqla_app", env, args.clients, args.seconds)
    finally:
        with engine.begin() as conn:
            conn.exec_driver_sql(f"DROP TABLE {table}")
            conn.exec_driver_sql(f"DROP TABLE sqla_sessions_alembic_version_{table}")
        engine.dispose()

    print(f"{'route':<10} {'store':<22} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'errors':>7} {'ratio':>6}")
    for route in ("read-only", "increment"):
        base = baseline[route]
        for name, result in (("starlette cookie", base), ("sqla_sessions (pg)", ours[route])):
            ratio = result.rps / base.rps
            print(
                f"{route:<10} {name:<22} {result.rps:>8.0f} {result.p50:>8.2f} {result.p99:>8.2f} "
                f"{result.errors:>7} {ratio:>6.2f}"
            )


if __name__ == "__main__":
    main()


def gc_under_load(pg: str, rows: int, seconds: float, clients: int = 64) -> dict[str, float]:
    """Delete *rows* expired sessions with `handler.gc()` while the read-only load runs.

    Returns rows/s of the sweep and the load's p99 during the sweep vs without it (same run).
    """
    import threading

    from sqla_sessions import DatabaseHandler, SessionConfig, upgrade
    from sqla_sessions.store.handlers.engines import create_session_engine

    table = f"bench_{uuid.uuid4().hex[:8]}"
    engine = create_session_engine(pg)
    upgrade(engine, table=table)
    env = {**os.environ, "SQLA_SESSIONS_DATABASE_URL": pg, "SQLA_SESSIONS_TABLE": table, "PYTHONPATH": str(ROOT)}
    process, port = start("sqla_app", env)
    try:
        _, cookies = asyncio.run(run("127.0.0.1", port, "POST", "/increment", [""] * clients, 0.3, warmup=0))
        with engine.begin() as conn:  # a backlog of expired sessions, as after a weekend without GC
            conn.exec_driver_sql(
                f"INSERT INTO {table} (key, id_hash, payload, version, created_at, last_activity, expires_at) "
                f"SELECT md5(i::text), md5('h' || i) || md5('x' || i), '\\x7b7d', 1, 0, 0, 1 "
                f"FROM generate_series(1, {rows}) AS i"
            )
            conn.exec_driver_sql(f"ANALYZE {table}")
        quiet, cookies = asyncio.run(run("127.0.0.1", port, "GET", "/read", cookies, seconds))
        handler = DatabaseHandler(create_session_engine(pg, autocommit=True), SessionConfig(table=table))
        swept: dict[str, float] = {}

        def sweep() -> None:
            started = time.perf_counter()
            swept["rows"] = handler.gc(batch_size=1000)
            swept["seconds"] = time.perf_counter() - started

        sweeper = threading.Thread(target=sweep)
        sweeper.start()
        during: list[Result] = []
        while sweeper.is_alive():
            result, cookies = asyncio.run(run("127.0.0.1", port, "GET", "/read", cookies, 2.0, warmup=0))
            during.append(result)
        sweeper.join()
        latencies = [x for r in during for x in r.latencies]
        loaded = Result(sum(r.requests for r in during), sum(r.seconds for r in during), latencies, 0)
        return {
            "rows": swept["rows"],
            "rows_per_second": swept["rows"] / swept["seconds"],
            "p99_quiet_ms": quiet.p99,
            "p99_during_gc_ms": loaded.p99,
            "p99_ratio": loaded.p99 / quiet.p99,
            "rps_quiet": quiet.rps,
            "rps_during_gc": loaded.rps,
        }
    finally:
        process.terminate()
        process.wait(10)
        with engine.begin() as conn:
            conn.exec_driver_sql(f"DROP TABLE {table}")
            conn.exec_driver_sql(f"DROP TABLE sqla_sessions_alembic_version_{table}")
        engine.dispose()
