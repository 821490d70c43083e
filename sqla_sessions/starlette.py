"""Starlette/FastAPI helpers: mark endpoints as blocking.

    from sqla_sessions.store.locking import blocking
    from sqla_sessions.starlette import marked_blocking

    @app.post("/checkout")
    @blocking
    async def checkout(request: Request): ...

    app = SessionMiddleware(app, config, blocking=marked_blocking(app))

The middleware has to decide before the app routes the request, so `marked_blocking` matches the
scope against the app's top-level routes itself (Starlette's `Route.matches`). Routes inside mounted
sub-applications are not seen: give those a path glob instead.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .store.locking import is_marked_blocking


def marked_blocking(app: Any) -> Callable[[Any], bool]:
    """A `blocking=` predicate: True for requests whose route's endpoint was marked with `@blocking`."""
    from starlette.routing import Match

    def is_blocking(scope: Any) -> bool:
        for route in getattr(app, "routes", ()):
            match, _ = route.matches(scope)
            if match is Match.FULL:
                return is_marked_blocking(getattr(route, "endpoint", None))
        return False

    return is_blocking
