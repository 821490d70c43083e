"""Every Python block in README.md runs as written, against PostgreSQL, the way a reader would run it.

A block is preceded by `<!-- readme-test: KIND [NAME] -->`:

- `asgi [scenario]`: saved as `app.py`, served by uvicorn (`app:app`), then driven over HTTP;
- `wsgi ATTRIBUTE`: saved as `app.py`, served by gunicorn (`app:ATTRIBUTE`), then driven over HTTP;
- `script`: run with python (twice for the cart script, with the cookie the first run printed);
- `jobs`: saved as `jobs.py`, run by a real `dramatiq` worker beside the `asgi jobs` block;
- `fragment`: a block that needs a running broker with results; it must compile and name nothing
  it does not define or import.

Every block, whatever its kind, is checked for undefined names (ruff's F821) and compiled.
"""

from __future__ import annotations

import re
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from sqla_sessions import DatabaseHandler, SessionConfig
from tests.conftest import Backend, unavailable
from tests.web.test_servers import free_port

ROOT = Path(__file__).resolve().parent.parent
BLOCK = re.compile(r"<!-- readme-test: ([a-z]+)(?: ([a-z]+))? -->\n```python\n(.*?)```", re.DOTALL)
REDIS_DB = "redis://127.0.0.1:6379/9"  # a database of its own: the worker's queue meets no other test's


def readme_blocks() -> list[tuple[str, str, str]]:
    return [(kind, name or "", code) for kind, name, code in BLOCK.findall((ROOT / "README.md").read_text())]


def test_every_python_block_is_marked_and_tested() -> None:
    readme = (ROOT / "README.md").read_text()
    assert readme.count("```python") == len(readme_blocks()) >= 10


@pytest.mark.parametrize(("kind", "name", "code"), readme_blocks(), ids=lambda v: str(v)[:12] if v else "-")
def test_the_block_names_nothing_undefined(kind: str, name: str, code: str, tmp_path: Path) -> None:
    source = tmp_path / "block.py"
    source.write_text(code)
    compile(code, str(source), "exec")
    ruff = subprocess.run(
        [sys.executable, "-m", "ruff", "check", "--no-cache", "--isolated", "--select", "F821,F401,F811", str(source)],
        capture_output=True,
        text=True,
    )
    assert ruff.returncode == 0, ruff.stdout


@pytest.fixture
def workdir(tmp_path: Path, pg_backend: Backend) -> Iterator[tuple[Path, dict[str, str]]]:
    import os

    env = {**os.environ, "SQLA_SESSIONS_DATABASE_URL": pg_backend.url, "PYTHONPATH": str(tmp_path)}
    env.pop("SQLA_SESSIONS_TABLE", None)
    yield tmp_path, env


