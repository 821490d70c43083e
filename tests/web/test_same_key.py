"""Issue 17's table over real HTTP: 20 concurrent requests of one session editing the same key keep all 20.

uvicorn (Starlette, event loop + worker threads) and gunicorn (Flask, 16 threads), each on the memory
handler, SQLite, PostgreSQL and MariaDB, with no blocking route: the saves race, and every save after
the first merges three-way onto what the others stored.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import backend_for
from tests.web.test_servers import cookie_of, free_port, sent, start_server, wait_until_up

CONCURRENT = 20
SERVERS = {"starlette": "uvicorn", "flask": "gunicorn"}
DATABASES = ("memory", "sqlite", "postgresql", "mariadb")


@pytest.fixture(scope="module", params=[(f, d) for f in SERVERS for d in DATABASES], ids=lambda p: f"{p[0]}-{p[1]}")
def base_url(request: pytest.FixtureRequest, tmp_root: Path) -> Iterator[str]:
    framework, database = request.param
    url = "memory" if database == "memory" else backend_for(database, tmp_root).url
    port = free_port()
    log = tmp_root / f"same-key-{framework}-{database}.log"
    with log.open("wb") as log_file:
        process = start_server(framework, url, port, log_file, module="tests.web.same_key_apps")
        try:
            wait_until_up(process, port, log)
            yield f"http://127.0.0.1:{port}"
        finally:
            process.terminate()
            process.wait(10)


def race(base_url: str, paths: list[str]) -> dict[str, object]:
    """Seed a session, fire *paths* at once with its cookie, return what the session holds afterwards."""
    with httpx.Client(base_url=base_url, timeout=60) as client:
        cookie = cookie_of(client.post("/edit/seed/-"))
        assert cookie

    async def fire() -> list[int]:
        async with httpx.AsyncClient(base_url=base_url, timeout=60, headers=sent(cookie)) as client:
            return [r.status_code for r in await asyncio.gather(*(client.post(path) for path in paths))]

    assert asyncio.run(fire()) == [200] * len(paths)
    with httpx.Client(base_url=base_url, timeout=60) as client:
        data: dict[str, object] = client.get("/read", headers=sent(cookie)).json()
    return data


def test_concurrent_pushes_onto_one_list_keep_every_item(base_url: str) -> None:
    data = race(base_url, [f"/edit/push/item{n}" for n in range(CONCURRENT)])
    assert sorted(data["cart"]) == sorted(f"item{n}" for n in range(CONCURRENT))  # type: ignore[call-overload]


def test_concurrent_pushes_of_the_same_value_keep_every_push(base_url: str) -> None:
    data = race(base_url, ["/edit/push/sku-1"] * CONCURRENT)
    assert data["cart"] == ["sku-1"] * CONCURRENT


def test_concurrent_increments_of_one_counter_all_count(base_url: str) -> None:
    assert race(base_url, ["/edit/increment/-"] * CONCURRENT)["n"] == CONCURRENT


def test_concurrent_edits_of_one_nested_dict_keep_every_key(base_url: str) -> None:
    data = race(base_url, [f"/edit/pref/p{n}" for n in range(CONCURRENT)])
    assert data["prefs"] == {f"p{n}": 1 for n in range(CONCURRENT)}


def test_concurrent_writes_of_distinct_keys_keep_every_key(base_url: str) -> None:
    data = race(base_url, [f"/edit/own/k{n}" for n in range(CONCURRENT)])
    assert all(data.get(f"k{n}") is True for n in range(CONCURRENT))
