"""One small app per framework, all with the same routes, served by real servers in the web tests.

Each factory reads `SQLA_SESSIONS_DATABASE_URL` and counts the SQL statements its session engines run
(`GET /stats`, `POST /stats/reset`), so tests can check the hot path over real HTTP.
"""

import asyncio
import json
import os
import threading
import time
from typing import Any

import sqlalchemy as sa

from sqla_sessions import DatabaseHandler, Session, SessionConfig
from sqla_sessions.store.handlers.engines import create_session_engine
from sqla_sessions.store.handlers.runner import Runner
from sqla_sessions.store.locking import blocking

EVIL = "v\r\nSet-Cookie: pwned=1\r\nX-Injected: yes"


class Counter:
    """Counts the statements the server sends: the hot ones around the runner's one method (which still
    runs as in production), every other through SQLAlchemy's events."""

    def __init__(self) -> None:
        self.count = 0
        self.hot = 0  # of which on the runner's path, the one production runs
        self._lock = threading.Lock()
        _COUNTERS.append(self)

    def watch(self, engine: sa.Engine) -> None:
        sa.event.listen(engine, "before_cursor_execute", self._on_execute)

    def _on_execute(self, *args: Any) -> None:
        with self._lock:
            self.count += 1


_COUNTERS: list[Counter] = []
_run = Runner._run


def _observed(runner: Any, *args: Any) -> Any:
    for counter in _COUNTERS:
        counter._on_execute()
        counter.hot += 1
    return _run(runner, *args)


Runner._run = _observed  # type: ignore[method-assign]


def _config() -> SessionConfig:
    return SessionConfig(
        database_url=os.environ["SQLA_SESSIONS_DATABASE_URL"],
        lottery=(0, 1),
        block_wait_seconds=float(os.environ.get("TEST_BLOCK_WAIT", "10")),
        block_lock_seconds=float(os.environ.get("TEST_BLOCK_HOLD", "10")),
    )


def _handler() -> DatabaseHandler:
    config = _config()
    pool_size = os.environ.get("TEST_POOL_SIZE")
    if pool_size is None:
        return DatabaseHandler(config.database_url, config)
    engine = create_session_engine(config.database_url, autocommit=True, pool_size=int(pool_size), max_overflow=0)
    return DatabaseHandler(engine, config)


def _blocking_work(session: Session, ms: float) -> dict[str, Any]:
    """Record when this request held the session, and count it (a read-modify-write of one key)."""
    entered = time.time()
    time.sleep(ms / 1000)
    session.increment("n")
    return {"enter": entered, "exit": time.time(), "n": session["n"]}


def _visible(session: Session) -> dict[str, Any]:
    return {k: v for k, v in session.items() if not k.startswith("_")}


# -- ASGI: Starlette and FastAPI ---------------------------------------------------------------------


