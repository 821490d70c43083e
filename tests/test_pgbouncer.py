"""Behind a real PgBouncer in transaction mode (Debian's package, a pool smaller than the clients):
migrations, two web processes, racing and sustained writes, blocking sessions and Dramatiq jobs.

PgBouncer < 1.21 hands each transaction to any server connection, so named prepared statements
break (`prepared statement "_pg3_5" does not exist`): `prepared_statements="off"` (or "auto" on
PgBouncer's port 6432) sends unnamed statements instead, and "auto" on any other port turns them off
at the server's first refusal. The PgBouncer here hands server connections out in turn
(`server_round_robin`), so consecutive statements of one client do reach different servers.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dramatiq
import httpx
import psycopg
import pytest
from dramatiq.brokers.stub import StubBroker
from sqlalchemy.engine import make_url

from sqla_sessions import DatabaseHandler, Session, SessionConfig, upgrade
from sqla_sessions.dramatiq import session_actor
from sqla_sessions.store.locking import BlockingSession
from tests.conftest import backend_for, unavailable
from tests.web.test_servers import cookie_of, free_port, sent, start_server, wait_until_up

TABLE = "pgb_sessions"
POOL_SIZE = 3


def _pgbouncer_binary() -> str | None:
    return shutil.which("pgbouncer") or next(
        (p for p in ("/usr/sbin/pgbouncer", "/usr/bin/pgbouncer") if os.path.exists(p)), None
    )


@pytest.fixture(scope="module")
def pgbouncer_url(tmp_root: Path) -> Iterator[str]:
    """PgBouncer on a free port in front of the test database, started as the postgres user."""
    binary = _pgbouncer_binary()
    if binary is None:
        unavailable("pgbouncer", FileNotFoundError("apt-get install pgbouncer"))
    backend = backend_for("postgresql", tmp_root)
    # The postgres user must reach the files: not below pytest's root-only temporary folder.
    folder = Path(tempfile.mkdtemp(prefix="sqla_sessions_pgbouncer_"))
    folder.chmod(0o755)
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
pool_mode = transaction
default_pool_size = {POOL_SIZE}
server_round_robin = 1
max_client_conn = 500
logfile = {folder / "pgbouncer.log"}
pidfile = {folder / "pgbouncer.pid"}
ignore_startup_parameters = extra_float_digits,options
"""
    )
    shutil.chown(folder, "postgres")
    for child in folder.iterdir():
        shutil.chown(child, "postgres")
    command = [binary, str(folder / "pgbouncer.ini")]
    if os.geteuid() == 0:  # PgBouncer refuses to run as root
        command = ["runuser", "-u", "postgres", "--", *command]
    console = folder / "console.log"
    with console.open("wb") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_until_up(process, port, console)
    except RuntimeError as exc:
        process.kill()
        unavailable("pgbouncer", exc)
    url = make_url(backend.url).set(port=port).render_as_string(hide_password=False)
    try:
        yield url
    finally:
        process.terminate()
        process.wait(10)
        if os.environ.get("SHOW_PGBOUNCER_LOG"):
            print((folder / "pgbouncer.log").read_text()[-2000:])
        shutil.rmtree(folder, ignore_errors=True)


def config(url: str) -> SessionConfig:
    return SessionConfig(database_url=url, table=TABLE, prepared_statements="off", lottery=(0, 1))


@pytest.fixture(scope="module")
def migrated(pgbouncer_url: str) -> str:
    upgrade(pgbouncer_url, table=TABLE)  # migrations run through PgBouncer too
    return pgbouncer_url


