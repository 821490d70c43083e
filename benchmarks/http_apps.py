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


# -- peers a user could pick instead ------------------------------------------------------------------


def starsessions_app() -> Any:
    """starsessions with its Redis store (server-side, async)."""
    from starsessions import SessionAutoloadMiddleware, SessionMiddleware
    from starsessions.stores.redis import RedisStore

    store = RedisStore(os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/13"))
    middleware = [
        Middleware(SessionMiddleware, store=store, lifetime=7200, rolling=False),
        Middleware(SessionAutoloadMiddleware),
    ]
    return Starlette(routes=ROUTES, middleware=middleware)


def _flask_routes(app: Any) -> Any:
    from flask import session

    @app.get("/read")
    def read() -> str:
        return str(session.get("counter", 0))

    @app.post("/increment")
    def increment() -> str:
        session["counter"] = session.get("counter", 0) + 1
        return str(session["counter"])

    return app


def flask_session_app() -> Any:
    """Flask-Session with its SQLAlchemy backend on PostgreSQL (WSGI)."""
    from flask import Flask
    from flask_session import Session as FlaskSession
    from flask_sqlalchemy import SQLAlchemy

    app = Flask(__name__)
    app.config.update(
        SECRET_KEY="benchmark-secret",
        SESSION_TYPE="sqlalchemy",
        SQLALCHEMY_DATABASE_URI=os.environ["SQLA_SESSIONS_DATABASE_URL"],
        SESSION_SQLALCHEMY_TABLE=os.environ.get("BENCH_FLASK_TABLE", "flask_sessions"),
    )
    db = SQLAlchemy(app)
    app.config["SESSION_SQLALCHEMY"] = db
    FlaskSession(app)
    return _flask_routes(app)


def flask_sqla_app() -> Any:
    """The same Flask routes with sqla_sessions (WSGI)."""
    from flask import Flask

    from sqla_sessions import DatabaseHandler, SessionConfig
    from sqla_sessions.flask import init_app
    from sqla_sessions.handlers.engines import create_session_engine

    url = os.environ["SQLA_SESSIONS_DATABASE_URL"]
    config = SessionConfig(database_url=url, table=os.environ.get("SQLA_SESSIONS_TABLE", "sessions"), lottery=(0, 1))
    app = Flask(__name__)
    init_app(app, handler=DatabaseHandler(create_session_engine(url, autocommit=True, pool_size=20), config))
    return _flask_routes(app)


def flask_cookie_app() -> Any:
    """Flask's own signed-cookie sessions (the WSGI baseline)."""
    from flask import Flask

    app = Flask(__name__)
    app.config["SECRET_KEY"] = "benchmark-secret"
    return _flask_routes(app)
