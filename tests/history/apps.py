"""The apps the history checker drives: one route per operation, on Starlette (uvicorn) and Flask
(gunicorn gthread), both on the database in `SQLA_SESSIONS_DATABASE_URL`.

Each route saves explicitly and answers how the save ended, so the client knows what was acknowledged:
200 `{"saved": true}` (written; `"fresh": true` when the cookie named no live session and the
request got a new one), 409 `{"saved": false}` (refused: the session ended or a login cut it
off meanwhile — nothing of this request may appear anywhere). Anything else (503, 423, a timeout, a
dropped connection) leaves the outcome unknown: present at most once.
"""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any

from sqla_sessions import Session, SessionConfig, SessionInterrupted


def config() -> SessionConfig:
    return SessionConfig(
        database_url=os.environ["SQLA_SESSIONS_DATABASE_URL"],
        lottery=(0, 1),
        block_wait_seconds=3,
        block_lock_seconds=3,
        pool_timeout=3,
    )


def apply(session: Session, op: dict[str, Any]) -> None:
    """One operation on the shared keys (values are unique across the whole history)."""
    kind, value = op["kind"], op.get("value")
    if kind == "push":
        session.push("log", value)
    elif kind == "remove":
        log = session.get("log")
        if isinstance(log, list) and value in log:
            log.remove(value)
    elif kind == "swap":  # remove an item and push a new one, in one request
        log = session.setdefault("log", [])
        if value in log:
            log.remove(value)
        log.append(op["new"])
    elif kind == "insert":
        session.setdefault("log", []).insert(0, value)
    elif kind == "incr":
        session.increment("n")
    elif kind == "dset":
        session.setdefault("prefs", {}).setdefault("deep", {})[value] = value
    elif kind == "sadd":
        session.setdefault("tags", set()).add(value)
    elif kind == "sdiscard":
        tags = session.get("tags")
        if isinstance(tags, set):
            tags.discard(value)
    elif kind == "regenerate":
        session.regenerate()
    elif kind == "login":
        session.login(op["user"])
    elif kind == "job":
        from tests.history.worker import push_job

        session.ensure_stored()  # a job addresses a stored session (a fresh one is stored by this save)
        push_job.send(session, value)  # enqueued once the session is saved
    else:
        raise ValueError(kind)


def starlette_app() -> Any:
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    from sqla_sessions.asgi import SessionMiddleware

    async def operate(request: Request) -> JSONResponse:
        op = await request.json()
        session: Session = request.scope["session"]
        fresh = session.is_new  # the cookie named no live session: this request got a new one
        apply(session, op)
        if op.get("sleep"):
            await asyncio.sleep(op["sleep"])  # a slow request: overlaps, or its client gives up
        try:
            if op.get("asave_timeout"):
                try:  # an app that bounds its save and carries on: the save must still count once
                    await asyncio.wait_for(session.asave(end_of_request=False), op["asave_timeout"])
                except TimeoutError:
                    pass
                if op["kind"] == "push":
                    session.push("log", f"{op['value']}-after")  # a change after the timeout: kept, once
            await session.asave(end_of_request=False)
        except SessionInterrupted:
            return JSONResponse({"saved": False, "fresh": fresh}, status_code=409)
        return JSONResponse({"saved": True, "fresh": fresh})

    routes = [Route("/op", operate, methods=["POST"]), Route("/blocking/op", operate, methods=["POST"])]
    return SessionMiddleware(
        Starlette(routes=routes), config(), blocking=lambda scope: scope["path"].startswith("/blocking/")
    )


def flask_app() -> Any:
    import flask

    from sqla_sessions.flask import init_app

    app = flask.Flask(__name__)

    def operate() -> Any:
        op = flask.request.get_json()
        session: Any = flask.session
        fresh = session.is_new
        apply(session, op)
        if op.get("sleep"):
            time.sleep(op["sleep"])
        try:
            session.save(end_of_request=False)
        except SessionInterrupted:
            return flask.jsonify(saved=False, fresh=fresh), 409
        return flask.jsonify(saved=True, fresh=fresh)

    app.add_url_rule("/op", "op", operate, methods=["POST"])
    app.add_url_rule("/blocking/op", "blocking_op", operate, methods=["POST"])
    init_app(app, config(), blocking=["/blocking/*"])
    return app
