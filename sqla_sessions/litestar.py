"""Litestar integration: `SqlaSessionsPlugin` makes `request.session` a sqla_sessions `Session`.

    from litestar import Litestar, Request, post
    from sqla_sessions.litestar import SqlaSessionsPlugin, get_session

    @post("/login/{user:str}")
    async def login(user: str, request: Request) -> dict[str, str]:
        get_session(request).login(user)  # a new id: session fixation defeated
        return {"user": user}

    app = Litestar([login], plugins=[SqlaSessionsPlugin(SessionConfig.from_env())])

The plugin runs one `sqla_sessions.asgi.SessionMiddleware` (one store, one pool of worker threads
for the whole app, closed at shutdown) as the outermost middleware of every route, so the session
is loaded once a request has matched a route (a 404 costs no query) and saved when the response
starts, as everywhere else. Litestar's own session calls keep their meaning:

- `request.session` is the `Session`: reads and writes go straight to it, and merge;
- `request.set_session(data)` replaces the data: keys *data* lacks are removed, the others set. It
  is applied as a change set (a value equal to the loaded one is no change), so requests that
  wrote other keys meanwhile still merge. An empty *data* is `session.clear()`;
- `request.clear_session()` invalidates: the row is deleted, the session goes on under a new id.

Both calls replace `scope["session"]`, so nothing sees them until the response starts (they are
applied before the save) or `get_session(request)` is called, which applies them at once and puts
the `Session` back in the scope. `get_session` is also the typed way to reach `login()`/`logout()`
(Litestar types `request.session` as a dict).

Endpoints marked with `sqla_sessions.store.locking.blocking` (under `@post(...)`) are blocking requests.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Literal, cast

try:
    from litestar.config.app import AppConfig
    from litestar.connection import ASGIConnection
    from litestar.exceptions import ImproperlyConfiguredException
    from litestar.middleware import DefineMiddleware
    from litestar.plugins import InitPlugin
    from litestar.response import Response
    from litestar.serialization import decode_json, encode_json
    from litestar.types import ASGIApp, Empty, Receive, Scope, Send
    from litestar.utils.scope import get_serializer_from_scope
except ImportError:  # pragma: no cover - depends on the installed extras
    raise ImportError("sqla_sessions.litestar needs Litestar: pip install 'sqla-sessions[litestar]'") from None

from . import asgi
from .config import SessionConfig
from .core.session import Session
from .core.unit import JOBS_KEY
from .errors import StoreMisconfigured, StoreUnavailable
from .http.web import error_headers, http_reason, store_failure
from .store.handlers.base import BaseHandler
from .store.locking import Blocking, blocking_matcher, is_marked_blocking

if TYPE_CHECKING:
    from litestar import Request
    from sqlalchemy.ext.asyncio import AsyncEngine

logger = logging.getLogger("sqla_sessions")

#: Where the request's `Session` stays while Litestar's `set_session`/`clear_session` replace
#: `scope["session"]`.
SESSION_KEY = "sqla_sessions.session"
_NEXT = "sqla_sessions.litestar.next"  # the route's own app, for the one shared middleware to call
_CLEARED = "sqla_sessions.litestar.cleared"  # clear_session() invalidated the session already


class SqlaSessionsPlugin(InitPlugin):
    """A Litestar plugin: server-side sessions for every route of the app."""

    def __init__(
        self,
        config: SessionConfig | None = None,
        *,
        handler: BaseHandler[Any] | None = None,
        blocking: Blocking = None,
        async_engine: AsyncEngine | Literal["auto"] | None = None,
    ) -> None:
        """*blocking*: path globs (`["/checkout/*"]`) or a callable given the scope, besides endpoints
        marked with `sqla_sessions.store.locking.blocking`. *async_engine*: see `sqla_sessions.asgi`."""
        rule = blocking_matcher(blocking, lambda scope: scope.get("path", ""))

        def is_blocking(scope: asgi.Scope) -> bool:
            # The middleware runs after routing: the endpoint is known.
            route_handler = scope.get("route_handler")
            if is_marked_blocking(getattr(route_handler, "fn", None)):
                return True
            return rule is not None and rule(scope)

        self.middleware = asgi.SessionMiddleware(
            _dispatch, config, handler=handler, blocking=is_blocking, async_engine=async_engine
        )
        self.store = self.middleware.store

    def on_app_init(self, app_config: AppConfig) -> AppConfig:
        # First of the app's middleware: session-based authentication registered with it sees the session.
        app_config.middleware.insert(0, DefineMiddleware(_RouteSessions, sessions=self.middleware))
        app_config.on_shutdown.append(self.aclose)
        # A StoreUnavailable the app lets through (from its own `asave()`) is a 503, as with the other
        # integrations, not Litestar's generic 500; an app's own handler for them is kept.
        app_config.exception_handlers.setdefault(StoreUnavailable, self._store_failed)
        app_config.exception_handlers.setdefault(StoreMisconfigured, self._store_failed)
        return app_config

    async def aclose(self) -> None:
        """Close the store's threads or engine (and the handler's engine when the plugin built it)."""
        await self.middleware.aclose()

    def _store_failed(self, request: Request[Any, Any, Any], exc: Exception) -> Response[str]:
        status = store_failure(exc, self.middleware.cycle.store) or 500
        headers = dict(error_headers(status))
        media_type = headers.pop("Content-Type")  # Litestar sets it from media_type
        return Response(http_reason(status), status_code=status, media_type=media_type, headers=headers)


class _RouteSessions:
    """Litestar builds one middleware stack per route: each holds this, and all of them share one
    `SessionMiddleware` (one store), which calls back into the route through `_dispatch`."""

    def __init__(self, app: ASGIApp, sessions: asgi.SessionMiddleware) -> None:
        self.app = app
        self.sessions = sessions

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.sessions({**scope, _NEXT: self.app}, cast(asgi.Receive, receive), cast(asgi.Send, send))


async def _dispatch(scope: asgi.Scope, receive: asgi.Receive, send: asgi.Send) -> None:
    """Inside `SessionMiddleware`: run the route, applying Litestar's session replacements before the save."""
    app: ASGIApp = scope.pop(_NEXT)
    session = scope.get("session")
    if isinstance(session, Session):
        scope[SESSION_KEY] = session
    if scope["type"] != "http" or not isinstance(session, Session):
        await app(cast(Scope, scope), cast(Receive, receive), cast(Send, send))
        return
    scope = _WatchedScope(scope)

    async def send_settled(message: asgi.Message) -> None:
        if message["type"] == "http.response.start":
            _settle(scope)  # the middleware saves when this message reaches it
        await send(message)

    await app(cast(Scope, scope), cast(Receive, receive), cast(Send, send_settled))


