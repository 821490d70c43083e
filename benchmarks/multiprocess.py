"""Many processes on one PostgreSQL: 4 uvicorn processes and 2 `dramatiq` worker processes behind PgBouncer.

    python benchmarks/multiprocess.py [--seconds 20] [--connections 64] [--mix 70,20,10]

One command sets up everything and tears it down: a throwaway PostgreSQL database, a PgBouncer
(Debian's, run as the `postgres` user, transaction pooling, a server pool of `--pool` connections)
on a free port, the migrations run through it, 4 uvicorn processes of `benchmarks/multiprocess_app.py`
(separate ports, `prepared_statements=off` as PgBouncer < 1.21 needs), and one `dramatiq` CLI with 2
worker processes (Redis broker, a namespace of its own). Nothing is pinned: the 2 cores are shared
by all of them, PostgreSQL, PgBouncer and the load generator, as on a small all-in-one host.

Load: one wrk per uvicorn port, all at once, each with a quarter of the connections and one session
cookie per connection (cookies are handed out round-robin per request, so now and then two of a
session's requests overlap, as a user's tabs would: the merge path is exercised too). The Lua script
mixes per request: GET /read, POST /write/{name} (sets a new key and increments `writes`), POST
/job/{name} (enqueues a job that sets a new key and increments `jobs` in a worker). Every 2xx
answers with its key, which wrk records: after the run the queue is drained and every session is
read back (GET /dump); a key acknowledged but absent is a lost key.

It prints throughput per route and in total, p50/p99 (wrk's, over every request, and the server's
own per route), CPU per request of the uvicorn processes (and of the workers, PgBouncer and the
PostgreSQL backends; the machine's busy share), the PostgreSQL connections opened during start-up,
warm-up, run and drain (PgBouncer's log, and the backends' `backend_start`: they must stay flat,
the server pool is filled during warm-up and then reused), PgBouncer's client and server
connections, the job backlog and drain time, and lost keys (must be 0). The exit
status is 1 when a key or a counter increment was lost, a response was not 2xx, a job was
dead-lettered or a process logged a traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.request import Request, urlopen

if TYPE_CHECKING:
    import psycopg

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "benchmarks"
TICKS = os.sysconf("SC_CLK_TCK")
WEB_PROCESSES = 4
WORKER_PROCESSES = 2
WORKER_THREADS = 4
TABLE = "mp_sessions"
QUEUE = "mp-jobs"  # multiprocess_app.QUEUE (not imported: that would create a broker here)
PG = "postgresql://postgres@127.0.0.1:5432/postgres"
REDIS_URL = "redis://127.0.0.1:6379/0"

LUA = r"""
-- One wrk process per uvicorn port. MP_COOKIES holds "index<TAB>cookie" lines; thread *slot* of
-- MP_THREADS takes every MP_THREADS-th line and hands its cookies out round-robin per request.
local threads = {}
local made = 0
function setup(thread)
  thread:set("slot", made)
  made = made + 1
  table.insert(threads, thread)
end

function init(args)
  local nthreads = tonumber(os.getenv("MP_THREADS"))
  mine = {}
  local i = 0
  for line in io.lines(os.getenv("MP_COOKIES")) do
    if i % nthreads == slot then
      local index, cookie = line:match("^(%d+)\t(.*)$")
      table.insert(mine, {index, cookie})
    end
    i = i + 1
  end
  tag = os.getenv("MP_TAG") .. slot
  read_upto = tonumber(os.getenv("MP_READ"))
  write_upto = read_upto + tonumber(os.getenv("MP_WRITE"))
  math.randomseed(tonumber(os.getenv("MP_SEED")) + slot)
  n = 0
  acked = {}
  routes = {r = 0, w = 0, j = 0}
  bad = 0
end