@pytest.fixture(scope="module")
def two_web_processes(migrated: str, tmp_root: Path) -> Iterator[list[str]]:
    env = {"SQLA_SESSIONS_TABLE": TABLE, "SQLA_SESSIONS_PREPARED_STATEMENTS": "off", "SQLA_SESSIONS_POOL_SIZE": "8"}
    previous = {name: os.environ.get(name) for name in env}
    os.environ.update(env)
    processes, urls, logs = [], [], []
    try:
        for n in range(2):
            port = free_port()
            log = tmp_root / f"pgbouncer-web-{n}.log"
            logs.append(log)
            with log.open("wb") as out:
                process = start_server("starlette", migrated, port, out, module="tests.web.same_key_apps")
            processes.append(process)
            wait_until_up(process, port, log)
            urls.append(f"http://127.0.0.1:{port}")
        yield urls
    finally:
        for process in processes:
            process.terminate()
            process.wait(10)
        for name, value in previous.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
    for log in logs:
        assert "Traceback" not in log.read_text(errors="replace"), log.read_text(errors="replace")[-3000:]


def _seed(base_url: str) -> str:
    with httpx.Client(base_url=base_url, timeout=30) as client:
        cookie = cookie_of(client.post("/edit/seed/-"))
    assert cookie
    return cookie


def _read(base_url: str, cookie: str) -> dict[str, Any]:
    with httpx.Client(base_url=base_url, timeout=30) as client:
        data: dict[str, Any] = client.get("/read", headers=sent(cookie)).json()
    return data


def test_sixty_concurrent_writes_on_one_session_through_two_processes(two_web_processes: list[str]) -> None:
    cookie = _seed(two_web_processes[0])

    async def fire() -> list[int]:
        async with httpx.AsyncClient(timeout=60, headers=sent(cookie)) as client:
            requests = [client.post(f"{two_web_processes[n % 2]}/edit/push/i{n}") for n in range(60)]
            return [r.status_code for r in await asyncio.gather(*requests)]

    assert asyncio.run(fire()) == [200] * 60
    assert sorted(_read(two_web_processes[1], cookie)["cart"]) == sorted(f"i{n}" for n in range(60))


def test_sustained_sequential_writes_from_several_users(two_web_processes: list[str]) -> None:
    users = [_seed(two_web_processes[n % 2]) for n in range(8)]
    statuses = []
    with httpx.Client(timeout=30) as client:
        for round_ in range(40):  # 320 requests, each user's alternating between the two processes
            for n, cookie in enumerate(users):
                response = client.post(f"{two_web_processes[(round_ + n) % 2]}/edit/increment/-", headers=sent(cookie))
                statuses.append(response.status_code)
    assert statuses == [200] * 320
    assert [_read(two_web_processes[0], cookie)["n"] for cookie in users] == [40] * 8


def test_blocking_requests_behind_pgbouncer_run_one_at_a_time(two_web_processes: list[str]) -> None:
    cookie = _seed(two_web_processes[0])

    async def fire() -> list[int]:
        async with httpx.AsyncClient(timeout=60, headers=sent(cookie)) as client:
            requests = [client.post(f"{two_web_processes[n % 2]}/blocking/edit/assign/-") for n in range(10)]
            return [r.status_code for r in await asyncio.gather(*requests)]

    assert asyncio.run(fire()) == [200] * 10
    assert _read(two_web_processes[0], cookie)["m"] == 10  # read-modify-write by assignment: none lost


def test_dramatiq_jobs_behind_pgbouncer(migrated: str) -> None:
    handler = DatabaseHandler(migrated, config(migrated))
    broker = StubBroker()
    broker.emit_after("process_boot")

    @session_actor(broker=broker, handler=handler, actor_name="pgbouncer_job")
    def record(session: Session, n: int) -> None:
        session.push("jobs", n)
        session.increment("done")

    worker = dramatiq.Worker(broker, worker_threads=4)
    worker.start()
    try:
        session = handler.load(None)
        session["seed"] = True
        session.save()
        for n in range(20):
            record.send(session.key or "", n)
        broker.join(record.queue_name, fail_fast=True)
        worker.join()
    finally:
        worker.stop()
        handler.close()
    stored = DatabaseHandler(migrated, config(migrated))
    try:
        data = stored.load(session.id)
        assert data["done"] == 20 and sorted(data["jobs"]) == list(range(20))
    finally:
        stored.close()


#: What the one warning of a detected pooler names: the setting that starts without prepared statements.
SETTING_NAMED = 'prepared_statements="off"'


