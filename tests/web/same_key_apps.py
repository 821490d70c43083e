"""Apps whose requests all edit the same key of one session, for the three-way-merge tests over real HTTP.

`SQLA_SESSIONS_DATABASE_URL=memory` serves from a `MemoryHandler` (one process), anything else from
a `DatabaseHandler` configured by `SessionConfig.from_env()`. Every write sleeps a little first, so
concurrent requests all load the session before any of them saves: every save after the first loses
its compare-and-set and merges. `/blocking/…` routes are blocking; `assign` is a read-modify-write
by plain assignment, which only a blocking route keeps whole.
"""

import os
import time
from typing import Any

from sqla_sessions import DatabaseHandler, MemoryHandler, Session, SessionConfig
from sqla_sessions.store.handlers.base import BaseHandler

OVERLAP_SECONDS = 0.05


def _handler() -> BaseHandler[Any]:
    url = os.environ["SQLA_SESSIONS_DATABASE_URL"]
    config = SessionConfig.from_env(database_url="sqlite://" if url == "memory" else url, lottery=(0, 1))
    return MemoryHandler(config) if url == "memory" else DatabaseHandler(url, config)


def _edit(session: Session, what: str, arg: str) -> None:
    if what == "assign":
        value = session.get("m", 0)
        time.sleep(OVERLAP_SECONDS)
        session["m"] = value + 1
        return
    time.sleep(OVERLAP_SECONDS)
    if what == "seed":
        session.put({"cart": [], "prefs": {}})
    elif what == "push":
        session.push("cart", arg)
    elif what == "increment":
        session.increment("n")
    elif what == "pref":
        session["prefs"][arg] = 1
    elif what == "own":
        session[arg] = True


def _visible(session: Session) -> dict[str, Any]:
    return {k: v for k, v in session.items() if not k.startswith("_")}


def starlette_app() -> Any:
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    from sqla_sessions.asgi import SessionMiddleware

    async def edit(request: Request) -> JSONResponse:
        session: Session = request.session  # type: ignore[assignment]
        _edit(session, request.path_params["what"], request.path_params["arg"])
        return JSONResponse({"ok": True})

    async def read(request: Request) -> JSONResponse:
        return JSONResponse(_visible(request.session))  # type: ignore[arg-type]

    routes = [
        Route("/edit/{what}/{arg}", edit, methods=["POST"]),
        Route("/blocking/edit/{what}/{arg}", edit, methods=["POST"]),
        Route("/read", read),
    ]
    return SessionMiddleware(Starlette(routes=routes), handler=_handler(), blocking=["/blocking/*"])


def flask_app() -> Any:
    from flask import Flask, jsonify, session

    from sqla_sessions.flask import init_app

    app = Flask(__name__)
    init_app(app, handler=_handler(), blocking=["/blocking/*"])

    @app.post("/edit/<what>/<arg>")
    @app.post("/blocking/edit/<what>/<arg>")
    def edit(what: str, arg: str) -> Any:
        _edit(session._get_current_object(), what, arg)  # type: ignore[attr-defined]
        return jsonify(ok=True)

    @app.get("/read")
    def read() -> Any:
        return jsonify(_visible(session._get_current_object()))  # type: ignore[attr-defined]

    return app
