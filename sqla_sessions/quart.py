"""Quart integration: `init_app(app)` makes `quart.session` a sqla_sessions `Session`.

    from sqla_sessions.quart import current_session, init_app

    init_app(app, SessionConfig.from_env())

    @app.post("/login/<user>")
    async def login(user: str) -> dict[str, str]:
        current_session().login(user)  # `quart.session` typed as a Session
        return {"user": user}

Quart's session hooks are coroutines: the session is loaded and saved through an
`AsyncSessionStore` (worker threads, or an `AsyncEngine` with `async_engine=`), so the event loop
never waits for the database. The HTTP policy (when to save, which cookie, 503 on an unreachable
store) is `SessionCycle`'s, as for the other integrations. Views marked with
`sqla_sessions.store.locking.blocking` (or matched by `blocking=`) are blocking requests.

As with Flask, `session.modified = True` is accepted and unnecessary, and without a config
`init_app` reads one from the app (`config_from_app`): `SQLA_SESSIONS_*` keys of `app.config`, then
`SQLA_SESSIONS_*` variables, then the `SESSION_COOKIE_*` / `PERMANENT_SESSION_LIFETIME` settings the
app changed from Quart's defaults. Websockets get the session read-only (a websocket
has no response headers to carry a new cookie), and none at all from another origin.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any, Literal, cast

try:
    from quart import Quart, Response, has_request_context, request
    from quart import session as quart_session
    from quart.sessions import SessionInterface, SessionMixin
    from quart.wrappers import BaseRequestWebsocket, Request
except ImportError:  # pragma: no cover - depends on the installed extras
    raise ImportError("sqla_sessions.quart needs Quart: pip install 'sqla-sessions[quart]'") from None

from werkzeug.exceptions import HTTPException
from werkzeug.wrappers import Response as WerkzeugResponse

from .asgi import Scope, finish_response, request_info, same_origin
from .config import SessionConfig, config_from_flask_settings
from .core.session import Session
from .errors import LockTimeout, StoreMisconfigured, StoreUnavailable
from .http.bodies import TOO_LARGE, BodyRefused
from .http.web import (
    RETRY_AFTER,
    STORE_ERRORS,
    RequestInfo,
    SessionCycle,
    describe_store,
    error_headers,
    http_reason,
    refusal,
    resolve_handler,
    store_failure,
    sweep_batches,
)
from .store.aio import AsyncBlockingSession, AsyncSessionStore
from .store.handlers.base import BaseHandler
from .store.locking import Blocking, blocking_matcher, is_marked_blocking

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncEngine

logger = logging.getLogger("sqla_sessions")

_OPENED = "sqla_sessions.opened"  # in the request's ASGI scope: what open_session found


@dataclass(slots=True)
class _Opened:
    """What `open_session` leaves for `save_session` and the request's hooks."""

    session: Session
    info: RequestInfo
    presented: str | None = None
    held: AsyncBlockingSession | None = None
    unanswered: LockTimeout | int | None = None  # at opening: a LockTimeout, or the status a failed store call gets


class SqlaSessionInterface(SessionInterface):
    """A Quart `SessionInterface` backed by a sqla_sessions handler, through an `AsyncSessionStore`."""

    def __init__(
        self,
        handler: BaseHandler[Any],
        blocking: Blocking = None,
        *,
        async_engine: AsyncEngine | Literal["auto"] | None = None,
        owns_handler: bool = False,
    ) -> None:
        """*owns_handler*: `aclose()` also closes the handler's engine (it was built for this app)."""
        self.handler = handler
        self.store = AsyncSessionStore(handler, async_engine=async_engine)
        self.cycle = SessionCycle(handler.config, handler.now, describe_store(handler, handler.config))
        self._blocking = blocking_matcher(blocking, lambda scope: scope.get("path", ""))
        self._owns_handler = owns_handler

    async def open_session(self, app: Quart, request: BaseRequestWebsocket) -> SessionMixin | None:
        scope = cast(Scope, request.scope)
        info = request_info(scope)
        if scope["type"] == "websocket" and not same_origin(scope, self.handler.config.websocket_origins):
            # Browsers send cookies with a websocket handshake from any page: a page elsewhere would
            # act in the user's session. It gets an empty, unsaved session instead.
            logger.warning("websocket from another origin gets no session (allow it in websocket_origins)")
            return cast(SessionMixin, Session(self.handler))
        opened = _Opened(Session(self.handler), info)
        try:
            opened.presented = await self.store.choose_session_id(self.cycle.session_ids(info))
            if scope["type"] == "http" and self._is_blocking(app, request):
                # The whole body first (Quart bounds its wait, BODY_TIMEOUT): the lock waits for nobody.
                await _read_body(cast(Request, request), self.handler.config.block_body_bytes)
                opened.held = await self.store.open_blocking(opened.presented, address=info.client_ip)
                opened.session = opened.held.session
            else:
                opened.session = await self.store.load(opened.presented)
        except (LockTimeout, BodyRefused, *STORE_ERRORS) as exc:
            # Quart turns exceptions raised here into bare 500s: answer from a before_request hook
            # instead (423 for a lock wait that ran out, 413 too large, 503 unreachable, 500 misconfigured).
            if isinstance(exc, BodyRefused):
                opened.unanswered = exc.status
            elif isinstance(exc, LockTimeout):
                opened.unanswered = exc
            else:
                status = store_failure(exc, self.cycle.store)
                if status is None:
                    raise
                opened.unanswered = status
        self.cycle.attach_client(opened.session, info)
        scope[_OPENED] = opened
        return cast(SessionMixin, opened.session)  # duck-typed: a MutableMapping with the SessionMixin flags

    async def save_session(
        self, app: Quart, session: SessionMixin, response: Response | WerkzeugResponse | None
    ) -> None:
        if not has_request_context() or response is None:
            if session.modified:  # a websocket's
                logger.warning("changes to the session during a websocket connection are not saved")
            return
        opened = cast("_Opened | None", cast(Scope, request.scope).get(_OPENED))
        if opened is None or opened.unanswered is not None:
            return
        held, current = opened.held, opened.session
        save = held.finish if held is not None else partial(self.store.save, current, end_of_request=True)
        outcome = await finish_response(
            self.cycle, current, opened.info, opened.presented, response.status_code, response.content_type or "", save
        )
        if isinstance(outcome, int):
            response.status_code = outcome
            response.set_data(http_reason(outcome))
            for name, value in error_headers(outcome):
                response.headers[name] = value
            return
        for name, value in outcome:
            response.headers.add(name, value)
        if self.cycle.lottery():
            self.store.in_background(self._sweep())  # after the response; aclose() waits for it

    async def _sweep(self) -> None:
        try:
            deleted = await self.store.gc(max_batches=sweep_batches(self.handler.config))
            logger.debug("lottery sweep deleted %d expired sessions", deleted)
        except Exception:
            logger.exception("expired-session sweep failed")

    def _is_blocking(self, app: Quart, request: BaseRequestWebsocket) -> bool:
        if self._blocking is not None and self._blocking(request.scope):
            return True
        adapter = app.create_url_adapter(request)  # Quart matches the URL after opening the session
        if adapter is None:
            return False
        try:
            rule, _ = adapter.match(return_rule=True)
        except HTTPException:
            return False
        return is_marked_blocking(app.view_functions.get(str(rule.endpoint)))

    async def release(self) -> None:
        """End the current request's blocking session, if any (no-op after its save; a rollback otherwise)."""
        opened = cast("_Opened | None", cast(Scope, request.scope).get(_OPENED))
        if opened is not None and opened.held is not None:
            await opened.held.release()

    async def aclose(self) -> None:
        """Close the store's threads or engine, and the handler's engine when `init_app` built it."""
        await self.store.aclose()
        if self._owns_handler:
            close = getattr(self.handler, "close", None)
            if close is not None:
                await asyncio.to_thread(close)


