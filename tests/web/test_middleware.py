"""Middleware edge paths, in process: errors, cookies, touches, websockets, lifespan, GC lottery."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from sqla_sessions import DatabaseHandler, MemoryHandler, Session, SessionConfig, upgrade
from sqla_sessions.asgi import SessionMiddleware as AsgiMiddleware
from sqla_sessions.wsgi import SessionMiddleware as WsgiMiddleware
from tests.conftest import FakeClock

Scope = dict[str, Any]


def asgi_app(action: Callable[[Session], Any]) -> Callable[..., Any]:
    """A bare ASGI app that runs *action* on the session and answers 200 text/plain."""

    async def app(scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            message = await receive()
            await send({"type": f"{message['type']}.complete"})
            return
        result = action(scope["session"])
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
        await send({"type": "http.response.body", "body": str(result).encode()})

    return app


def call(app: Any, method: str = "GET", cookie: str | None = None, base: str = "http://test") -> httpx.Response:
    async def go() -> httpx.Response:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url=base) as client:
            headers = {"Cookie": f"session={cookie}"} if cookie else {}
            return await client.request(method, "/", headers=headers)

    return asyncio.run(go())


def cookie_header(response: httpx.Response) -> str:
    (value,) = [h for h in response.headers.get_list("set-cookie") if h.startswith("session=")]
    return value


def cookie_value(response: httpx.Response) -> str:
    return cookie_header(response).split(";", 1)[0].split("=", 1)[1]


@pytest.fixture
def memory(clock: FakeClock) -> MemoryHandler:
    return MemoryHandler(SessionConfig(lottery=(0, 1)), clock=clock)


def test_cookie_attributes_follow_the_config(clock: FakeClock) -> None:
    config = SessionConfig(
        cookie_name="session", cookie_domain="example.com", cookie_same_site="strict", cookie_partitioned=True
    )
    app = AsgiMiddleware(asgi_app(lambda s: s.put("a", 1)), handler=MemoryHandler(config, clock=clock))
    header = cookie_header(call(app, "POST", base="https://example.com"))
    assert "Max-Age=7200" in header and "Expires=" in header
    for attribute in ("Path=/", "Domain=example.com", "HttpOnly", "SameSite=Strict", "Partitioned", "Secure"):
        assert attribute in header


def test_secure_follows_the_scheme_and_expire_on_close_drops_max_age(clock: FakeClock) -> None:
    app = AsgiMiddleware(asgi_app(lambda s: s.put("a", 1)), handler=MemoryHandler(SessionConfig(), clock=clock))
    assert "Secure" not in cookie_header(call(app, "POST", base="http://test"))
    assert "Secure" in cookie_header(call(app, "POST", base="https://test"))
    closing = MemoryHandler(SessionConfig(expire_on_close=True), clock=clock)
    header = cookie_header(call(AsgiMiddleware(asgi_app(lambda s: s.put("a", 1)), handler=closing), "POST"))
    assert "Max-Age" not in header and "Expires" not in header


def test_a_due_touch_refreshes_the_cookie_and_a_recent_one_does_not(memory: MemoryHandler, clock: FakeClock) -> None:
    writer = AsgiMiddleware(asgi_app(lambda s: s.put("a", 1)), handler=memory)
    reader = AsgiMiddleware(asgi_app(lambda s: s.get("a")), handler=memory)
    cookie = cookie_value(call(writer, "POST"))
    clock.advance(30)
    assert call(reader, cookie=cookie).headers.get_list("set-cookie") == []
    clock.advance(31)
    refreshed = call(reader, cookie=cookie)
    assert cookie_value(refreshed) == cookie and "Max-Age=7200" in cookie_header(refreshed)


def test_a_write_that_moves_the_expiry_refreshes_the_cookie(memory: MemoryHandler, clock: FakeClock) -> None:
    """An active user who only ever writes keeps a cookie as long-lived as the session it names."""
    writer = AsgiMiddleware(asgi_app(lambda s: s.increment("n")), handler=memory)
    cookie = cookie_value(call(writer, "POST"))
    clock.advance(30)
    assert call(writer, "POST", cookie=cookie).headers.get_list("set-cookie") == []  # expiry unchanged
    clock.advance(100 * 60)  # 30 s + 100 min: the first cookie has 20 minutes left
    refreshed = call(writer, "POST", cookie=cookie)
    assert cookie_value(refreshed) == cookie and "Max-Age=7200" in cookie_header(refreshed)
    # The same when the app saved explicitly and the end-of-request save has nothing left to write.
    saves_early = AsgiMiddleware(asgi_app(lambda s: (s.increment("n"), s.save())), handler=memory)
    clock.advance(100 * 60)
    refreshed = call(saves_early, "POST", cookie=cookie)
    assert cookie_value(refreshed) == cookie and "Max-Age=7200" in cookie_header(refreshed)


def test_absolute_lifetime_caps_the_cookie_max_age(clock: FakeClock) -> None:
    handler = MemoryHandler(SessionConfig(lifetime=60, absolute_lifetime=90), clock=clock)
    writer = AsgiMiddleware(asgi_app(lambda s: s.increment("n")), handler=handler)
    cookie = cookie_value(call(writer, "POST"))
    clock.advance(50 * 60)
    response = call(AsgiMiddleware(asgi_app(lambda s: s.regenerate()), handler=handler), "POST", cookie=cookie)
    assert "Max-Age=2400" in cookie_header(response)  # 90 - 50 minutes left, not the idle 60


def test_a_session_revoked_during_the_request_answers_normally_and_leaves_the_cookie(
    memory: MemoryHandler, caplog: pytest.LogCaptureFixture
) -> None:
    cookie = cookie_value(call(AsgiMiddleware(asgi_app(lambda s: s.put("a", 1)), handler=memory), "POST"))

    def revoke_meanwhile(session: Session) -> str:
        memory.revoke(session.key or "")  # "logout in another tab"
        session["b"] = 2
        return "done"

    with caplog.at_level(logging.WARNING, logger="sqla_sessions"):
        response = call(AsgiMiddleware(asgi_app(revoke_meanwhile), handler=memory), "POST", cookie=cookie)
    assert response.status_code == 200 and response.text == "done"
    assert response.headers.get_list("set-cookie") == []  # the browser may hold a newer cookie already
    assert "destroyed or cut off" in caplog.text
    assert len(memory) == 0


def test_an_oversized_session_answers_500_and_keeps_the_stored_session(
    clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    handler = MemoryHandler(SessionConfig(max_payload_bytes=256), clock=clock)
    cookie = cookie_value(call(AsgiMiddleware(asgi_app(lambda s: s.put("a", 1)), handler=handler), "POST"))
    big = AsgiMiddleware(asgi_app(lambda s: s.put("big", "x" * 1000)), handler=handler)
    with caplog.at_level(logging.ERROR, logger="sqla_sessions"):
        response = call(big, "POST", cookie=cookie)
    assert response.status_code == 500 and response.headers.get_list("set-cookie") == []
    assert "could not be saved" in caplog.text
    assert handler.load(cookie).all() == {"a": 1}


def test_an_unreachable_database_answers_503_quickly() -> None:
    handler = DatabaseHandler("postgresql+psycopg://nobody@127.0.0.1:1/none?connect_timeout=2", SessionConfig())
    app = AsgiMiddleware(asgi_app(lambda s: s.put("a", 1)), handler=handler)
    response = call(app, cookie="a" * 32 + "." + "A" * 40)
    assert response.status_code == 503 and response.headers["retry-after"] == "5"

    def wsgi(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        raise AssertionError("the app must not run without its session")

    status: list[str] = []
    body = WsgiMiddleware(wsgi, handler=handler)(
        {"REQUEST_METHOD": "GET", "HTTP_COOKIE": "session=" + "a" * 32 + "." + "A" * 40},
        lambda s, h, e=None: status.append(s),
    )
    assert status == ["503 Service Unavailable"] and b"".join(body)


def test_an_app_exception_saves_nothing(memory: MemoryHandler) -> None:
    def explode(session: Session) -> None:
        session["half"] = "done"
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        call(AsgiMiddleware(asgi_app(explode), handler=memory), "POST")
    assert len(memory) == 0


def test_lifespan_passes_through_and_websockets_get_a_read_only_session(
    memory: MemoryHandler, caplog: pytest.LogCaptureFixture
) -> None:
    seen: list[Any] = []

    async def app(scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            seen.append("session" in scope)
            return
        seen.append(scope["session"].get("a"))
        scope["session"]["changed"] = True
        await send({"type": "websocket.close", "code": 1000})

    middleware = AsgiMiddleware(app, handler=memory)
    cookie = cookie_value(call(AsgiMiddleware(asgi_app(lambda s: s.put("a", 1)), handler=memory), "POST"))

    async def run() -> None:
        await middleware({"type": "lifespan"}, _never, _ignore)
        scope = {"type": "websocket", "headers": [(b"cookie", f"session={cookie}".encode())], "path": "/"}
        await middleware(scope, _never, _ignore)

    with caplog.at_level(logging.WARNING, logger="sqla_sessions"):
        asyncio.run(run())
    assert seen == [False, 1]
    assert "websocket" in caplog.text and "changed" not in memory.load(cookie)


def test_a_websocket_from_another_origin_gets_no_session(memory: MemoryHandler) -> None:
    """Cross-site websocket hijacking: a page elsewhere opens a websocket to this host and the
    browser sends the cookie; the handshake's Origin tells, and that socket gets an empty session."""
    seen: list[Any] = []

    async def app(scope: Scope, receive: Any, send: Any) -> None:
        seen.append(scope["session"].get("a"))
        await send({"type": "websocket.close", "code": 1000})

    cookie = cookie_value(call(AsgiMiddleware(asgi_app(lambda s: s.put("a", 1)), handler=memory), "POST"))
    allowed = SessionConfig(websocket_origins=("https://app.example.com",))
    middleware = AsgiMiddleware(app, allowed, handler=memory)

    def handshake(origin: str | None, host: str = "example.com", scheme: str = "wss") -> None:
        headers = [(b"cookie", f"session={cookie}".encode()), (b"host", host.encode())]
        if origin is not None:
            headers.append((b"origin", origin.encode()))
        scope = {"type": "websocket", "scheme": scheme, "headers": headers, "path": "/"}
        asyncio.run(middleware(scope, _never, _ignore))

    handshake("https://example.com")  # the site's own page
    handshake("https://APP.example.com")  # allowed
    handshake(None)  # not a browser: no Origin
    handshake("https://evil.example.net")
    handshake("https://example.com.evil.net")
    handshake("null")
    handshake("https://example.com", host="example.com:8443")  # another port: another origin
    handshake("http://example.com")  # an http page (forgeable on the network) opening wss: another origin
    handshake("http://example.com", scheme="ws")  # plain ws from the http site: its own origin
    assert seen == [1, 1, 1, None, None, None, None, None, 1]
    with pytest.raises(ValueError, match="websocket_origins"):
        SessionConfig(websocket_origins=("app.example.com",))


