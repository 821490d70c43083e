"""The two apps the HTTP benchmark serves: the same Starlette routes with sqla_sessions or with
Starlette's own signed-cookie sessions (no database at all: the baseline)."""

import os
from typing import Any

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route


async def read(request: Request) -> PlainTextResponse:
    return PlainTextResponse(str(request.session.get("counter", 0)))


async def increment(request: Request) -> PlainTextResponse:
    request.session["counter"] = request.session.get("counter", 0) + 1
    return PlainTextResponse(str(request.session["counter"]))


ROUTES = [Route("/read", read), Route("/increment", increment, methods=["POST"])]


def cookie_app() -> Any:
    from starlette.middleware.sessions import SessionMiddleware

    return Starlette(routes=ROUTES, middleware=[Middleware(SessionMiddleware, secret_key="benchmark-secret")])


def sqla_app() -> Any:
    from sqla_sessions import DatabaseHandler, SessionConfig
    from sqla_sessions.asgi import SessionMiddleware
    from sqla_sessions.handlers.engines import create_session_engine

    url = os.environ["SQLA_SESSIONS_DATABASE_URL"]
    config = SessionConfig(database_url=url, table=os.environ.get("SQLA_SESSIONS_TABLE", "sessions"), lottery=(0, 1))
    engine = create_session_engine(
        url, autocommit=True, pool_size=int(os.environ.get("BENCH_POOL", "70")), max_overflow=10
    )
    async_engine = "auto" if os.environ.get("BENCH_MODE") == "async-engine" else None
    return SessionMiddleware(
        Starlette(routes=ROUTES), config, handler=DatabaseHandler(engine, config), async_engine=async_engine
    )
