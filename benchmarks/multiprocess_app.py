"""The app and the Dramatiq actor of `benchmarks/multiprocess.py`: imported by each uvicorn process
(`multiprocess_app:app`, a factory) and by the `dramatiq multiprocess_app` worker processes.

Configured the way a deployment is, from the environment: `SQLA_SESSIONS_*` (the PgBouncer URL,
`SQLA_SESSIONS_PREPARED_STATEMENTS=off`, …) for the middleware and the workers alike (the workers
build their handler with `SessionConfig.from_env()` on the first message), `MP_REDIS_URL` and
`MP_NAMESPACE` for the broker.

Every write is verifiable: `POST /write/{name}` sets the session key *name* and increments `writes`;
`POST /job/{name}` enqueues a job that sets *name* and increments `jobs` in the worker. Both answer
with *name*, so the load generator records exactly which keys were acknowledged (a 2xx), and
`GET /dump` shows what the session holds afterwards.
"""

from __future__ import annotations

import os
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import dramatiq
from dramatiq.brokers.redis import RedisBroker

from sqla_sessions import Session
from sqla_sessions.dramatiq import session_actor

REDIS_URL = os.environ.get("MP_REDIS_URL", "redis://127.0.0.1:6379/0")
NAMESPACE = os.environ.get("MP_NAMESPACE", "sqla-sessions-mp")
QUEUE = "mp-jobs"

# Redis, not RabbitMQ: its queue size counts messages until they are acked (processed), so the
# harness can wait for the jobs to have run, not merely to have been delivered.
broker = RedisBroker(url=REDIS_URL, namespace=NAMESPACE)  # type: ignore[no-untyped-call]
dramatiq.set_broker(broker)


@session_actor(queue_name=QUEUE, max_retries=3, min_backoff=100, max_backoff=1000)
def merge_key(session: Session, name: str) -> None:
    """A job's effect on the session: one new key and one more in a counter (both merged by key)."""
    session[name] = 1
    session.increment("jobs")


Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
ASGIApp = Callable[[Scope, Callable[[], Awaitable[Message]], Callable[[Message], Awaitable[None]]], Awaitable[None]]


class Timing:
    """Outermost ASGI wrapper: per route, the time from the request reaching the app to the last body
    byte handed to uvicorn (the server's share of wrk's latency, split by route, which wrk cannot do).

    `GET /_stats` answers the samples gathered so far as JSON (route -> [[status, seconds], …]) and
    starts over; it never reaches the session middleware.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.samples: dict[str, list[tuple[int, float]]] = {}

    async def __call__(self, scope: Scope, receive: Callable[[], Awaitable[Message]], send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path: str = scope["path"]
        if path == "/_stats":
            await self._stats(send)
            return
        route = path.split("/", 2)[1]
        started = time.perf_counter()
        status = 0

        async def timed_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                self.samples.setdefault(route, []).append((status, time.perf_counter() - started))

        await self.app(scope, receive, timed_send)

    async def _stats(self, send: Callable[[Message], Awaitable[None]]) -> None:
        import json

        body = json.dumps(self.samples).encode()
        self.samples = {}
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": body})


def app() -> Any:
    """The uvicorn factory: Starlette routes behind sqla_sessions' ASGI middleware, configured from the environment."""
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse, PlainTextResponse
    from starlette.routing import Route

    from sqla_sessions import SessionConfig
    from sqla_sessions.asgi import SessionMiddleware

    async def read(request: Request) -> PlainTextResponse:
        return PlainTextResponse(f"r{len(request.session)}")

    async def write(request: Request) -> PlainTextResponse:
        session: Session = request.session  # type: ignore[assignment]
        name = request.path_params["name"]
        session[name] = 1
        session.increment("writes")
        return PlainTextResponse(name)

    async def job(request: Request) -> PlainTextResponse:
        name = request.path_params["name"]
        # Enqueued once the session is saved (when the response starts), so a 2xx means "queued".
        merge_key.send(request.session, name)  # type: ignore[arg-type]
        return PlainTextResponse(name)

    async def dump(request: Request) -> JSONResponse:
        return JSONResponse({key: value for key, value in request.session.items() if not key.startswith("_")})

    routes = [
        Route("/read", read),
        Route("/write/{name}", write, methods=["POST"]),
        Route("/job/{name}", job, methods=["POST"]),
        Route("/dump", dump),
    ]
    return Timing(SessionMiddleware(Starlette(routes=routes), SessionConfig.from_env()))