async def _never() -> dict[str, Any]:
    raise AssertionError("not expected to receive")


async def _ignore(message: dict[str, Any]) -> None:
    return None


def test_the_gc_lottery_sweeps_after_the_response(clock: FakeClock) -> None:
    handler = MemoryHandler(SessionConfig(lottery=(1, 1)), clock=clock)
    writer = AsgiMiddleware(asgi_app(lambda s: s.put("a", 1)), handler=handler)
    for _ in range(3):
        call(writer, "POST")
    clock.advance(handler.config.lifetime_seconds + 1)
    assert len(handler) == 3
    call(AsgiMiddleware(asgi_app(lambda s: "untouched"), handler=handler))
    assert len(handler) == 0


def test_the_async_store_uses_an_async_engine_for_a_sqlite_file(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'a.db'}"
    upgrade(url)
    assert AsgiMiddleware(asgi_app(lambda s: 1), handler=DatabaseHandler(url)).store.mode == "threads"
    app = AsgiMiddleware(asgi_app(lambda s: s.put("a", 1)), handler=DatabaseHandler(url), async_engine="auto")
    assert app.store.mode == "async-engine"

    async def go() -> int:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            status = (await client.post("/")).status_code
        await app.store.aclose()  # in the loop its connections belong to
        return status

    assert asyncio.run(go()) == 200
    memory_db = AsgiMiddleware(asgi_app(lambda s: 1), handler=DatabaseHandler("sqlite://"), async_engine="auto")
    assert memory_db.store.mode == "threads"  # an in-memory database cannot be shared with another engine


