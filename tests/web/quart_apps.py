"""A Quart app on `sqla_sessions.quart.init_app`, served by hypercorn in `test_quart.py`.

It uses Flask's session idioms where they exist (`session[...]`, `session.clear()`) and
`current_session()` for ours (`push`, `login`). `quart_app()` reads `SQLA_SESSIONS_DATABASE_URL`.
"""

import asyncio
import os
import time
from typing import Any

from sqla_sessions import SessionConfig
from sqla_sessions.store.locking import blocking


def _visible(session: Any) -> dict[str, Any]:
    return {k: v for k, v in session.items() if not k.startswith("_")}


def quart_app() -> Any:
    from quart import Quart, session

    from sqla_sessions.quart import current_session, init_app

    app = Quart(__name__)
    config = SessionConfig(database_url=os.environ["SQLA_SESSIONS_DATABASE_URL"], lottery=(1, 10))
    init_app(app, config)

    @app.get("/read")
    async def read() -> dict[str, Any]:
        return {"data": _visible(session), "user": current_session().user_id, "key": current_session().key}

    @app.get("/untouched")
    async def untouched() -> str:
        return "ok"

    @app.post("/set/<key>")
    async def set_key(key: str) -> dict[str, Any]:
        session[key] = True
        return {"ok": True}

    @app.post("/push/<item>")
    async def push(item: str) -> dict[str, Any]:
        await asyncio.sleep(0.02)  # let the requests overlap
        current_session().push("items", item)
        return {"ok": True}

    @app.post("/append/<item>")
    async def append(item: str) -> dict[str, Any]:
        """Flask's idiom: a nested mutation, no `session.modified = True` needed."""
        items = session.setdefault("items", [])
        await asyncio.sleep(0.02)
        items.append(item)
        return {"ok": True}

    @app.post("/login/<user>")
    async def log_in(user: str) -> dict[str, Any]:
        current_session().login(user)
        return {"user": current_session().user_id}

    @app.post("/logout")
    async def log_out() -> dict[str, Any]:
        session.clear()  # Flask's idiom: on a logged-in session, an invalidation
        return {"ok": True}

    @app.post("/marked")
    @blocking
    async def marked() -> dict[str, Any]:
        entered = time.time()
        await asyncio.sleep(0.1)
        current = current_session()
        current.increment("n")
        return {"enter": entered, "exit": time.time(), "n": current["n"]}

    return app
