"""A Starlette app that dispatches session jobs, for the end-to-end tests (seed scenario)."""

import asyncio
import os
import uuid
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from sqla_sessions import DatabaseHandler, SessionConfig
from sqla_sessions.asgi import SessionMiddleware
from tests.jobs.worker import hydrate, slow_append


async def login(request: Request) -> JSONResponse:
    session = request.session
    session.login(request.path_params["user"])
    marker = session["marker"] = uuid.uuid4().hex
    session["user_agent"] = request.headers.get("user-agent", "")
    hydrate.send(session, marker)  # enqueued once this response's session is saved
    return JSONResponse({"marker": marker})


async def dashboard(request: Request) -> JSONResponse:
    session = request.session
    return JSONResponse({k: session.get(k) for k in ("dashboard", "hydrations", "runs")} | {"all": _keys(session)})


async def set_key(request: Request) -> JSONResponse:
    await asyncio.sleep(0.02)
    request.session[request.path_params["key"]] = True
    return JSONResponse({"ok": True})


async def logout(request: Request) -> JSONResponse:
    request.session.logout()
    return JSONResponse({"ok": True})


async def regenerate(request: Request) -> JSONResponse:
    request.session.regenerate()
    return JSONResponse({"ok": True})


async def append(request: Request) -> JSONResponse:
    request.session["kill_test"] = True
    slow_append.send(request.session, request.path_params["tag"], float(request.query_params.get("seconds", "5")))
    return JSONResponse({"ok": True})


def _keys(session: Any) -> list[str]:
    return sorted(k for k in session if not k.startswith("_"))


def app() -> SessionMiddleware:
    config = SessionConfig(database_url=os.environ["SQLA_SESSIONS_DATABASE_URL"], lottery=(0, 1))
    routes = [
        Route("/login/{user}", login, methods=["POST"]),
        Route("/dashboard", dashboard),
        Route("/set/{key}", set_key, methods=["POST"]),
        Route("/logout", logout, methods=["POST"]),
        Route("/regenerate", regenerate, methods=["POST"]),
        Route("/append/{tag}", append, methods=["POST"]),
    ]
    return SessionMiddleware(Starlette(routes=routes), handler=DatabaseHandler(config.database_url, config))