class _WatchedScope(dict[str, Any]):
    """The route's scope. `clear_session()` (which sets `scope["session"]` to Empty) invalidates at
    once: a `set_session()` after it (a "you are logged out" notice) then fills the new, anonymous
    session instead of replacing the data of the logged-in one."""

    def __setitem__(self, key: str, value: Any) -> None:
        if key == "session" and (value is Empty or value is None):
            session = self.get(SESSION_KEY)
            if isinstance(session, Session):
                session.invalidate()
                super().__setitem__(_CLEARED, True)
        super().__setitem__(key, value)


def get_session(connection: ASGIConnection[Any, Any, Any, Any]) -> Session:
    """The request's `Session`, with any `set_session`/`clear_session` of this request applied to it."""
    if SESSION_KEY not in connection.scope:
        raise ImproperlyConfiguredException("install SqlaSessionsPlugin to use sqla_sessions' get_session()")
    return _settle(cast(asgi.Scope, connection.scope))


def login(connection: ASGIConnection[Any, Any, Any, Any], user_id: object, *, remember: bool = False) -> Session:
    """`get_session(connection).login(user_id, remember=remember)`: a new id, the previous session cut off."""
    session = get_session(connection)
    session.login(user_id, remember=remember)
    return session


def logout(connection: ASGIConnection[Any, Any, Any, Any]) -> Session:
    """`get_session(connection).logout()`: the row deleted, a fresh session under a new id."""
    session = get_session(connection)
    session.logout()
    return session


def _settle(scope: asgi.Scope) -> Session:
    """Apply what Litestar left in `scope["session"]` to our Session, and put the Session back."""
    session = cast(Session, scope[SESSION_KEY])
    current: object = scope.get("session")
    if current is None or current is Empty:
        if not scope.pop(_CLEARED, False):  # else invalidated already, when it was cleared
            session.invalidate()  # request.clear_session()
    elif current is not session:
        replace_data(session, _as_dict(current, scope))  # request.set_session(data)
    else:
        return session
    scope["session"] = session
    return session


def replace_data(session: Session, data: Mapping[str, Any]) -> None:
    """Make *data* the session's data: keys it lacks are removed, the others set.

    Values equal to the loaded ones are no change (change detection compares values), so this is
    the change set a merge needs, not a whole-payload overwrite. An empty *data* is `clear()`,
    which also logs a logged-in session out. The exactly-once bookkeeping of jobs is kept.
    """
    if not data:
        session.clear()
        return
    for key in list(session):
        if key not in data and key != JOBS_KEY:
            del session[key]
    session.update(data)


def _as_dict(value: object, scope: asgi.Scope) -> Mapping[str, Any]:
    if isinstance(value, Mapping):
        return value
    # A dataclass, pydantic model or msgspec Struct: stored as Litestar's own session backends store
    # it, through the route's JSON serializer (it reads back as a dict).
    data = decode_json(encode_json(value, serializer=get_serializer_from_scope(cast(Scope, scope))))
    if not isinstance(data, dict):
        raise TypeError(f"set_session() needs a mapping or a data container, not {type(value).__name__}")
    return data
