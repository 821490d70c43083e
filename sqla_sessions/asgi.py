"""`SessionMiddleware` for any ASGI app (Starlette, FastAPI, Quart, bare ASGI); no framework import.

The `Session` is put in `scope["session"]`, where Starlette's and FastAPI's `request.session` find it.
It is loaded before the app runs (one indexed SELECT when the request carries a cookie, none
otherwise) and saved when the app starts its response (`http.response.start`), so the cookie can go
out with the headers and nothing is held while the body streams.

Websocket scopes get the session read-only: a websocket has no response headers to carry a new
cookie, so changes made during a websocket connection are not saved (a warning says so).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, MutableMapping
from functools import partial
from typing import TYPE_CHECKING, Any, Literal

from .config import SessionConfig
from .core.records import SaveAction
from .core.session import Session
from .errors import LockTimeout, StoreMisconfigured, StoreUnavailable
from .http.bodies import BodyRefused, ClientGone, read_asgi_body
from .http.web import (
    RETRY_AFTER,
    SAVE_ERRORS,
    STORE_ERRORS,
    Headers,
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
from .store.locking import Blocking, blocking_matcher

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncEngine

logger = logging.getLogger("sqla_sessions")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

#: Where an endpoint finds the `AsyncSessionStore` (for `await store.save(session)` / `reload`).
STORE_KEY = "sqla_sessions.store"


class SessionMiddleware:
    """Server-side sessions for an ASGI app."""

    def __init__(
        self,
        app: ASGIApp,
        config: SessionConfig | None = None,
        *,
        handler: BaseHandler[Any] | None = None,
        blocking: Blocking = None,
        async_engine: AsyncEngine | Literal["auto"] | None = None,
    ) -> None:
        """*blocking*: path globs (`["/checkout/*"]`) or a callable given the scope; see `sqla_sessions.store.locking`.

        For per-endpoint marking in Starlette/FastAPI use `sqla_sessions.starlette.marked_blocking(app)`.
        *async_engine*: run database work on an `AsyncEngine` ("auto": derived from the handler's URL)
        instead of the default thread pool; see `sqla_sessions.store.aio`.
        """
        self.app = app
        self._owns_handler = handler is None
        config, handler = resolve_handler(config, handler)
        self.config, self.handler = config, handler
        self.store = AsyncSessionStore(handler, async_engine=async_engine)
        self.cycle = SessionCycle(self.config, handler.now, describe_store(handler, self.config))
        self._blocking = blocking_matcher(blocking, lambda scope: scope.get("path", ""))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "http":
            await self._http(scope, receive, send)
        elif kind == "websocket":
            await self._websocket(scope, receive, send)
        elif kind == "lifespan":
            await self._lifespan(scope, receive, send)
        else:
            await self.app(scope, receive, send)

    async def aclose(self) -> None:
        """Close what this middleware created: its worker threads or AsyncEngine, and the handler's engine
        when it built the handler itself (a handler passed in stays the caller's). Called at lifespan shutdown."""
        await self.store.aclose()
        if self._owns_handler:
            close = getattr(self.handler, "close", None)
            if close is not None:
                await asyncio.to_thread(close)

    async def _lifespan(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def send_after_closing(message: Message) -> None:
            if message["type"] == "lifespan.shutdown.complete":
                await self.aclose()
            await send(message)

        await self.app(scope, receive, send_after_closing)

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        info = request_info(scope)
        presented: str | None = None
        held: AsyncBlockingSession | None = None
        blocking = self._blocking is not None and self._blocking(scope)
        if blocking:  # the whole body first: the lock waits for nobody (sqla_sessions.http.bodies)
            try:
                receive = await read_asgi_body(scope, receive, self.config.block_body_bytes)
            except BodyRefused as exc:
                await _send_error(send, exc.status, retry_after=RETRY_AFTER)
                return
            except ClientGone:
                return
        try:
            presented = await self.store.choose_session_id(self.cycle.session_ids(info))
            if blocking:
                held = await self.store.open_blocking(presented, address=info.client_ip)
                session = held.session
            else:
                session = await self.store.load(presented)
        except LockTimeout as exc:
            refused, retry_after = refusal(exc, self.config)
            await _send_error(send, refused, retry_after=retry_after)
            return
        except STORE_ERRORS as exc:
            status = store_failure(exc, self.cycle.store)
            if status is None:
                raise
            await _send_error(send, status, retry_after=RETRY_AFTER)
            return
        self.cycle.attach_client(session, info)
        save = held.finish if held is not None else partial(self.store.save, session, end_of_request=True)
        replaced = started = False

        async def send_with_session(message: Message) -> None:
            nonlocal replaced, started
            if message["type"] == "http.response.start":
                started = True
                status = int(message["status"])
                headers = list(message.get("headers", ()))
                outcome = await finish_response(
                    self.cycle, session, info, presented, status, _content_type(headers), save
                )
                if isinstance(outcome, int):
                    replaced = True
                    await _send_error(send, outcome, retry_after=RETRY_AFTER)
                    return
                headers.extend((name.lower().encode("latin-1"), value.encode("latin-1")) for name, value in outcome)
                message = {**message, "headers": headers}
            elif replaced:
                return  # the app's body for a response we replaced with an error
            await send(message)

        try:
            await self.app({**scope, "session": session, STORE_KEY: self.store}, receive, send_with_session)
        except (StoreUnavailable, StoreMisconfigured) as exc:
            # The app's own save or reload failed on the store (and the app let it through).
            if started:
                raise
            await _send_error(send, store_failure(exc, self.cycle.store) or 500, retry_after=RETRY_AFTER)
        finally:
            if held is not None:
                await held.release()  # no-op after the save; a rollback if the app failed or sent a 5xx
        if self.cycle.lottery():
            await self._sweep()

    async def _websocket(self, scope: Scope, receive: Receive, send: Send) -> None:
        info = request_info(scope)
        if not same_origin(scope, self.config.websocket_origins):
            # Browsers send cookies with a websocket handshake from any page (no CORS, no SameSite
            # for same-site subdomains): a page elsewhere would act in the user's session. It gets
            # an empty, unsaved session instead.
            logger.warning("websocket from another origin gets no session (allow it in websocket_origins)")
            await self.app({**scope, "session": Session(self.store.handler)}, receive, send)
            return
        try:
            session = await self.store.load(await self.store.choose_session_id(self.cycle.session_ids(info)))
        except STORE_ERRORS as exc:
            if store_failure(exc, self.cycle.store) is None:
                raise
            await send({"type": "websocket.close", "code": 1011})
            return
        await self.app({**scope, "session": session}, receive, send)
        if session.modified:
            logger.warning("changes to the session during a websocket connection are not saved")

    async def _sweep(self) -> None:
        try:
            deleted = await self.store.gc(max_batches=sweep_batches(self.config))
            logger.debug("lottery sweep deleted %d expired sessions", deleted)
        except Exception:
            logger.exception("expired-session sweep failed")


async def finish_response(
    cycle: SessionCycle,
    session: Session,
    info: RequestInfo,
    presented: str | None,
    status: int,
    content_type: str,
    save: Callable[[], Awaitable[SaveAction]],
) -> Headers | int:
    """Save (below 500) and return the headers to add, or an error status to answer instead (the
    async twin of `wsgi.finish_response`, shared with the Quart integration)."""
    action: SaveAction | None = None
    error: Exception | None = None
    if cycle.begin_save(session, info, status, content_type):
        try:
            action = await save()
        except SAVE_ERRORS as exc:
            error = exc
    return cycle.conclude(session, info, presented_id=presented, action=action, error=error)


def same_origin(scope: Scope, allowed: tuple[str, ...]) -> bool:
    """Whether a websocket handshake comes from this host's pages (or an allowed origin): its `Origin`
    names the `Host` it was sent to. No `Origin` (not a browser) passes: it has no cookie to abuse."""
    origin = host = None
    for raw_name, raw_value in scope.get("headers", ()):
        name = raw_name.lower()
        if name == b"origin":
            origin = raw_value.decode("latin-1").strip().lower()
        elif name == b"host":
            host = raw_value.decode("latin-1").strip().lower()
    if origin is None:
        return True
    if origin in (entry.lower().rstrip("/") for entry in allowed):
        return True
    origin_scheme, _, origin_host = origin.partition("://")
    # A wss handshake comes from an https page: an http page of the same host (forgeable on the
    # network) is another origin.
    expected = "https" if scope.get("scheme") in ("wss", "https") else "http"
    return host is not None and origin_host == host and origin_scheme == expected


def request_info(scope: Scope) -> RequestInfo:
    """Pick the session-relevant facts out of an ASGI scope."""
    cookies: list[str] = []
    user_agent = host = None
    xhr = prefetch = False
    for raw_name, raw_value in scope.get("headers", ()):
        name = raw_name.lower()
        if name == b"cookie":
            cookies.append(raw_value.decode("latin-1"))
        elif name == b"user-agent":
            user_agent = raw_value.decode("latin-1")
        elif name == b"host":
            host = raw_value.decode("latin-1")
        elif name == b"x-requested-with":
            xhr = xhr or raw_value.lower() == b"xmlhttprequest"
        elif name in (b"hx-request", b"turbo-frame"):  # htmx, Turbo: a fragment, not a page
            xhr = True
        elif name == b"sec-fetch-mode":  # a browser's fetch() or XHR (only a navigation shows a page)
            xhr = xhr or raw_value.lower() != b"navigate"
        elif name in (b"sec-purpose", b"purpose", b"x-moz"):
            prefetch = prefetch or b"prefetch" in raw_value.lower()
    scheme = scope.get("scheme", "http")
    method = scope.get("method", "GET")
    url = ""
    if method == "GET":
        if host is None:
            server = scope.get("server") or ("localhost", None)
            host = server[0] if server[1] in (None, 80, 443) else f"{server[0]}:{server[1]}"
        query = scope.get("query_string", b"").decode("latin-1")
        path = scope.get("root_path", "") + scope.get("path", "/")
        url = f"{scheme}://{host}{path}" + (f"?{query}" if query else "")
    client = scope.get("client")
    return RequestInfo(
        method=method,
        https=scheme in ("https", "wss"),
        url=url,
        cookie_headers=cookies,
        client_ip=client[0] if client else None,
        user_agent=user_agent,
        xhr=xhr,
        prefetch=prefetch,
    )


def _content_type(headers: list[tuple[bytes, bytes]]) -> str:
    for name, value in headers:
        if name.lower() == b"content-type":
            return value.decode("latin-1")
    return ""


async def _send_error(send: Send, status: int, *, retry_after: int) -> None:
    headers = [
        (name.lower().encode("latin-1"), value.encode("latin-1")) for name, value in error_headers(status, retry_after)
    ]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": http_reason(status).encode()})
