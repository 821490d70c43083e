"""A real Django site (django.contrib.auth, Django's SessionMiddleware) under gunicorn on our engine,
with sessions on PostgreSQL and on SQLite: concurrent writes kept, login rotates, logout invalidates."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.conftest import backend_for
from tests.web.served_app import free_port, wait_until_up

ROOT = Path(__file__).resolve().parents[2]
SETTINGS = "tests.django_engine.site.settings"


@dataclass
class Site:
    base_url: str
    user_id: str


def _manage(env: dict[str, str], *args: str) -> str:
    result = subprocess.run(
        [sys.executable, "-m", "django", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


@pytest.fixture(scope="module", params=["postgresql", "sqlite"])
def site(request: pytest.FixtureRequest, tmp_root: Path) -> Iterator[Site]:
    backend = backend_for(request.param, tmp_root)
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": SETTINGS,
        "DJANGO_AUTH_DB": str(tmp_root / f"django-auth-{request.param}.sqlite3"),
        "SQLA_SESSIONS_DATABASE_URL": backend.url,
        "PYTHONPATH": str(ROOT),
    }
    _manage(env, "migrate", "--run-syncdb", "--verbosity", "0")
    script = (
        "from django.contrib.auth.models import User;"
        "u = User.objects.create_user('ada', password='lovelace');"
        "print(u.pk)"
    )
    user_id = _manage(env, "shell", "--no-imports", "-c", script).strip().splitlines()[-1]
    port = free_port()
    log = tmp_root / f"django-{request.param}.log"
    with log.open("wb") as log_file:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "gunicorn",
                "--workers",
                "2",
                "--worker-class",
                "gthread",
                "--threads",
                "8",
                "--bind",
                f"127.0.0.1:{port}",
                "--log-level",
                "warning",
                "tests.django_engine.site.wsgi",
            ],  # fmt: skip
            cwd=ROOT,
            env=env,
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
        try:
            wait_until_up(process, port, log)
            yield Site(f"http://127.0.0.1:{port}", user_id)
        finally:
            process.terminate()
            process.wait(10)
    assert "Traceback" not in log.read_text()


def _client(site: Site) -> httpx.Client:
    """A client that keeps no cookies: each request carries exactly the cookie the test gives it."""
    client = httpx.Client(base_url=site.base_url, timeout=30)
    client.event_hooks["response"] = [lambda response: client.cookies.clear()]
    return client


def _sent(cookie: str | None) -> dict[str, str]:
    return {"Cookie": f"sessionid={cookie}"} if cookie else {}


def _cookie(response: httpx.Response) -> str | None:
    value = response.cookies.get("sessionid")
    return value if value else None


def test_fifty_concurrent_writes_login_rotates_logout_invalidates(site: Site) -> None:
    with _client(site) as client:
        first = client.post("/cart/0")
        cookie = _cookie(first)
        assert first.status_code == 200 and cookie is not None

    async def fire() -> list[int]:
        async with httpx.AsyncClient(base_url=site.base_url, timeout=60) as pool:
            responses = await asyncio.gather(*(pool.post(f"/cart/{i}", headers=_sent(cookie)) for i in range(1, 51)))
            return [r.status_code for r in responses]

    assert asyncio.run(fire()) == [200] * 50
    with _client(site) as client:
        me = client.get("/me", headers=_sent(cookie)).json()
        assert sorted(me["cart"], key=int) == [str(i) for i in range(51)]  # 50 concurrent appends, none lost

        login = client.post("/login", data={"username": "ada", "password": "lovelace"}, headers=_sent(cookie))
        assert login.status_code == 200
        rotated = _cookie(login)
        assert rotated is not None and rotated != cookie
        assert client.get("/me", headers=_sent(cookie)).json() == {"user": None, "cart": []}  # old id dead
        me = client.get("/me", headers=_sent(rotated)).json()
        assert me["user"] == "ada" and len(me["cart"]) == 51  # the anonymous cart survives the login
        devices = client.get(f"/devices/{site.user_id}").json()
        assert devices["keys"] == [rotated.split(".")[0]]
        assert devices["agents"] == [f"python-httpx/{httpx.__version__}"]  # ClientMiddleware

        assert client.post("/logout", headers=_sent(rotated)).status_code == 200
        assert client.get("/me", headers=_sent(rotated)).json() == {"user": None, "cart": []}
        assert client.get(f"/devices/{site.user_id}").json()["keys"] == []