# -- WSGI specifics -------------------------------------------------------------------------------------


class Closing:
    def __init__(self, chunks: list[bytes]) -> None:
        self.chunks = chunks
        self.closed = False

    def __iter__(self) -> Iterator[bytes]:
        return iter(self.chunks)

    def close(self) -> None:
        self.closed = True


def run_wsgi(app: Any, cookie: str | None = None) -> tuple[str, list[tuple[str, str]], bytes]:
    environ = {"REQUEST_METHOD": "POST", "PATH_INFO": "/", "wsgi.url_scheme": "http", "REMOTE_ADDR": "192.0.2.1"}
    if cookie:
        environ["HTTP_COOKIE"] = f"session={cookie}"
    captured: list[Any] = []
    iterable = app(environ, lambda status, headers, exc_info=None: captured.extend([status, headers]))
    try:
        body = b"".join(iterable)
    finally:
        iterable.close()
    return captured[0], captured[1], body


def test_wsgi_saves_when_start_response_is_called_lazily_and_propagates_close(memory: MemoryHandler) -> None:
    closing = Closing([b"ok"])

    def generator_app(environ: dict[str, Any], start_response: Any) -> Iterator[bytes]:
        environ["sqla_sessions.session"]["lazy"] = True
        start_response("200 OK", [("Content-Type", "text/plain")])  # called during the first iteration
        yield from closing

    status, headers, body = run_wsgi(WsgiMiddleware(generator_app, handler=memory))
    cookie = dict(headers)["Set-Cookie"].split(";")[0].split("=")[1]
    assert status == "200 OK" and body == b"ok" and memory.load(cookie)["lazy"] is True

    def closing_app(environ: dict[str, Any], start_response: Any) -> Closing:
        start_response("200 OK", [])
        return closing

    run_wsgi(WsgiMiddleware(closing_app, handler=memory))
    assert closing.closed


