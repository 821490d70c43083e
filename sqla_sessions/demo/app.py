"""The demo's Starlette app."""

from __future__ import annotations

import asyncio
import contextlib
import random
import secrets
from collections.abc import AsyncIterator
from typing import Any

import dramatiq
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from starlette.routing import Route

from ..asgi import SessionMiddleware
from ..config import SessionConfig
from ..core.session import Session
from ..csrf import CSRFMiddleware
from ..dramatiq import configure
from ..http.useragents import describe
from ..store.handlers.database import DatabaseHandler
from . import jobs, pages


def create_app(config: SessionConfig, *, in_process_worker: bool) -> SessionMiddleware:
    """Build the demo; with *in_process_worker*, a Dramatiq worker runs inside this process."""
    handler = DatabaseHandler(config.database_url, config)
    configure(handler)  # the in-process worker's actors use it too

    def session_of(request: Request) -> Session:
        session = request.session
        assert isinstance(session, Session)
        return session

    async def home(request: Request) -> Response:
        session = session_of(request)
        user, token = session.user_id, session.token()
        if user is None:
            return HTMLResponse(pages.layout("sqla_sessions demo", pages.login_form(token), token=token))
        infos = await asyncio.to_thread(handler.list_sessions, user)
        rows = "".join(
            pages.device_row(
                info.key,
                *describe(info.user_agent),
                info.ip_address or "-",
                info.last_activity.strftime("%H:%M:%S UTC"),
                info.key == session.key,
                token,
            )
            for info in infos
        )
        body = pages.dashboard(session.get("status"), rows, sum(info.key != session.key for info in infos), token)
        return HTMLResponse(pages.layout("Your dashboard", body, user=user, token=token))

    async def login(request: Request) -> Response:
        form = await request.form()
        name = str(form.get("name", "")).strip()[:64] or "guest"
        session = session_of(request)
        session.login(name)  # a new id: the cookie an attacker planted is worthless now
        marker = session["marker"] = secrets.token_hex(8)
        session["dashboard"] = None
        session.flash("status", f"Welcome, {name}! Your dashboard is being prepared by a background job.")
        jobs.hydrate.send(session, marker)  # enqueued after this response's session is saved
        return RedirectResponse("/", status_code=303)

    async def logout(request: Request) -> Response:
        session_of(request).logout()
        return RedirectResponse("/", status_code=303)

    async def dashboard(request: Request) -> Response:
        return JSONResponse({"dashboard": session_of(request).get("dashboard")})

    async def revoke(request: Request) -> Response:
        session = session_of(request)
        key = str((await request.form()).get("key", ""))
        mine = {info.key for info in await asyncio.to_thread(handler.list_sessions, session.user_id)}
        if session.user_id is not None and key in mine and key != session.key:
            await asyncio.to_thread(handler.revoke, key)
            session.flash("status", "That device has been logged out.")
        return RedirectResponse("/", status_code=303)

    async def revoke_others(request: Request) -> Response:
        session = session_of(request)
        if session.user_id is not None:
            count = await asyncio.to_thread(handler.revoke_user, session.user_id, except_key=session.key)
            session.flash("status", f"Logged out {count} other device(s).")
        return RedirectResponse("/", status_code=303)

    async def race_page(request: Request) -> Response:
        session = session_of(request)
        return HTMLResponse(
            pages.layout("Race: 50 parallel writes", pages.RACE, user=session.user_id, token=session.token())
        )

    async def race_write(request: Request) -> Response:
        await asyncio.sleep(random.uniform(0, 0.03))
        n = int(request.path_params["n"])
        if request.path_params["kind"] == "list":
            session_of(request).push("race_list", n)  # the same key for all 50: merged three-way
        else:
            session_of(request)[f"race_{n}"] = True
        return JSONResponse({"ok": True})

    async def race_reset(request: Request) -> Response:
        session = session_of(request)
        session.forget(*[k for k in session if k.startswith("race_")])
        session["race_started"] = True  # a first-time visitor gets a stored session before the race
        return JSONResponse({"ok": True})

    async def race_result(request: Request) -> Response:
        session = session_of(request)
        keys = sorted(k for k in session if k.startswith("race_") and k not in ("race_started", "race_list"))
        pushed: list[int] = session.get("race_list", [])
        return JSONResponse({"keys": len(keys), "list": len(set(pushed)), "kept_keys": keys, "kept_items": pushed})

    async def blocking_page(request: Request) -> Response:
        session = session_of(request)
        return HTMLResponse(
            pages.layout("Blocking sessions", pages.BLOCKING, user=session.user_id, token=session.token())
        )

    async def increment(request: Request) -> Response:
        key = "blocking_counter" if request.url.path.startswith("/api/blocking/") else "plain_counter"
        session = session_of(request)
        value = session.get(key, 0)
        await asyncio.sleep(0.05)  # read, think, write: a race unless the requests run one at a time
        session[key] = value + 1
        return JSONResponse({key: value + 1})

    async def counters(request: Request) -> Response:
        session = session_of(request)
        return JSONResponse({"plain": session.get("plain_counter", 0), "blocking": session.get("blocking_counter", 0)})

    @contextlib.asynccontextmanager
    async def lifespan(app: Any) -> AsyncIterator[None]:
        worker = None
        if in_process_worker:
            worker = dramatiq.Worker(jobs.broker, worker_threads=2, worker_timeout=100)
            worker.start()
        try:
            yield
        finally:
            if worker is not None:
                worker.stop()

    routes = [
        Route("/", home),
        Route("/login", login, methods=["POST"]),
        Route("/logout", logout, methods=["POST"]),
        Route("/api/dashboard", dashboard),
        Route("/devices/revoke", revoke, methods=["POST"]),
        Route("/devices/revoke-others", revoke_others, methods=["POST"]),
        Route("/race", race_page),
        Route("/api/race/reset", race_reset, methods=["POST"]),
        Route("/api/race/{kind:str}/{n:int}", race_write, methods=["POST"]),
        Route("/api/race", race_result),
        Route("/blocking", blocking_page),
        Route("/api/increment", increment, methods=["POST"]),
        Route("/api/blocking/increment", increment, methods=["POST"]),
        Route("/api/counters", counters),
    ]
    app = Starlette(routes=routes, lifespan=lifespan)
    # Every POST (forms, and the scripts' fetches) carries the session's CSRF token: without it,
    # another site could sign a visitor in as someone else (login CSRF) or log devices out.
    return SessionMiddleware(CSRFMiddleware(app), config, handler=handler, blocking=["/api/blocking/*"])