def starlette_app() -> Any:
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import HTMLResponse, JSONResponse, PlainTextResponse
    from starlette.routing import Route

    from sqla_sessions.asgi import SessionMiddleware
    from sqla_sessions.starlette import marked_blocking

    counter = Counter()

    async def read(request: Request) -> JSONResponse:
        return JSONResponse({"data": _visible(request.session), "user": request.session.user_id})

    async def untouched(request: Request) -> PlainTextResponse:
        return PlainTextResponse("ok")

    async def set_key(request: Request) -> JSONResponse:
        await asyncio.sleep(0.02)
        request.session[request.path_params["key"]] = True
        return JSONResponse({"ok": True})

    async def login(request: Request) -> JSONResponse:
        request.session.login(request.path_params["user"])
        return JSONResponse({"user": request.session.user_id})

    async def logout(request: Request) -> JSONResponse:
        request.session.logout()
        return JSONResponse({"ok": True})

    async def inject(request: Request) -> JSONResponse:
        request.session[EVIL] = EVIL
        return JSONResponse({"ok": True})

    async def boom(request: Request) -> JSONResponse:
        request.session["boom"] = True
        raise RuntimeError("the app failed")

    async def page(request: Request) -> HTMLResponse:
        return HTMLResponse(f"<p>{request.session.previous_url}</p>")

    async def stats(request: Request) -> JSONResponse:
        if request.method == "POST":
            counter.count = counter.hot = 0
        return JSONResponse({"statements": counter.count, "hot": counter.hot})

    @blocking
    async def blocking_work(request: Request) -> JSONResponse:
        ms = float(request.query_params.get("ms", "200"))
        entered = time.time()
        await asyncio.sleep(ms / 1000)
        request.session.increment("n")
        return JSONResponse({"enter": entered, "exit": time.time(), "n": request.session["n"]})

    async def blocking_boom(request: Request) -> JSONResponse:
        request.session["boom"] = True
        raise RuntimeError("the app failed while holding the session")

    async def blocking_stream(request: Request) -> Any:
        from starlette.responses import StreamingResponse

        request.session.increment("streams")

        async def body() -> Any:
            for _ in range(10):
                await asyncio.sleep(0.1)
                yield b"."

        return StreamingResponse(body(), media_type="text/plain")

    routes = [
        Route("/read", read),
        Route("/untouched", untouched),
        Route("/set/{key}", set_key, methods=["POST"]),
        Route("/login/{user}", login, methods=["POST"]),
        Route("/logout", logout, methods=["POST"]),
        Route("/inject", inject, methods=["POST"]),
        Route("/boom", boom, methods=["POST"]),
        Route("/page", page),
        Route("/stats", stats, methods=["GET", "POST"]),
        Route("/marked/work", blocking_work, methods=["POST"]),  # blocking by its @blocking marker
        Route("/blocking/work", blocking_work, methods=["POST"]),
        Route("/blocking/boom", blocking_boom, methods=["POST"]),
        Route("/blocking/stream", blocking_stream),
    ]

    async def failed(request: Request, exc: Exception) -> PlainTextResponse:
        return PlainTextResponse("failed", status_code=500)

    app = Starlette(routes=routes, exception_handlers={RuntimeError: failed})
    marked = marked_blocking(app)
    middleware = SessionMiddleware(
        app,
        handler=_handler(),
        blocking=lambda scope: scope["path"].startswith("/blocking/") or marked(scope),
    )
    _watch(counter, middleware)
    return middleware


def fastapi_app() -> Any:
    from fastapi import FastAPI, Request
    from fastapi.responses import HTMLResponse

    from sqla_sessions.asgi import SessionMiddleware

    app = FastAPI()
    counter = Counter()

    @app.exception_handler(RuntimeError)
    async def failed(request: Request, exc: Exception) -> Any:
        from fastapi.responses import PlainTextResponse

        return PlainTextResponse("failed", status_code=500)

    @app.get("/read")
    async def read(request: Request) -> dict[str, Any]:
        return {"data": _visible(request.session), "user": request.session.user_id}

    @app.get("/untouched")
    async def untouched() -> str:
        return "ok"

    @app.post("/set/{key}")
    async def set_key(key: str, request: Request) -> dict[str, Any]:
        await asyncio.sleep(0.02)
        request.session[key] = True
        return {"ok": True}

    @app.post("/login/{user}")
    async def login(user: str, request: Request) -> dict[str, Any]:
        request.session.login(user)
        return {"user": request.session.user_id}

    @app.post("/logout")
    async def logout(request: Request) -> dict[str, Any]:
        request.session.logout()
        return {"ok": True}

    @app.post("/inject")
    async def inject(request: Request) -> dict[str, Any]:
        request.session[EVIL] = EVIL
        return {"ok": True}

    @app.post("/boom")
    async def boom(request: Request) -> dict[str, Any]:
        request.session["boom"] = True
        raise RuntimeError("the app failed")

    @app.get("/page", response_class=HTMLResponse)
    async def page(request: Request) -> str:
        return f"<p>{request.session.previous_url}</p>"

    @app.api_route("/stats", methods=["GET", "POST"])
    async def stats(request: Request) -> dict[str, Any]:
        if request.method == "POST":
            counter.count = counter.hot = 0
        return {"statements": counter.count, "hot": counter.hot}

    # FastAPI runs on the AsyncEngine path, Starlette on the default thread pool: both are served.
    middleware = SessionMiddleware(app, handler=_handler(), async_engine="auto")
    _watch(counter, middleware)
    return middleware


def _watch(counter: Counter, middleware: Any) -> None:
    counter.watch(middleware.handler.engine)
    engine = middleware.store._engine
    if engine is not None:
        counter.watch(engine.sync_engine)


