"""HTTP throughput measured with wrk (C), so the load generator is never the bottleneck.

    python benchmarks/wrk_http.py [--seconds 8] [--connections 64] [--pg URL] [--apps A,B] [--compare REV]

One uvicorn worker pinned to core 0, wrk pinned to core 1 with one thread per connection, so each
connection keeps one session cookie of its own (a Lua script hands thread *i* cookie *i*). Per app
and route it prints req/s, p50/p99 latency, server CPU per request and the server's utilisation
(from /proc), and the ratio to Starlette's cookie sessions in the same run; the cookie baseline's
utilisation shows whether the server, not wrk, was the bottleneck.

`--apps` picks the apps of `http_apps.py` (the first is the baseline). `--compare REV` also serves
the others from a checkout of git revision REV (a worktree in a temporary folder), for before/after
measurements of a change.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from urllib.request import Request, urlopen

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

from http_throughput import start  # noqa: E402

TICKS = os.sysconf("SC_CLK_TCK")

LUA = r"""
local cookies = {}
local counter = 0
for line in io.lines(os.getenv("WRK_COOKIES")) do table.insert(cookies, line) end
local threads = {}
function setup(thread)
  counter = counter + 1
  thread:set("cookie", cookies[(counter - 1) % #cookies + 1])
  table.insert(threads, thread)
end
function init(args)
  wrk.headers["Cookie"] = cookie
  wrk.method = os.getenv("WRK_METHOD")
end
function done(summary, latency, requests)
  io.write(string.format("JSON {\"requests\": %d, \"errors\": %d, \"p50\": %d, \"p99\": %d}\n",
    summary.requests, summary.errors.status + summary.errors.connect + summary.errors.read +
    summary.errors.write + summary.errors.timeout, latency:percentile(50), latency:percentile(99)))
end
"""


@dataclass
class Figures:
    rps: float
    p50_ms: float
    p99_ms: float
    cpu_ms_per_request: float
    """The server's CPU (all its processes: gunicorn's worker too) per request."""
    utilisation: float
    """The server's CPU over the wall time: near 1.0, the server (not wrk) was the bottleneck."""
    errors: int
    connections_opened: int
    """PostgreSQL connections established during the run (a pool that churns shows here)."""
    pg_cpu_ms_per_request: float
    """PostgreSQL's CPU (every postgres process on the machine) per request."""
    statements_per_request: float
    """Transactions PostgreSQL committed or rolled back in the benchmark database, per request:
    in autocommit every statement is one (a lost-race merge's BEGIN…COMMIT counts once)."""

    # Kept for the callers that print the Python load generator's fields.
    @property
    def p50(self) -> float:
        return self.p50_ms

    @property
    def p99(self) -> float:
        return self.p99_ms


def database_counters(pg_url: str) -> tuple[int, int]:
    """PostgreSQL's counts for the benchmark database: sessions (connections) ever established
    (PostgreSQL 14+), and transactions ended. Backends report their counts when they go idle, at
    most a second late: callers wait that long after a run."""
    import sqlalchemy as sa

    engine = sa.create_engine(pg_url, poolclass=sa.pool.NullPool)
    with engine.connect() as conn:
        row = conn.execute(
            sa.text(
                "SELECT sessions, xact_commit + xact_rollback FROM pg_stat_database WHERE datname = current_database()"
            )
        ).one()
    engine.dispose()
    return int(row[0]) - 1, int(row[1])  # less this query's own connection


def _stat(pid: int) -> list[str]:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def cpu_seconds(pid: int) -> float:
    """CPU of *pid* and of its live children (gunicorn's workers), user and system."""
    total = 0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = _stat(int(entry.name))
        except (FileNotFoundError, ProcessLookupError):
            continue
        if int(entry.name) == pid or int(fields[1]) == pid:
            total += int(fields[11]) + int(fields[12])
    return total / TICKS


def postgres_cpu_seconds() -> float:
    """CPU of every PostgreSQL process, with what exited backends left to the postmaster."""
    total = 0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if (entry / "comm").read_text().strip() != "postgres":
                continue
            fields = _stat(int(entry.name))
        except (FileNotFoundError, ProcessLookupError):
            continue
        total += sum(int(value) for value in fields[11:15])
    return total / TICKS


def serve(factory: str, env: dict[str, str], code: Path) -> tuple[subprocess.Popen[bytes], int]:
    """The app served by one uvicorn worker on core 0, importing sqla_sessions from *code*."""
    return start(factory, {**env, "PYTHONPATH": f"{code}{os.pathsep}{ROOT / 'benchmarks'}"})


def new_cookie(port: int) -> str:
    with urlopen(Request(f"http://127.0.0.1:{port}/increment", method="POST"), timeout=10) as response:
        header = response.headers.get("set-cookie", "")
    match = re.match(r"([A-Za-z0-9_.-]*session[A-Za-z0-9_]*=[^;]+)", header)  # session=, sessionid= (Django)
    if match is None:
        raise RuntimeError(f"no session cookie in {header!r}")
    return match.group(1)


def wrk(port: int, path: str, method: str, cookies: Path, connections: int, seconds: float) -> dict[str, int]:
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as script:
        script.write(LUA)
    env = {**os.environ, "WRK_COOKIES": str(cookies), "WRK_METHOD": method}
    duration = f"{max(1, round(seconds))}s"
    command = ["taskset", "-c", "1", "wrk", "-t", str(connections), "-c", str(connections), "-d", duration,
               "--latency", "-s", script.name, f"http://127.0.0.1:{port}{path}"]  # fmt: skip
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"wrk failed: {done.stdout} {done.stderr}")
    out = done.stdout
    os.unlink(script.name)
    line = next(line for line in out.splitlines() if line.startswith("JSON "))
    return dict(json.loads(line[5:]))