function request()
  n = n + 1
  local c = mine[(n - 1) % #mine + 1]
  local roll = math.random(100)
  local headers = {Cookie = c[2]}
  if roll <= read_upto then
    return wrk.format("GET", "/read", headers)
  end
  -- The key names the cookie it was sent with, so the check knows which session must hold it.
  if roll <= write_upto then
    return wrk.format("POST", "/write/w" .. c[1] .. "_" .. tag .. "_" .. n, headers)
  end
  return wrk.format("POST", "/job/j" .. c[1] .. "_" .. tag .. "_" .. n, headers)
end

function response(status, headers, body)
  if status >= 200 and status < 300 then
    local kind = body:sub(1, 1)
    routes[kind] = (routes[kind] or 0) + 1
    if kind == "w" or kind == "j" then
      acked[#acked + 1] = body
    end
  else
    bad = bad + 1
  end
end

function done(summary, latency, requests)
  local out = io.open(os.getenv("MP_OUT"), "w")
  for _, t in ipairs(threads) do
    for _, name in ipairs(t:get("acked")) do
      out:write("A ", name, "\n")
    end
    local r = t:get("routes")
    out:write(string.format("R %d %d %d %d\n", r.r or 0, r.w or 0, r.j or 0, t:get("bad")))
  end
  -- The whole latency histogram (value in us, count), so the four wrk processes merge exactly.
  for i = 1, #latency do
    local value, count = latency(i)
    out:write(string.format("L %d %d\n", value, count))
  end
  local e = summary.errors
  out:write(string.format("S %d %d %d %d %d %d\n", summary.requests, e.connect, e.read, e.write, e.status,
    e.timeout))
  out:close()
end
"""


# -- processes ----------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_port(port: int, process: subprocess.Popen[bytes], log: Path, seconds: float = 30) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"process exited with {process.returncode}: {log.read_text(errors='replace')[-3000:]}")
        with suppress(OSError):
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        time.sleep(0.1)
    raise RuntimeError(f"nothing listening on {port} after {seconds} s: {log.read_text(errors='replace')[-3000:]}")


def cpu_seconds(pid: int) -> float:
    """User + system CPU of one process (0 once it has gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return 0.0
    return (int(fields[11]) + int(fields[12])) / TICKS


def machine_busy() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine so far, from /proc/stat."""
    ticks = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    idle = ticks[3] + ticks[4]  # idle + iowait
    return (sum(ticks) - idle) / TICKS, sum(ticks) / TICKS


def with_children(pid: int) -> list[int]:
    """*pid* and its direct children (the dramatiq CLI forks its worker processes)."""
    found = [pid]
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with suppress(OSError, IndexError):
                if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    found.append(int(entry.name))
    return found


def stop(process: subprocess.Popen[bytes], seconds: float = 15) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(seconds)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)


@dataclass
class PgBouncer:
    folder: Path
    port: int
    process: subprocess.Popen[bytes]

    @property
    def log(self) -> Path:
        return self.folder / "pgbouncer.log"

    def pid(self) -> int:
        """PgBouncer's own pid (runuser forks it)."""
        return int((self.folder / "pgbouncer.pid").read_text().strip())

    def log_count(self, text: str) -> int:
        return self.log.read_text(errors="replace").count(text)


@contextmanager
def pgbouncer(pool: int) -> Iterator[PgBouncer]:
    """Debian's PgBouncer in transaction mode on a free port, as the postgres user (it refuses root),
    configured as tests/test_pgbouncer.py does."""
    binary = shutil.which("pgbouncer") or "/usr/sbin/pgbouncer"
    if not os.path.exists(binary):
        raise SystemExit("pgbouncer is not installed (Debian: apt-get install pgbouncer)")
    folder = Path(tempfile.mkdtemp(prefix="sqla_sessions_mp_pgbouncer_"))
    folder.chmod(0o755)  # the postgres user must reach its files
    port = free_port()
    (folder / "userlist.txt").write_text('"postgres" ""\n')
    (folder / "pgbouncer.ini").write_text(
        f"""[databases]
* = host=127.0.0.1 port=5432

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = {port}
unix_socket_dir =
auth_type = trust
auth_file = {folder / "userlist.txt"}
admin_users = postgres
pool_mode = transaction
default_pool_size = {pool}
max_client_conn = 1000
logfile = {folder / "pgbouncer.log"}
pidfile = {folder / "pgbouncer.pid"}
ignore_startup_parameters = extra_float_digits,options
"""
    )
    shutil.chown(folder, "postgres")
    for child in folder.iterdir():
        shutil.chown(child, "postgres")
    command = [binary, str(folder / "pgbouncer.ini")]
    if os.geteuid() == 0:
        command = ["runuser", "-u", "postgres", "--", *command]
    console = folder / "console.log"
    with console.open("wb") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
    bouncer = PgBouncer(folder, port, process)
    try:
        wait_for_port(port, process, console)
        yield bouncer
    finally:
        stop(process)
        with suppress(OSError, ValueError):
            os.kill(bouncer.pid(), signal.SIGTERM)  # in case runuser did not pass the signal on
        shutil.rmtree(folder, ignore_errors=True)


@contextmanager
def database() -> Iterator[str]:
    """A throwaway PostgreSQL database, dropped (with its connections) at the end."""
    import psycopg

    name = f"bench_mp_{secrets.token_hex(4)}"
    with psycopg.connect(PG, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield name
    finally:
        with psycopg.connect(PG, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


# -- measurements ------------------------------------------------------------------------------------


@dataclass
class Sample:
    at: float
    phase: str
    opened: int  # server connections PgBouncer has opened so far (its log: exact and immediate)
    logins: int  # client connections PgBouncer has accepted so far
    backends: int  # PostgreSQL: the database's connections right now
    clients: int  # PgBouncer: client connections (active + waiting)
    waiting: int
    servers: int  # PgBouncer: server connections, in any state
    backlog: int  # jobs enqueued and not yet acked by a worker


class Sampler(threading.Thread):
    """Every half second: PostgreSQL's and PgBouncer's connection counts and the job backlog."""

    def __init__(self, dbname: str, bouncer: PgBouncer, namespace: str) -> None:
        super().__init__(daemon=True)
        import redis

        self.dbname = dbname
        self.bouncer = bouncer
        self.pg, self.admin = self.connect()
        self.redis = redis.Redis.from_url(REDIS_URL)
        self.messages = f"{namespace}:{QUEUE}.msgs"
        self.phase = "start"
        self.samples: list[Sample] = []
        self.halt = threading.Event()
        self.lock = threading.Lock()

    def connect(self) -> tuple[psycopg.Connection[Any], psycopg.Connection[Any]]:
        import psycopg

        # Connected to the postgres database directly, so the sampler is not one of the bench database's sessions.
        pg = psycopg.connect(PG, autocommit=True)
        # PgBouncer's console speaks the simple query protocol only: psycopg uses it for a query without
        # parameters, until it prepares a query run often (hence prepare_threshold=None).
        admin = psycopg.connect(
            host="127.0.0.1",
            port=self.bouncer.port,
            user="postgres",
            dbname="pgbouncer",
            autocommit=True,
            prepare_threshold=None,
        )
        return pg, admin

    def query(self, admin: bool, sql: str, *params: Any) -> list[dict[str, Any]]:
        """One query, reconnecting once if the server went away (a PostgreSQL restart by someone else)."""
        import psycopg

        with self.lock:
            for attempt in (1, 2):
                try:
                    cursor = (self.admin if admin else self.pg).execute(sql, params or None)
                    names = [column.name for column in cursor.description or ()]
                    return [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]
                except psycopg.OperationalError:
                    if attempt == 2:
                        raise
                    for conn in (self.pg, self.admin):
                        conn.close()
                    self.pg, self.admin = self.connect()
        raise AssertionError("unreachable")

    def backends(self) -> list[tuple[int, datetime]]:
        """The database's backends: (pid, when it started). pg_stat_database.sessions would count the
        ones that came and went too, but a backend reports it only when it next flushes its statistics
        (up to 10 s late when idle): the count per phase would smear across phases."""
        rows = self.query(False, "SELECT pid, backend_start FROM pg_stat_activity WHERE datname = %s", self.dbname)
        return [(int(row["pid"]), row["backend_start"]) for row in rows]

    def clock(self) -> datetime:
        """PostgreSQL's clock, to compare with backend_start."""
        return self.query(False, "SELECT clock_timestamp() AS now")[0]["now"]  # type: ignore[no-any-return]

    def take(self) -> Sample:
        stats = self.query(False, "SELECT numbackends FROM pg_stat_database WHERE datname = %s", self.dbname)
        pool = next((p for p in self.query(True, "SHOW POOLS") if p["database"] == self.dbname), {})
        servers = sum(int(pool.get(k, 0)) for k in ("sv_active", "sv_idle", "sv_used", "sv_tested", "sv_login"))
        sample = Sample(
            at=time.monotonic(),
            phase=self.phase,
            opened=self.bouncer.log_count("new connection to server"),
            logins=self.bouncer.log_count("login attempt"),
            backends=int(stats[0]["numbackends"]),
            clients=int(pool.get("cl_active", 0)) + int(pool.get("cl_waiting", 0)),
            waiting=int(pool.get("cl_waiting", 0)),
            servers=servers,
            backlog=int(self.redis.hlen(self.messages)),
        )
        self.samples.append(sample)
        return sample

    def run(self) -> None:
        while not self.halt.wait(0.5):
            try:
                self.take()
            except Exception as exc:  # a lost sample is no reason to stop sampling
                print(f"sampler: {exc!r}", file=sys.stderr)

    def close(self) -> None:
        self.halt.set()
        self.join(5)
        self.pg.close()
        self.admin.close()
        self.redis.close()

    def during(self, phase: str) -> list[Sample]:
        return [s for s in self.samples if s.phase == phase]


@dataclass
class WrkRun:
    acked: list[str] = field(default_factory=list)
    routes: Counter[str] = field(default_factory=Counter)
    non_2xx: int = 0
    latency: Counter[int] = field(default_factory=Counter)  # microseconds -> requests
    requests: int = 0
    socket_errors: dict[str, int] = field(default_factory=dict)
    wall: float = 0.0

    def percentile(self, p: float) -> float:
        """Latency percentile in milliseconds, over all four wrk processes' merged histograms."""
        total, seen = sum(self.latency.values()), 0
        for value in sorted(self.latency):
            seen += self.latency[value]
            if seen >= total * p / 100:
                return value / 1000
        return 0.0


def run_wrk(
    phase: str, ports: list[int], jars: list[Path], seconds: int, threads: int, connections: int, mix: list[int]
) -> WrkRun:
    """One wrk per port, all at once; their outputs merged."""
    folder = Path(tempfile.mkdtemp(prefix="sqla_sessions_mp_wrk_"))
    script = folder / "mix.lua"
    script.write_text(LUA)
    processes = []
    started = time.monotonic()
    for n, (port, jar) in enumerate(zip(ports, jars, strict=True)):
        env = {**os.environ, "MP_COOKIES": str(jar), "MP_THREADS": str(threads), "MP_TAG": f"{phase}{n}x",
               "MP_READ": str(mix[0]), "MP_WRITE": str(mix[1]), "MP_SEED": str(1000 * n + len(phase)),
               "MP_OUT": str(folder / f"{n}.out")}  # fmt: skip
        per = connections // len(ports)
        command = ["wrk", "-t", str(threads), "-c", str(per), "-d", f"{seconds}s", "--timeout", "10s", "-s",
                   str(script), f"http://127.0.0.1:{port}"]  # fmt: skip
        processes.append(subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
    result = WrkRun()
    for n, process in enumerate(processes):
        out, _ = process.communicate()
        if process.returncode != 0 or not (folder / f"{n}.out").exists():
            raise RuntimeError(f"wrk on port {ports[n]} failed: {out.decode(errors='replace')}")
        for line in (folder / f"{n}.out").read_text().splitlines():
            kind, _, rest = line.partition(" ")
            if kind == "A":
                result.acked.append(rest)
            elif kind == "R":
                reads, writes, jobs, bad = map(int, rest.split())
                result.routes.update(read=reads, write=writes, job=jobs)
                result.non_2xx += bad
            elif kind == "L":
                value, count = map(int, rest.split())
                result.latency[value] += count
            elif kind == "S":
                requests, *errors = map(int, rest.split())
                result.requests += requests
                for name, count in zip(("connect", "read", "write", "status", "timeout"), errors, strict=True):
                    result.socket_errors[name] = result.socket_errors.get(name, 0) + count
    result.wall = time.monotonic() - started
    shutil.rmtree(folder, ignore_errors=True)
    return result


def http(port: int, method: str, path: str, cookie: str | None = None) -> tuple[int, str, list[str]]:
    headers = {"Cookie": cookie} if cookie else {}
    with urlopen(Request(f"http://127.0.0.1:{port}{path}", method=method, headers=headers), timeout=30) as response:
        return response.status, response.read().decode(), response.headers.get_all("set-cookie") or []


def server_stats(ports: list[int]) -> dict[str, list[tuple[int, float]]]:
    """The server-side samples of every uvicorn process since the last call (each call starts over)."""
    merged: dict[str, list[tuple[int, float]]] = {}
    for port in ports:
        for route, samples in json.loads(http(port, "GET", "/_stats")[1]).items():
            merged.setdefault(route, []).extend((int(s), float(t)) for s, t in samples)
    return merged


def quantile(values: list[float], p: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * p / 100))]


@dataclass
class Check:
    acknowledged: Counter[str] = field(default_factory=Counter)  # write / job
    lost: Counter[str] = field(default_factory=Counter)
    short: Counter[str] = field(default_factory=Counter)  # counter increments missing
    unacked_landed: Counter[str] = field(default_factory=Counter)  # in flight when wrk stopped, landed anyway
    examples: list[str] = field(default_factory=list)


def verify(ports: list[int], cookies: list[str], acked: list[str]) -> Check:
    """Read every session back and compare it with what the server acknowledged."""
    check = Check()
    by_session: dict[int, list[str]] = {}
    for name in acked:
        by_session.setdefault(int(name[1:].split("_", 1)[0]), []).append(name)
    for index, cookie in enumerate(cookies):
        status, body, _ = http(ports[index % len(ports)], "GET", "/dump", cookie)
        stored = json.loads(body)
        for kind, route, counter in (("w", "write", "writes"), ("j", "job", "jobs")):
            names = [name for name in by_session.get(index, []) if name[0] == kind]
            check.acknowledged[route] += len(names)
            missing = [name for name in names if name not in stored]
            check.lost[route] += len(missing)
            check.examples.extend(missing[:3])
            count = int(stored.get(counter, 0))
            check.short[route] += max(0, len(names) - count)
            check.unacked_landed[route] += max(0, count - len(names))
    return check


def log_problems(logs: list[Path]) -> list[str]:
    """Lines that mean something went wrong in a server or worker process."""
    markers = ("Traceback", "ERROR", "dropped", "failed after the session was saved", "is gone")
    found = []
    for log in logs:
        for line in log.read_text(errors="replace").splitlines():
            if any(marker in line for marker in markers):
                found.append(f"{log.name}: {line}")
    return found


# -- the run -----------------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=int, default=20, help="measured run (whole seconds, wrk's unit)")
    parser.add_argument("--warmup", type=int, default=3, help="seconds of the same load before measuring")
    parser.add_argument("--connections", type=int, default=64, help="wrk connections in all (one session each)")
    parser.add_argument("--wrk-threads", type=int, default=1, help="threads per wrk process (4 processes)")
    parser.add_argument("--pool", type=int, default=10, help="PgBouncer's default_pool_size (server connections)")
    parser.add_argument("--mix", default="70,20,10", help="percent of read, write and job requests")
    args = parser.parse_args()
    mix = [int(part) for part in args.mix.split(",")]
    if len(mix) != 3 or sum(mix) != 100:
        parser.error("--mix takes three percentages adding up to 100")
    if args.connections % (WEB_PROCESSES * args.wrk_threads):
        parser.error(f"--connections must be a multiple of {WEB_PROCESSES * args.wrk_threads}")
    if shutil.which("wrk") is None:
        raise SystemExit("wrk is not installed (Debian: apt-get install wrk)")

    from sqla_sessions import upgrade

    namespace = f"sqla-sessions-mp-{secrets.token_hex(4)}"
    logs_dir = Path(tempfile.mkdtemp(prefix="sqla_sessions_mp_logs_"))
    processes: list[subprocess.Popen[bytes]] = []
    handles: list[Any] = []
    try:
        with database() as dbname, pgbouncer(args.pool) as bouncer:
            url = f"postgresql+psycopg://postgres@127.0.0.1:{bouncer.port}/{dbname}"
            upgrade(url, table=TABLE)  # the migrations go through PgBouncer too
            env = {
                **os.environ,
                "PYTHONPATH": os.pathsep.join([str(ROOT), str(BENCH)]),
                "SQLA_SESSIONS_DATABASE_URL": url,
                "SQLA_SESSIONS_TABLE": TABLE,
                "SQLA_SESSIONS_PREPARED_STATEMENTS": "off",  # PgBouncer 1.18 in transaction mode
                "SQLA_SESSIONS_LOTTERY": "0,1",  # no inline sweeps: the same work in every request
                "MP_REDIS_URL": REDIS_URL,
                "MP_NAMESPACE": namespace,
            }

            def start(name: str, command: list[str]) -> tuple[subprocess.Popen[bytes], Path]:
                log = logs_dir / f"{name}.log"
                handle = log.open("wb")
                handles.append(handle)
                process = subprocess.Popen(command, cwd=BENCH, env=env, stdout=handle, stderr=subprocess.STDOUT)
                processes.append(process)
                return process, log

            # Sampled from before the first process starts: PostgreSQL's session counter then covers
            # everything but the migrations.
            sampler = Sampler(dbname, bouncer, namespace)
            baseline = sampler.take()
            sampler.phase = "setup"
            sampler.start()
            try:
                workers, workers_log = start(
                    "dramatiq",
                    [sys.executable, "-m", "dramatiq", "multiprocess_app", "--processes", str(WORKER_PROCESSES),
                     "--threads", str(WORKER_THREADS)],
                )  # fmt: skip
                ports, web, logs = [], [], [workers_log]
                for n in range(WEB_PROCESSES):
                    port = free_port()
                    process, log = start(
                        f"uvicorn-{n}",
                        [sys.executable, "-m", "uvicorn", "multiprocess_app:app", "--factory", "--port", str(port),
                         "--log-level", "warning", "--no-access-log"],
                    )  # fmt: skip
                    ports.append(port)
                    web.append(process)
                    logs.append(log)
                for port, process, log in zip(ports, web, logs[1:], strict=True):
                    wait_for_port(port, process, log)

                # One session per connection, created by a first write; the cookie is opaque (whatever
                # Set-Cookie says), sent back as it came.
                cookies, seeded = [], []
                for index in range(args.connections):
                    name = f"w{index}_seed"
                    status, body, set_cookie = http(ports[index % WEB_PROCESSES], "POST", f"/write/{name}")
                    if status != 200 or body != name or not set_cookie:
                        raise RuntimeError(f"seeding session {index}: {status} {body!r} {set_cookie!r}")
                    cookies.append("; ".join(header.split(";", 1)[0] for header in set_cookie))
                    seeded.append(name)
                jars = []
                for n in range(WEB_PROCESSES):
                    jar = logs_dir / f"cookies-{n}.txt"
                    jar.write_text("".join(f"{i}\t{cookies[i]}\n" for i in range(n, args.connections, WEB_PROCESSES)))
                    jars.append(jar)

                sampler.phase = "warmup"
                warm_start = sampler.take()
                warm = run_wrk("a", ports, jars, args.warmup, args.wrk_threads, args.connections, mix)
                server_stats(ports)  # start the server-side samples over

                # The measured run.
                sampler.phase = "run"
                before = sampler.take()
                run_started = sampler.clock()
                pids = {
                    "web": [p.pid for p in web],
                    "workers": with_children(workers.pid),
                    "pgbouncer": [bouncer.pid()],
                    "postgres": [pid for pid, _ in sampler.backends()],
                }
                cpu_before = {kind: {pid: cpu_seconds(pid) for pid in group} for kind, group in pids.items()}
                machine_before = machine_busy()
                measured = run_wrk("b", ports, jars, args.seconds, args.wrk_threads, args.connections, mix)
                after = sampler.take()
                machine_after = machine_busy()
                backends_after = sampler.backends()
                # Any backend started during the run (pids that came and went are in PgBouncer's count).
                started_in_run = sum(1 for _, started in backends_after if started >= run_started)
                pids["postgres"] = sorted(set(pids["postgres"]) | {pid for pid, _ in backends_after})
                cpu = {
                    kind: sum(cpu_seconds(pid) - cpu_before[kind].get(pid, 0.0) for pid in group)
                    for kind, group in pids.items()
                }
                timings = server_stats(ports)

                # Drain: every acked job must have run before the sessions are read back.
                sampler.phase = "drain"
                drain_started = time.monotonic()
                while sampler.take().backlog and time.monotonic() - drain_started < 180:
                    time.sleep(0.2)
                drain = time.monotonic() - drain_started
                drained = sampler.take()
            finally:
                sampler.close()
            import redis

            with redis.Redis.from_url(REDIS_URL) as client:
                dead = int(client.hlen(f"{namespace}:{QUEUE}.XQ.msgs"))
            check = verify(ports, cookies, seeded + warm.acked + measured.acked)
            for process in processes:
                stop(process)
            problems = log_problems(logs)
    finally:
        for process in processes:
            stop(process)
        for handle in handles:
            handle.close()
        with suppress(Exception):
            import redis

            with redis.Redis.from_url(REDIS_URL) as client:
                for key in client.scan_iter(f"{namespace}*"):
                    client.delete(key)
        shutil.rmtree(logs_dir, ignore_errors=True)

    # -- the report --
    seconds = args.seconds
    total_2xx = sum(measured.routes.values())
    run_samples = sampler.during("run")
    opened_run = after.opened - before.opened
    print(
        f"{WEB_PROCESSES} uvicorn + {WORKER_PROCESSES} dramatiq worker processes ({WORKER_THREADS} threads each) -> "
        f"PgBouncer (transaction mode, pool {args.pool}) -> PostgreSQL; all unpinned on {os.cpu_count()} cores"
    )
    print(
        f"wrk: {WEB_PROCESSES} processes x {args.wrk_threads} thread, {args.connections} connections and sessions, "
        f"mix read/write/job {args.mix}, {seconds} s measured after {args.warmup} s warm-up"
    )
    print(f"{'route':<8} {'req/s':>8} {'non-2xx':>8} {'server p50':>11} {'server p99':>11}")
    for route in ("read", "write", "job"):
        samples = timings.get(route, [])
        times = [t * 1000 for _, t in samples]
        bad = sum(1 for status, _ in samples if not 200 <= status < 300)
        print(
            f"{route:<8} {measured.routes[route] / seconds:>8.0f} {bad:>8} "
            f"{quantile(times, 50):>9.2f}ms {quantile(times, 99):>9.2f}ms"
        )
    print(
        f"{'all':<8} {total_2xx / seconds:>8.0f} {measured.non_2xx:>8}   wrk p50 {measured.percentile(50):.2f} ms, "
        f"p99 {measured.percentile(99):.2f} ms; socket errors {measured.socket_errors}"
    )
    jobs, per = max(measured.routes["job"], 1), 1000 / max(total_2xx, 1)
    print(
        f"CPU per request: uvicorn x{WEB_PROCESSES} {per * cpu['web']:.3f} ms ({cpu['web'] / measured.wall:.0%} "
        f"of a core), PostgreSQL backends {per * cpu['postgres']:.3f} ms, PgBouncer {per * cpu['pgbouncer']:.3f} ms; "
        f"dramatiq workers {1000 * cpu['workers'] / jobs:.3f} ms per job; machine "
        f"{(machine_after[0] - machine_before[0]) / (machine_after[1] - machine_before[1]):.0%} busy"
    )
    print(
        f"PostgreSQL connections opened: start-up and seeding {warm_start.opened - baseline.opened}, warm-up "
        f"{before.opened - warm_start.opened}, run {opened_run} ({60 * opened_run / seconds:.1f}/min), drain "
        f"{drained.opened - after.opened}; backends during run {min(s.backends for s in run_samples)}-"
        f"{max(s.backends for s in run_samples)}, of which started during it {started_in_run}"
    )
    print(
        f"PgBouncer during run: clients {min(s.clients for s in run_samples)}-{max(s.clients for s in run_samples)}"
        f" (waiting up to {max(s.waiting for s in run_samples)}), servers "
        f"{min(s.servers for s in run_samples)}-{max(s.servers for s in run_samples)}; "
        f"client logins during run {after.logins - before.logins}"
    )
    print(
        f"jobs: backlog up to {max(s.backlog for s in run_samples)} during run, {after.backlog} at its end, "
        f"drained in {drain:.1f} s; dead-lettered {dead}"
    )
    lost = sum(check.lost.values())
    short = sum(check.short.values())
    print(
        f"lost keys: {lost} of {sum(check.acknowledged.values())} acknowledged (writes {check.lost['write']} of "
        f"{check.acknowledged['write']}, jobs {check.lost['job']} of {check.acknowledged['job']}); counter increments "
        f"missing {short}; landed without an ack (in flight at wrk's stop) {sum(check.unacked_landed.values())}"
    )
    # Flat: PostgreSQL saw no new connection (PgBouncer's pool was filled during warm-up). Logins to
    # PgBouncer are shown above: a process's pool may still grow to its peak, which costs no backend.
    flat = opened_run == 0 and started_in_run == 0
    print(f"connections flat during the run: {'yes' if flat else 'NO'}")
    if check.examples:
        print("lost, e.g.:", ", ".join(check.examples[:10]))
    for line in problems[:20]:
        print("log:", line)
    failed = lost or short or measured.non_2xx or warm.non_2xx or dead or problems
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