# -- WSGI: Flask and a bare PEP 3333 app ---------------------------------------------------------------


def flask_app() -> Any:
    from flask import Flask, jsonify, session

    from sqla_sessions.flask import init_app

    app = Flask(__name__)
    handler = _handler()
    init_app(app, handler=handler, blocking=["/blocking/*"])
    counter = Counter()
    counter.watch(handler.engine)

    def current() -> Session:
        assert isinstance(session._get_current_object(), Session)  # type: ignore[attr-defined]
        return session._get_current_object()  # type: ignore[attr-defined, no-any-return]

    @app.get("/read")
    def read() -> Any:
        return jsonify(data=_visible(current()), user=current().user_id)

    @app.get("/untouched")
    def untouched() -> Any:
        return "ok"

    @app.post("/set/<key>")
    def set_key(key: str) -> Any:
        time.sleep(0.02)
        session[key] = True
        return jsonify(ok=True)

    @app.post("/login/<user>")
    def login(user: str) -> Any:
        current().login(user)
        return jsonify(user=current().user_id)

    @app.post("/logout")
    def logout() -> Any:
        current().logout()
        return jsonify(ok=True)

    @app.post("/inject")
    def inject() -> Any:
        session[EVIL] = EVIL
        return jsonify(ok=True)

    @app.post("/boom")
    def boom() -> Any:
        session["boom"] = True
        raise RuntimeError("the app failed")

    @app.get("/page")
    def page() -> Any:
        return f"<p>{current().previous_url}</p>"

    @app.route("/stats", methods=["GET", "POST"])
    def stats() -> Any:
        from flask import request

        if request.method == "POST":
            counter.count = counter.hot = 0
        return jsonify(statements=counter.count, hot=counter.hot)

    def work() -> Any:
        from flask import request

        return jsonify(_blocking_work(current(), float(request.args.get("ms", "200"))))

    app.post("/blocking/work")(work)
    app.post("/marked/work", endpoint="marked_work")(blocking(lambda: work()))

    @app.post("/blocking/boom")
    def blocking_boom() -> Any:
        session["boom"] = True
        raise RuntimeError("the app failed while holding the session")

    return app


def wsgi_app() -> Any:
    from sqla_sessions.wsgi import SessionMiddleware

    handler = _handler()
    counter = Counter()
    counter.watch(handler.engine)

    def respond(start_response: Any, body: Any, content_type: str = "application/json") -> list[bytes]:
        data = body.encode() if isinstance(body, str) else json.dumps(body).encode()
        start_response("200 OK", [("Content-Type", content_type), ("Content-Length", str(len(data)))])
        return [data]

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        session: Session = environ["sqla_sessions.session"]
        method, path = environ["REQUEST_METHOD"], environ["PATH_INFO"]
        if path == "/read":
            return respond(start_response, {"data": _visible(session), "user": session.user_id})
        if path == "/untouched":
            return respond(start_response, "ok", "text/plain")
        if path.startswith("/set/") and method == "POST":
            time.sleep(0.02)
            session[path[5:]] = True
            return respond(start_response, {"ok": True})
        if path.startswith("/login/"):
            session.login(path[7:])
            return respond(start_response, {"user": session.user_id})
        if path == "/logout":
            session.logout()
            return respond(start_response, {"ok": True})
        if path == "/inject":
            session[EVIL] = EVIL
            return respond(start_response, {"ok": True})
        if path == "/boom":
            session["boom"] = True
            raise RuntimeError("the app failed")
        if path == "/page":
            return respond(start_response, f"<p>{session.previous_url}</p>", "text/html; charset=utf-8")
        if path == "/stats":
            if method == "POST":
                counter.count = counter.hot = 0
            return respond(start_response, {"statements": counter.count, "hot": counter.hot})
        if path == "/blocking/work" and method == "POST":
            environ["wsgi.input"].read()  # a form the app reads, as a CSRF check would
            query = dict(part.partition("=")[::2] for part in environ.get("QUERY_STRING", "").split("&") if part)
            return respond(start_response, _blocking_work(session, float(query.get("ms", "200"))))
        start_response("404 Not Found", [("Content-Type", "text/plain")])
        return [b"not found"]

    return SessionMiddleware(app, handler=handler, blocking=["/blocking/*"])