def test_wsgi_replaces_the_body_when_the_save_fails(clock: FakeClock) -> None:
    handler = MemoryHandler(SessionConfig(max_payload_bytes=128), clock=clock)

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        environ["sqla_sessions.session"]["big"] = "x" * 500
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"secret page that assumed the save worked"]

    status, _, body = run_wsgi(WsgiMiddleware(app, handler=handler))
    assert status.startswith("500") and b"secret" not in body and len(handler) == 0


def test_wsgi_records_the_client(memory: MemoryHandler) -> None:
    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        environ["sqla_sessions.session"].login("u1")
        start_response("200 OK", [])
        return [b""]

    run_wsgi(WsgiMiddleware(app, handler=memory))
    (info,) = memory.list_sessions("u1")
    assert info.ip_address == "192.0.2.1"


def test_flask_session_flags_are_accepted(memory: MemoryHandler) -> None:
    flask = pytest.importorskip("flask")
    from sqla_sessions.flask import init_app

    app = flask.Flask(__name__)
    init_app(app, handler=memory)

    @app.post("/")
    def index() -> str:
        flask.session["cart"] = []
        flask.session["cart"].append(1)
        flask.session.modified = True
        flask.session.permanent = True
        return "ok"

    response = app.test_client().post("/")
    assert response.status_code == 200
    cookie = response.headers["Set-Cookie"].split(";")[0].split("=")[1]
    assert memory.load(cookie)["cart"] == [1]


