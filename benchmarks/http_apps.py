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


def _listened(engine: Any) -> Any:
    """*engine*, with a SQLAlchemy event listener attached when BENCH_LISTENER is set (what a statement
    counter or OpenTelemetry's SQLAlchemy instrumentation adds): its cost, measured."""
    if os.environ.get("BENCH_LISTENER"):
        import sqlalchemy as sa

        sa.event.listen(engine, "before_cursor_execute", lambda *args: None)
    return engine


def cookie_app() -> Any:
    from starlette.middleware.sessions import SessionMiddleware

    return Starlette(routes=ROUTES, middleware=[Middleware(SessionMiddleware, secret_key="benchmark-secret")])


def sqla_app() -> Any:
    from sqla_sessions import DatabaseHandler, SessionConfig
    from sqla_sessions.asgi import SessionMiddleware
    from sqla_sessions.store.handlers.engines import create_session_engine

    url = os.environ["SQLA_SESSIONS_DATABASE_URL"]
    config = SessionConfig(database_url=url, table=os.environ.get("SQLA_SESSIONS_TABLE", "sessions"), lottery=(0, 1))
    engine = _listened(
        create_session_engine(url, autocommit=True, pool_size=int(os.environ.get("BENCH_POOL", "70")), max_overflow=10)
    )
    async_engine = "auto" if os.environ.get("BENCH_MODE") == "async-engine" else None
    if os.environ.get("BENCH_MODE") == "memory":
        from sqla_sessions import MemoryHandler

        return SessionMiddleware(Starlette(routes=ROUTES), config, handler=MemoryHandler(config))
    return SessionMiddleware(
        Starlette(routes=ROUTES), config, handler=DatabaseHandler(engine, config), async_engine=async_engine
    )


def sqla_defaults_app() -> Any:
    """sqla_sessions as a user deploys it: the middleware builds its handler and engine from the config."""
    from sqla_sessions import SessionConfig
    from sqla_sessions.asgi import SessionMiddleware

    url = os.environ["SQLA_SESSIONS_DATABASE_URL"]
    config = SessionConfig(database_url=url, table=os.environ.get("SQLA_SESSIONS_TABLE", "sessions"), lottery=(0, 1))
    return SessionMiddleware(Starlette(routes=ROUTES), config)


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
    from sqla_sessions.store.handlers.engines import create_session_engine

    url = os.environ["SQLA_SESSIONS_DATABASE_URL"]
    config = SessionConfig(database_url=url, table=os.environ.get("SQLA_SESSIONS_TABLE", "sessions"), lottery=(0, 1))
    app = Flask(__name__)
    engine = _listened(create_session_engine(url, autocommit=True, pool_size=20))
    init_app(app, handler=DatabaseHandler(engine, config))
    return _flask_routes(app)


def flask_cookie_app() -> Any:
    """Flask's own signed-cookie sessions (the WSGI baseline)."""
    from flask import Flask

    app = Flask(__name__)
    app.config["SECRET_KEY"] = "benchmark-secret"
    return _flask_routes(app)


def django_app() -> Any:
    """Django's database sessions (`django.contrib.sessions.backends.db`) on PostgreSQL (WSGI).

    Persistent connections (CONN_MAX_AGE=None), as a production Django site would run; no CSRF
    middleware, so the POST route is comparable with the others.
    """
    import django
    from django.conf import settings
    from django.core.management import call_command
    from django.core.wsgi import get_wsgi_application
    from django.http import HttpRequest, HttpResponse
    from django.urls import path
    from sqlalchemy.engine import make_url

    url = make_url(os.environ["SQLA_SESSIONS_DATABASE_URL"])

    def text(body: str) -> HttpResponse:
        response = HttpResponse(body, content_type="text/plain")
        response["Content-Length"] = str(len(body))  # else gunicorn chunks it, as the others' are not
        return response

    def read_view(request: HttpRequest) -> HttpResponse:
        return text(str(request.session.get("counter", 0)))

    def increment_view(request: HttpRequest) -> HttpResponse:
        request.session["counter"] = request.session.get("counter", 0) + 1
        return text(str(request.session["counter"]))

    settings.configure(
        DEBUG=False,
        SECRET_KEY="benchmark-secret-" + "x" * 40,
        ALLOWED_HOSTS=["*"],
        ROOT_URLCONF=__name__,
        INSTALLED_APPS=["django.contrib.sessions"],
        MIDDLEWARE=["django.contrib.sessions.middleware.SessionMiddleware"],
        SESSION_ENGINE="django.contrib.sessions.backends.db",
        DATABASES={
            "default": {
                "ENGINE": "django.db.backends.postgresql",
                "NAME": os.environ["BENCH_DJANGO_DB"],
                "USER": url.username or "postgres",
                "HOST": url.host or "127.0.0.1",
                "PORT": str(url.port or 5432),
                "CONN_MAX_AGE": None,
            }
        },
    )
    globals()["urlpatterns"] = [path("read", read_view), path("increment", increment_view)]
    django.setup()
    call_command("migrate", "sessions", verbosity=0)
    return get_wsgi_application()