def _serve(command: list[str], cwd: Path, env: dict[str, str], port: int) -> subprocess.Popen[bytes]:
    with (cwd / f"server-{port}.log").open("wb") as log:  # the child keeps its own descriptor
        process = subprocess.Popen(command, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError((cwd / f"server-{port}.log").read_text()[-3000:])
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return process
        except OSError:
            time.sleep(0.1)
    process.kill()
    raise AssertionError(f"no server on {port}: {(cwd / f'server-{port}.log').read_text()[-3000:]}")


def _block(kind: str, name: str = "") -> str:
    matches = [code for k, n, code in readme_blocks() if (k, n) == (kind, name)]
    assert len(matches) == 1, (kind, name)
    return matches[0]


def _run_app(
    workdir: tuple[Path, dict[str, str]], code: str, server: str, scenario: Callable[[httpx.Client], None]
) -> None:
    path, env = workdir
    (path / "app.py").write_text(code)
    port = free_port()
    if server.startswith("asgi"):
        command = [sys.executable, "-m", "uvicorn", "app:app", "--port", str(port), "--log-level", "warning"]
    else:
        attribute = server.split(":", 1)[1]
        command = [
            sys.executable,
            "-m",
            "gunicorn",
            "--bind",
            f"127.0.0.1:{port}",
            "--threads",
            "4",
            f"app:{attribute}",
        ]
    process = _serve(command, path, env, port)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
            scenario(client)
    finally:
        process.terminate()
        process.wait(10)
    log = "".join(p.read_text() for p in path.glob("server-*.log"))
    assert "Traceback" not in log, log[-3000:]


def _login_cart_read(client: httpx.Client) -> None:
    assert client.post("/login/ada").status_code == 200
    assert client.post("/cart/apple").json() == {"cart": ["apple"]}
    assert client.post("/cart/pear").json() == {"cart": ["apple", "pear"]}
    assert client.get("/cart").json() == {"user": "ada", "cart": ["apple", "pear"]}


def test_the_fastapi_quick_start(workdir: tuple[Path, dict[str, str]]) -> None:
    _run_app(workdir, _block("asgi"), "asgi", _login_cart_read)


def test_the_flask_quick_start(workdir: tuple[Path, dict[str, str]]) -> None:
    _run_app(workdir, _block("wsgi", "app"), "wsgi:app", _login_cart_read)


def test_the_litestar_quick_start(workdir: tuple[Path, dict[str, str]]) -> None:
    _run_app(workdir, _block("asgi", "litestar"), "asgi", _login_cart_read)


def test_the_quart_quick_start(workdir: tuple[Path, dict[str, str]]) -> None:
    _run_app(workdir, _block("asgi", "quart"), "asgi", _login_cart_read)


def test_the_flask_login_quick_start(workdir: tuple[Path, dict[str, str]]) -> None:
    def scenario(client: httpx.Client) -> None:
        assert client.get("/cart").status_code == 401
        _login_cart_read(client)
        assert client.post("/logout").text == "bye"
        assert client.get("/cart").status_code == 401

    _run_app(workdir, _block("wsgi", "flasklogin"), "wsgi:app", scenario)


def test_the_wsgi_quick_start(workdir: tuple[Path, dict[str, str]]) -> None:
    def visits(client: httpx.Client) -> None:
        assert client.get("/").text == "None: visit 1"
        assert client.get("/login/ada").text == "ada: visit 2"
        assert client.get("/").text == "ada: visit 3"

    _run_app(workdir, _block("wsgi", "application"), "wsgi:application", visits)


def test_the_csrf_block(workdir: tuple[Path, dict[str, str]]) -> None:
    def forms(client: httpx.Client) -> None:
        token = client.get("/form").json()["token"]
        assert client.post("/transfer").status_code == 419
        assert client.post("/transfer", headers={"X-CSRF-TOKEN": "x" * 40}).status_code == 419
        assert client.post("/transfer", headers={"X-CSRF-TOKEN": token}).json() == {"done": True}

    _run_app(workdir, _block("asgi", "csrf"), "asgi", forms)


def test_the_blocking_block(workdir: tuple[Path, dict[str, str]]) -> None:
    def checkouts(client: httpx.Client) -> None:
        assert client.post("/checkout").json() == {"order": 1}
        cookie = {"Cookie": f"session={client.cookies['session']}"}
        with ThreadPoolExecutor(6) as pool:  # one session's requests, at once: they run one at a time
            orders = list(pool.map(lambda _: client.post("/checkout", headers=cookie).json()["order"], range(6)))
        assert sorted(orders) == [2, 3, 4, 5, 6, 7]

    _run_app(workdir, _block("asgi", "blocking"), "asgi", checkouts)


def test_the_script_blocks(workdir: tuple[Path, dict[str, str]], pg_backend: Backend) -> None:
    path, env = workdir
    cart, devices = [code for kind, _, code in readme_blocks() if kind == "script"]
    (path / "cart.py").write_text(cart)
    first = subprocess.run([sys.executable, "cart.py"], cwd=path, env=env, capture_output=True, text=True)
    assert first.returncode == 0, first.stderr
    cookie = first.stdout.strip()
    second = subprocess.run([sys.executable, "cart.py", cookie], cwd=path, env=env, capture_output=True, text=True)
    assert second.returncode == 0 and second.stdout.strip() == cookie, second.stderr
    stored = DatabaseHandler(pg_backend.engine, SessionConfig()).load(cookie)
    assert stored["cart"] == ["apple", "apple"]
    (path / "devices.py").write_text(devices)
    listed = subprocess.run([sys.executable, "devices.py"], cwd=path, env=env, capture_output=True, text=True)
    assert listed.returncode == 0, listed.stderr
    assert len(listed.stdout.split()) >= 4  # the device line: key, ip, agent, last activity


def test_the_jobs_blocks_with_a_real_worker(workdir: tuple[Path, dict[str, str]]) -> None:
    try:
        import redis

        redis.Redis.from_url(REDIS_DB).ping()
    except Exception as exc:  # any failure to reach it
        unavailable("Redis", exc)
    path, env = workdir
    env = {**env, "REDIS_URL": REDIS_DB}
    (path / "jobs.py").write_text(_block("jobs"))
    with (path / "worker.log").open("wb") as log:
        worker = subprocess.Popen(
            [sys.executable, "-m", "dramatiq", "jobs", "--processes", "1", "--threads", "2"],
            cwd=path,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )

    def login_then_dashboard(client: httpx.Client) -> None:
        assert client.post("/login/ada").json() == {"user": "ada"}
        deadline = time.monotonic() + 30
        dashboard: Any = None
        while dashboard is None and time.monotonic() < deadline:
            time.sleep(0.2)
            dashboard = client.get("/dashboard").json()["dashboard"]
        assert dashboard == {"greeting": "Welcome back, ada"}, (path / "worker.log").read_text()[-3000:]

    try:
        _run_app((path, env), _block("asgi", "jobs"), "asgi", login_then_dashboard)
    finally:
        worker.terminate()
        worker.wait(20)
        redis.Redis.from_url(REDIS_DB).flushdb()
    assert "Traceback" not in (path / "worker.log").read_text()