def test_an_asgi_endpoint_can_flush_mid_request_and_reload(memory: MemoryHandler) -> None:
    async def app(scope: Scope, receive: Any, send: Any) -> None:
        store, session = scope["sqla_sessions.store"], scope["session"]
        session["early"] = 1
        await store.save(session)  # stored now, before the response
        other = memory.load_by_key(session.key)
        assert other is not None
        other["from_job"] = 2
        other.save()
        await store.reload(session)
        session["late"] = 3
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": repr(sorted(session)).encode()})

    response = call(AsgiMiddleware(app, handler=memory), "POST")
    assert response.text == "['early', 'from_job', 'late']"
    assert memory.load(cookie_value(response)).all() == {"early": 1, "from_job": 2, "late": 3}


def test_async_views_save_and_reload_through_the_session_itself(memory: MemoryHandler) -> None:
    async def app(scope: Scope, receive: Any, send: Any) -> None:
        session = scope["session"]
        session["early"] = 1
        await session.asave(end_of_request=False)
        other = memory.load_by_key(session.key)
        assert other is not None
        other["from_job"] = 2
        other.save()
        await session.areload()
        session["late"] = 3
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": repr(sorted(session)).encode()})

    response = call(AsgiMiddleware(app, handler=memory), "POST")
    assert response.text == "['early', 'from_job', 'late']"


def test_lifespan_shutdown_closes_what_the_middleware_created(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'sessions.db'}"
    upgrade(url)
    middleware = AsgiMiddleware(asgi_app(lambda s: s.put("a", 1)), SessionConfig(database_url=url))
    assert call(middleware, "POST").status_code == 200
    handler = middleware.handler
    assert isinstance(handler, DatabaseHandler)
    pool: Any = handler.engine.pool
    assert pool.checkedin() >= 1
    messages = iter([{"type": "lifespan.startup"}, {"type": "lifespan.shutdown"}])
    sent: list[str] = []

    async def receive() -> dict[str, Any]:
        return next(messages)

    async def send(message: dict[str, Any]) -> None:
        sent.append(message["type"])

    async def lifespan() -> None:
        scope = {"type": "lifespan"}
        await middleware(scope, receive, send)  # startup
        await middleware(scope, receive, send)  # shutdown

    asyncio.run(lifespan())
    assert sent == ["lifespan.startup.complete", "lifespan.shutdown.complete"]
    assert handler.engine.pool.checkedin() == 0  # the engine it built is disposed
    with pytest.raises(RuntimeError, match="closed"):
        asyncio.run(middleware.store.load("b" * 32 + "." + "x" * 40))  # and its worker threads are gone


def test_a_handler_passed_in_stays_open_after_lifespan_shutdown(memory: MemoryHandler) -> None:
    middleware = AsgiMiddleware(asgi_app(lambda s: None), handler=memory)
    asyncio.run(middleware.aclose())
    assert memory.load(None).is_new  # still usable: the caller owns it


def test_wsgi_warns_about_changes_made_after_the_response_started(
    memory: MemoryHandler, caplog: pytest.LogCaptureFixture
) -> None:
    def late_writer(environ: dict[str, Any], start_response: Any) -> Iterator[bytes]:
        start_response("200 OK", [])
        environ["sqla_sessions.session"]["too_late"] = True  # the cookie has gone out already
        yield b"body"

    with caplog.at_level(logging.WARNING, logger="sqla_sessions"):
        run_wsgi(WsgiMiddleware(late_writer, handler=memory))
    assert "after the response started" in caplog.text and len(memory) == 0


