"""A Litestar app on `SqlaSessionsPlugin`, served by uvicorn in `test_litestar.py`.

It uses Litestar's own session calls where Litestar has them (`request.session`,
`request.set_session`, `request.clear_session`) and `get_session` for ours (`push`, `login`).
`litestar_app()` reads `SQLA_SESSIONS_DATABASE_URL`.
"""

import asyncio
import os
import time
from dataclasses import dataclass
from typing import Any

from sqla_sessions import Session, SessionConfig
from sqla_sessions.store.locking import blocking


def _visible(session: Any) -> dict[str, Any]:
    return {k: v for k, v in session.items() if not k.startswith("_")}


@dataclass
class Profile:
    name: str
    langs: list[str]


def litestar_app() -> Any:
    from litestar import Litestar, Request, get, post
    from litestar.params import FromPath

    from sqla_sessions.litestar import SqlaSessionsPlugin, get_session, login

    @get("/read")
    async def read(request: Request[Any, Any, Any]) -> dict[str, Any]:
        session: Session = get_session(request)
        return {"data": _visible(request.session), "user": session.user_id, "key": session.key}

    @get("/untouched")
    async def untouched() -> str:
        return "ok"

    @post("/set/{key:str}", status_code=200)
    async def set_key(key: FromPath[str], request: Request[Any, Any, Any]) -> dict[str, Any]:
        request.session[key] = True  # Litestar's dict access: the Session itself
        return {"ok": True}

    @post("/push/{item:str}", status_code=200)
    async def push(item: FromPath[str], request: Request[Any, Any, Any]) -> dict[str, Any]:
        await asyncio.sleep(0.02)  # let the requests overlap
        get_session(request).push("items", item)
        return {"ok": True}

    @post("/replace-append/{item:str}", status_code=200)
    async def replace_append(item: FromPath[str], request: Request[Any, Any, Any]) -> dict[str, Any]:
        """A read-modify-replace through Litestar's set_session: still merged per key."""
        current = dict(request.session)
        await asyncio.sleep(0.02)
        request.set_session({**current, "items": [*current.get("items", []), item]})
        return {"ok": True}

    @post("/replace", status_code=200)
    async def replace(request: Request[Any, Any, Any]) -> dict[str, Any]:
        request.set_session({"fresh": True, "kept": request.session.get("kept")})
        return {"ok": True}

    @post("/replace-model", status_code=200)
    async def replace_model(request: Request[Any, Any, Any]) -> dict[str, Any]:
        request.set_session(Profile("ada", ["en", "fr"]))  # type: ignore[arg-type]
        return {"ok": True}

    @post("/replace-then-read", status_code=200)
    async def replace_then_read(request: Request[Any, Any, Any]) -> dict[str, Any]:
        request.set_session({"only": 1})
        return {"data": _visible(get_session(request))}  # applied at once by get_session

    @post("/login/{user:str}", status_code=200)
    async def log_in(user: FromPath[str], request: Request[Any, Any, Any]) -> dict[str, Any]:
        return {"user": login(request, user).user_id}

    @post("/logout", status_code=200)
    async def log_out(request: Request[Any, Any, Any]) -> dict[str, Any]:
        request.clear_session()
        return {"ok": True}

    @post("/logout-with-notice", status_code=200)
    async def log_out_with_notice(request: Request[Any, Any, Any]) -> dict[str, Any]:
        request.clear_session()
        request.set_session({"notice": "You are logged out"})  # the natural pattern after a clear
        return {"ok": True}

    @post("/marked", status_code=200)
    @blocking
    async def marked(request: Request[Any, Any, Any]) -> dict[str, Any]:
        entered = time.time()
        await asyncio.sleep(0.1)
        session = get_session(request)
        session.increment("n")
        return {"enter": entered, "exit": time.time(), "n": session["n"]}

    config = SessionConfig(database_url=os.environ["SQLA_SESSIONS_DATABASE_URL"], lottery=(1, 10))
    handlers = [read, untouched, set_key, push, replace_append, replace, replace_model, replace_then_read]
    return Litestar(
        route_handlers=[*handlers, log_in, log_out, log_out_with_notice, marked],
        plugins=[SqlaSessionsPlugin(config)],
    )