def _open_every_server_connection(url: str) -> None:
    """Make PgBouncer open its whole pool: POOL_SIZE clients each hold a transaction at once."""
    conninfo = make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)
    clients = [psycopg.connect(conninfo) for _ in range(POOL_SIZE)]
    try:
        for client in clients:
            client.execute("SELECT 1")  # opens a transaction: each client holds its own server
    finally:
        for client in clients:
            client.close()


def test_default_settings_turn_prepared_statements_off_at_the_first_refusal(
    migrated: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Default settings on a port other than 6432: every load, save, merge and blocking request
    succeeds, and the switch to unnamed statements is said once."""
    _open_every_server_connection(migrated)
    handler = DatabaseHandler(migrated, SessionConfig(database_url=migrated, table=TABLE, lottery=(0, 1), pool_size=4))
    errors: list[BaseException] = []

    def user(n: int) -> str:
        session = handler.load(None)
        session["n"] = 0
        session.save()
        sid = session.id or ""
        for round_ in range(30):
            try:
                if round_ % 5 == 4:  # a blocking request: row lock, merge and commit in one transaction
                    held = BlockingSession.open(handler, sid)
                    held.session.increment("n")
                    held.finish()
                else:
                    loaded = handler.load(sid)
                    loaded.increment("n")
                    loaded.save()
            except Exception as exc:  # collected: every one is a failure
                errors.append(exc)
        return sid

    with caplog.at_level(logging.WARNING, logger="sqla_sessions"):
        try:
            from concurrent.futures import ThreadPoolExecutor

            with ThreadPoolExecutor(6) as pool:
                ids = list(pool.map(user, range(6)))
            assert errors == []
            assert [handler.load(sid)["n"] for sid in ids] == [30] * 6
        finally:
            handler.close()
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING and SETTING_NAMED in r.getMessage()]
    assert len(warnings) == 1, [r.getMessage() for r in caplog.records]


def test_a_served_app_with_default_settings_answers_every_request(migrated: str, tmp_root: Path) -> None:
    """uvicorn + Starlette, default settings (no `SQLA_SESSIONS_PREPARED_STATEMENTS`): racing and
    blocking requests all answer 200, and the log holds the one warning naming the setting."""
    _open_every_server_connection(migrated)
    env = {"SQLA_SESSIONS_TABLE": TABLE, "SQLA_SESSIONS_POOL_SIZE": "8", "SQLA_SESSIONS_PREPARED_STATEMENTS": None}
    previous = {name: os.environ.get(name) for name in env}
    for name, value in env.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
    port = free_port()
    log = tmp_root / "pgbouncer-auto.log"
    try:
        with log.open("wb") as out:
            process = start_server("starlette", migrated, port, out, module="tests.web.same_key_apps")
        try:
            wait_until_up(process, port, log)
            base = f"http://127.0.0.1:{port}"
            users = [_seed(base) for _ in range(6)]

            async def fire() -> list[int]:
                # 12 at a time: a blocking request holds one of PgBouncer's 3 server connections throughout.
                at_once = asyncio.Semaphore(12)

                async def request(client: httpx.AsyncClient, n: int) -> int:
                    path = "/blocking/edit/assign/-" if n % 4 == 3 else "/edit/increment/-"
                    async with at_once:
                        return (await client.post(path, headers=sent(users[n % len(users)]))).status_code

                async with httpx.AsyncClient(base_url=base, timeout=60) as client:
                    return list(await asyncio.gather(*(request(client, n) for n in range(240))))

            assert asyncio.run(fire()) == [200] * 240
            for u, cookie in enumerate(users):
                mine = [n for n in range(240) if n % len(users) == u]
                blocking = sum(1 for n in mine if n % 4 == 3)
                data = _read(base, cookie)
                assert (data.get("n", 0), data.get("m", 0)) == (len(mine) - blocking, blocking)
        finally:
            process.terminate()
            process.wait(10)
    finally:
        for name, old in previous.items():
            if old is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = old
    text = log.read_text(errors="replace")
    assert "Traceback" not in text, text[-3000:]
    assert text.count(SETTING_NAMED) == 1, text[-3000:]