def test_a_request_in_flight_during_a_login_leaves_the_new_cookie_alone(memory: MemoryHandler) -> None:
    """A page load that started before a login of the same browser ends after it: its save is refused
    (it must not reach the logged-in session) and it sends no Set-Cookie (a deletion would log out)."""

    async def scenario() -> tuple[httpx.Response, httpx.Response, str]:
        loaded, logged_in = asyncio.Event(), asyncio.Event()

        async def app(scope: Scope, receive: Any, send: Any) -> None:
            session, path = scope["session"], scope["path"]
            if path == "/start":
                session["cart"] = ["a"]
            elif path == "/page":
                session.get("cart")
                loaded.set()
                await logged_in.wait()
                session["seen"] = True  # a write (previous_url alone is one, for an HTML page)
            elif path == "/login":
                await loaded.wait()
                session.login(42)
            await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/html")]})
            await send({"type": "http.response.body", "body": b"ok"})
            if path == "/login":
                logged_in.set()

        transport = httpx.ASGITransport(app=AsgiMiddleware(app, handler=memory))
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            cookie = (await client.get("/start")).cookies["session"]
            client.cookies.clear()
            headers = {"Cookie": f"session={cookie}"}
            page = asyncio.create_task(client.get("/page", headers=headers))
            login = await client.post("/login", headers=headers)
            return login, await page, cookie

    login, page, old = asyncio.run(scenario())
    assert cookie_value(login) != old
    assert page.status_code == 200 and page.headers.get_list("set-cookie") == []
    stored = memory.load(cookie_value(login))
    assert stored.user_id == "42" and "seen" not in stored


def test_a_reload_that_finds_the_session_cut_off_saves_nothing_and_sets_no_cookie(memory: MemoryHandler) -> None:
    cookie = cookie_value(call(AsgiMiddleware(asgi_app(lambda s: s.put("a", 1)), handler=memory), "POST"))

    def logged_in_elsewhere(session: Session) -> str:
        other = memory.load(cookie)
        other.login("alice")
        other.save()
        session.reload()  # gone under this key: a fresh session, which this request cannot save
        session["anonymous"] = True
        return "done"

    response = call(AsgiMiddleware(asgi_app(logged_in_elsewhere), handler=memory), "POST", cookie=cookie)
    assert response.status_code == 200 and response.headers.get_list("set-cookie") == []
    assert [info.user_id for info in memory.list_sessions("alice")] == ["alice"] and len(memory) == 1


def test_a_wsgi_request_in_flight_during_a_login_leaves_the_new_cookie_alone(memory: MemoryHandler) -> None:
    cookie = cookie_value(call(AsgiMiddleware(asgi_app(lambda s: s.put("a", 1)), handler=memory), "POST"))

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        session = environ["sqla_sessions.session"]
        other = memory.load(cookie)  # the login request, finishing while this one runs
        other.login("bob")
        other.save()
        session["late"] = True
        start_response("200 OK", [("Content-Type", "text/html")])
        return [b"ok"]

    status, headers, _ = run_wsgi(WsgiMiddleware(app, handler=memory), cookie=cookie)
    assert status.startswith("200") and not [v for k, v in headers if k.lower() == "set-cookie"]
    assert "late" not in memory.load_by_key(memory.list_sessions("bob")[0].key)  # type: ignore[operator]


def test_with_expire_on_close_a_remembered_cookie_persists_and_forgetting_ends_it(clock: FakeClock) -> None:
    handler = MemoryHandler(SessionConfig(lottery=(0, 1), expire_on_close=True), clock=clock)
    steps: dict[str, Callable[[Session], Any]] = {
        "remember": lambda s: s.login("ada", remember=True),
        "forget": lambda s: s.set_lifetime(),
    }
    mode = {"step": "remember"}
    app = AsgiMiddleware(asgi_app(lambda s: steps[mode["step"]](s)), handler=handler)
    remembered = cookie_header(call(app, "POST"))
    assert "Max-Age=2592000" in remembered  # a remembered login outlives the browser
    mode["step"] = "forget"
    forgotten = cookie_header(call(app, "POST", cookie=remembered.split(";", 1)[0].split("=", 1)[1]))
    assert "Max-Age" not in forgotten  # back to the config's: a browser-session cookie replaces it
