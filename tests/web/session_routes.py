"""The real-server tests every async framework integration passes (Litestar, Quart): each test
module serves its app with the same routes and runs `SessionRouteTests` against its `srv` fixture.

Routes an app serves: POST /set/{key}, /push/{item} (and whatever `append_routes` names),
/login/{user}, /logout, /marked (blocking); GET /read (`{"data", "user", "key"}`), /untouched.
"""

from __future__ import annotations

import asyncio

import httpx

from tests.web.served_app import ServedApp, cookie_of, sent


class SessionRouteTests:
    append_routes: tuple[str, ...] = ("push",)
    """Routes that append their item to the session's "items" list, each its own idiom."""

    def test_fifty_concurrent_appends_to_one_session_are_all_kept(self, srv: ServedApp) -> None:
        for route in self.append_routes:
            with srv.client() as client:
                cookie = cookie_of(client.post("/set/seed"))
            assert cookie
            assert srv.fire(cookie, [f"/{route}/i{n}" for n in range(50)]) == [200] * 50
            data = srv.read(cookie)["data"]
            assert isinstance(data, dict)
            assert sorted(data["items"]) == sorted(f"i{n}" for n in range(50)), route
            assert data["seed"] is True

    def test_login_rotates_the_cookie_and_the_old_one_no_longer_works(self, srv: ServedApp) -> None:
        with srv.client() as client:
            before = cookie_of(client.post("/set/cart"))
            login = client.post("/login/alice", headers=sent(before))
        after = cookie_of(login)
        assert login.json() == {"user": "alice"}
        assert after and before and after != before
        assert after.split(".")[0] != before.split(".")[0]  # a new row key, not only a new secret
        assert srv.read(before)["data"] == {}
        me = srv.read(after)
        assert me["data"] == {"cart": True} and me["user"] == "alice"
        assert srv.rows() == 1

    def test_logout_invalidates_the_session(self, srv: ServedApp) -> None:
        with srv.client() as client:
            cookie = cookie_of(client.post("/login/bob"))
            client.post("/set/cart", headers=sent(cookie))
            assert srv.rows() == 1
            logout = client.post("/logout", headers=sent(cookie))
        assert logout.status_code == 200
        deletion = [h for h in logout.headers.get_list("set-cookie") if h.startswith("session=")]
        assert deletion and "Max-Age=0" in deletion[0]
        assert srv.rows() == 0
        assert srv.read(cookie) == {"data": {}, "user": None, "key": None}

    def test_a_read_only_request_sends_no_cookie(self, srv: ServedApp) -> None:
        with srv.client() as client:
            cookie = cookie_of(client.post("/set/a"))
            for path in ("/read", "/untouched"):
                response = client.get(path, headers=sent(cookie))
                assert response.status_code == 200
                assert response.headers.get_list("set-cookie") == []
            assert client.get("/read").headers.get_list("set-cookie") == []  # no session yet: none made
        assert srv.rows() == 1

    def test_a_route_marked_blocking_runs_one_request_of_a_session_at_a_time(self, srv: ServedApp) -> None:
        with srv.client() as client:
            cookie = cookie_of(client.post("/set/seed"))

        async def run() -> list[dict[str, float]]:
            async with httpx.AsyncClient(base_url=srv.base_url, timeout=60, headers=sent(cookie)) as client:
                responses = await asyncio.gather(*(client.post("/marked") for _ in range(4)))
            return [r.json() for r in responses]

        spans = sorted(asyncio.run(run()), key=lambda span: span["enter"])
        assert all(earlier["exit"] <= later["enter"] for earlier, later in zip(spans, spans[1:], strict=False))
        assert sorted(span["n"] for span in spans) == [1, 2, 3, 4]