def init_app(
    app: Quart,
    config: SessionConfig | None = None,
    *,
    handler: BaseHandler[Any] | None = None,
    blocking: Blocking = None,
    async_engine: AsyncEngine | Literal["auto"] | None = None,
) -> SqlaSessionInterface:
    """Make `quart.session` a sqla_sessions `Session` for *app*.

    *blocking*: path globs or a callable given the ASGI scope; views can also be marked with
    `sqla_sessions.store.locking.blocking`. *async_engine*: see `sqla_sessions.store.aio`. The store is closed
    when the app stops serving.
    """
    owns_handler = handler is None
    if handler is None and config is None:
        config = config_from_app(app)
    _, handler = resolve_handler(config, handler)
    interface = SqlaSessionInterface(handler, blocking, async_engine=async_engine, owns_handler=owns_handler)
    app.session_interface = interface  # type: ignore[assignment]  # Quart types it as its cookie interface
    app.extensions["sqla_sessions"] = handler

    async def _answer_session_failure() -> Response | None:
        opened = cast("_Opened | None", cast(Scope, request.scope).get(_OPENED))
        unanswered = None if opened is None else opened.unanswered
        if unanswered is None:
            return None
        if isinstance(unanswered, LockTimeout):
            return _error(*refusal(unanswered, handler.config))
        return _error(unanswered, RETRY_AFTER)

    async def _store_failed(exc: StoreUnavailable | StoreMisconfigured) -> Response:
        return _error(store_failure(exc, interface.cycle.store) or 500, RETRY_AFTER)

    def _error(status: int, retry_after: int) -> Response:
        return app.response_class(http_reason(status), status=status, headers=dict(error_headers(status, retry_after)))

    app.register_error_handler(StoreUnavailable, _store_failed)
    app.register_error_handler(StoreMisconfigured, _store_failed)
    # First of the app-wide hooks, whenever init_app is called: a "login required" hook registered
    # earlier must not answer (a redirect to the login page) for a store that is down.
    app.before_request_funcs.setdefault(None, []).insert(0, _answer_session_failure)

    @app.teardown_request
    async def _release(_exc: BaseException | None) -> None:
        await interface.release()

    app.after_serving(interface.aclose)
    return interface


def config_from_app(app: Quart) -> SessionConfig:
    """The app's session config (see `config.config_from_flask_settings`)."""
    return config_from_flask_settings(app.config, Quart.default_config)


def current_session() -> Session:
    """`quart.session`, typed as the sqla_sessions `Session` it is (for `login()`, `push()`, …)."""
    current: object = quart_session  # werkzeug's proxy answers isinstance() for the real object
    if not isinstance(current, Session):
        raise RuntimeError("no sqla_sessions session here: call sqla_sessions.quart.init_app(app) first")
    return current


async def _read_body(request: Request, limit: int) -> None:
    """Read a blocking request's body into Quart's cache before its lock is taken (`sqla_sessions.http.bodies`)."""
    declared = request.content_length
    if declared is not None and declared > limit:
        raise BodyRefused(TOO_LARGE)
    if len(await request.get_data(cache=True)) > limit:
        raise BodyRefused(TOO_LARGE)