def measure(
    factory: str, env: dict[str, str], code: Path, connections: int, seconds: float, pg_url: str
) -> dict[str, Figures]:
    process, port = serve(factory, env, code)
    try:
        with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as jar:
            jar.write("\n".join(new_cookie(port) for _ in range(connections)) + "\n")
        results = {}
        for route, path, method in (("read", "/read", "GET"), ("increment", "/increment", "POST")):
            wrk(port, path, method, Path(jar.name), connections, 1.0)  # warm up: connections, prepared statements
            time.sleep(1.2)  # the warm-up's counts reach pg_stat_database
            opened_before, ended_before = database_counters(pg_url)
            pg_before = postgres_cpu_seconds()
            cpu_before, started = cpu_seconds(process.pid), time.monotonic()
            raw = wrk(port, path, method, Path(jar.name), connections, seconds)
            cpu, wall = cpu_seconds(process.pid) - cpu_before, time.monotonic() - started
            pg_cpu = postgres_cpu_seconds() - pg_before
            time.sleep(1.2)
            opened_after, ended_after = database_counters(pg_url)
            requests = max(raw["requests"], 1)
            results[route] = Figures(
                rps=raw["requests"] / seconds,
                p50_ms=raw["p50"] / 1000,
                p99_ms=raw["p99"] / 1000,
                cpu_ms_per_request=1000 * cpu / requests,
                utilisation=cpu / wall,
                errors=raw["errors"],
                connections_opened=opened_after - opened_before,
                pg_cpu_ms_per_request=1000 * pg_cpu / requests,
                # less the one counter query between the two reads
                statements_per_request=max(0, ended_after - ended_before - 1) / requests,
            )
        os.unlink(jar.name)
        return results
    finally:
        process.terminate()
        process.wait(10)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=8)
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--pg", default="postgresql+psycopg://postgres@127.0.0.1:5432/postgres")
    parser.add_argument("--compare", metavar="REV", help="also serve sqla_sessions from this git revision")
    parser.add_argument(
        "--apps",
        default="cookie,sqla,sqla_defaults",
        help="apps of benchmarks/http_apps.py, without _app (e.g. flask_cookie,flask_sqla,starsessions)",
    )
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        raise SystemExit("wrk is not installed (Debian: apt-get install wrk)")

    import sqlalchemy as sa

    from sqla_sessions import upgrade

    table = f"bench_{uuid.uuid4().hex[:8]}"
    upgrade(args.pg, table=table)
    env = {**os.environ, "SQLA_SESSIONS_DATABASE_URL": args.pg, "SQLA_SESSIONS_TABLE": table}
    apps: list[tuple[str, str, Path, dict[str, str]]] = [
        (name, f"{name}_app", ROOT, env) for name in args.apps.split(",")
    ]
    tables = [table]
    worktree = None
    if args.compare:
        worktree = Path(tempfile.mkdtemp(prefix="sqla_sessions_rev_"))
        subprocess.run(["git", "worktree", "add", "--detach", str(worktree), args.compare], cwd=ROOT, check=True)
        # The revision gets a table its own migrations made (its schema, its indexes).
        tables.append(f"bench_{uuid.uuid4().hex[:8]}")
        migrate = f"from sqla_sessions import upgrade; upgrade({args.pg!r}, table={tables[-1]!r})"
        subprocess.run([sys.executable, "-c", migrate], cwd=worktree, check=True, env={**os.environ, "PYTHONPATH": "."})
        old_env = {**env, "SQLA_SESSIONS_TABLE": tables[-1]}
        for name in args.apps.split(",")[1:]:
            apps.append((f"{name} @ {args.compare}", f"{name}_app", worktree, old_env))
    try:
        figures = {
            name: measure(factory, app_env, code, args.connections, args.seconds, args.pg)
            for name, factory, code, app_env in apps
        }
    finally:
        if worktree is not None:
            subprocess.run(["git", "worktree", "remove", "--force", str(worktree)], cwd=ROOT, check=False)
        engine = sa.create_engine(args.pg)
        with engine.begin() as conn:
            for name in tables:
                conn.exec_driver_sql(f'DROP TABLE IF EXISTS "{name}"')
                conn.exec_driver_sql(f'DROP TABLE IF EXISTS "sqla_sessions_alembic_version_{name}"')
        engine.dispose()

    baseline = next(iter(figures.values()))
    print(f"wrk, {args.connections} connections (one session each), {args.seconds:g} s per run, server on core 0")
    head = f"{'app':<32} {'route':<10} {'req/s':>8} {'ratio':>6} {'p50 ms':>7} {'p99 ms':>7}"
    print(f"{head} {'CPU/req':>9} {'util':>5} {'conns':>6} err")
    for name, routes in figures.items():
        for route, f in routes.items():
            ratio = f.rps / baseline[route].rps
            print(
                f"{name:<32} {route:<10} {f.rps:>8.0f} {ratio:>6.2f} {f.p50_ms:>7.2f} {f.p99_ms:>7.2f} "
                f"{f.cpu_ms_per_request:>7.3f}ms {f.utilisation:>5.0%} {f.connections_opened:>6} {f.errors}"
            )


if __name__ == "__main__":
    main()
