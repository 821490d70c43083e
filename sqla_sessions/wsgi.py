"""`SessionMiddleware` for any WSGI app (PEP 3333); the session is in `environ["sqla_sessions.session"]`.

The session is saved inside the app's `start_response` call, before the real one, so the cookie
goes out with the headers. The lottery sweep runs in the response iterable's `close()`, after the
server has sent the body.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any

from .config import SessionConfig
from .core.records import SaveAction
from .errors import LockTimeout, StoreMisconfigured, StoreUnavailable
from .http.bodies import BodyRefused, read_wsgi_body
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
from .store.handlers.base import BaseHandler
from .store.locking import Blocking, BlockingSession, blocking_matcher

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIApplication, WSGIEnvironment

logger = logging.getLogger("sqla_sessions")

ENVIRON_KEY = "sqla_sessions.session"


class SessionMiddleware:
    """Server-side sessions for a WSGI app."""

    def __init__(
        self,
        app: WSGIApplication,
        config: SessionConfig | None = None,
        *,
        handler: BaseHandler[Any] | None = None,
        blocking: Blocking = None,
    ) -> None:
        """*blocking*: path globs (`["/checkout/*"]`) or a callable given the environ; see
        `sqla_sessions.store.locking`."""
        self.app = app
        config, handler = resolve_handler(config, handler)
        self.config, self.handler = config, handler
        self.cycle = SessionCycle(self.config, handler.now, describe_store(handler, self.config))
        self._blocking = blocking_matcher(blocking, lambda environ: environ.get("PATH_INFO", ""))

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        info = request_info(environ)
        presented: str | None = None
        blocking = self._blocking is not None and self._blocking(environ)
        if blocking:  # the whole body first: the lock waits for nobody (sqla_sessions.http.bodies)
            try:
                read_wsgi_body(environ, self.config.block_body_bytes)
            except BodyRefused as exc:
                return _error(start_response, exc.status)
        try:
            presented = self.handler.choose_session_id(self.cycle.session_ids(info))
            if blocking:
                held = BlockingSession.open(self.handler, presented, address=info.client_ip)
            else:
                held = BlockingSession(self.handler, self.handler.load(presented))  # holds nothing
        except LockTimeout as exc:
            refused, retry_after = refusal(exc, self.config)
            return _error(start_response, refused, retry_after=retry_after)
        except STORE_ERRORS as exc:
            status = store_failure(exc, self.cycle.store)
            if status is None:
                raise
            return _error(start_response, status)
        session = held.session
        self.cycle.attach_client(session, info)
        environ[ENVIRON_KEY] = session
        replaced: list[bytes] = []

        def start_with_session(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
            code = int(status.split(" ", 1)[0])
            outcome = finish_response(self.cycle, held, info, presented, code, _content_type(headers))
            if isinstance(outcome, int):
                replaced.append(http_reason(outcome).encode())
                return start_response(http_reason(outcome), error_headers(outcome), exc_info)
            return start_response(status, headers + outcome, exc_info)

        try:
            app_iter = self.app(environ, start_with_session)
        except (StoreUnavailable, StoreMisconfigured) as exc:
            # The app's own save or reload failed on the store (and the app let it through).
            held.release()
            return _error(start_response, store_failure(exc, self.cycle.store) or 500, exc_info=sys.exc_info())
        except BaseException:
            held.release()
            raise
        return _Response(app_iter, replaced, lambda: self._after_response(held))

    def _after_response(self, held: BlockingSession) -> None:
        held.release()  # no-op after the save; a rollback if the app failed or sent a 5xx
        if held.session.saved_at_response and held.session.modified:
            logger.warning("the session changed after the response started; those changes were not saved")
        if self.cycle.lottery():
            try:
                self.handler.gc(max_batches=sweep_batches(self.config))
            except Exception:
                logger.exception("expired-session sweep failed")


def finish_response(
    cycle: SessionCycle, held: BlockingSession, info: RequestInfo, presented: str | None, status: int, content_type: str
) -> Headers | int:
    """Save (below 500) and return the headers to add, or an error status to answer instead."""
    session = held.session
    action: SaveAction | None = None
    error: Exception | None = None
    if cycle.begin_save(session, info, status, content_type):
        try:
            action = held.finish()
            session.saved_at_response = True  # changes after this point are not saved (warned at close)
        except SAVE_ERRORS as exc:
            error = exc
    return cycle.conclude(session, info, presented_id=presented, action=action, error=error)


class _Response:
    """The app's iterable, with our error body swapped in if the save failed, and `close()` propagated."""

    def __init__(self, app_iter: Iterable[bytes], replaced: list[bytes], after: Callable[[], None]) -> None:
        self._app_iter = app_iter
        self._replaced = replaced
        self._after = after

    def __iter__(self) -> Iterator[bytes]:
        for chunk in self._app_iter:  # start_response may first be called during this iteration
            if self._replaced:
                break
            yield chunk
        if self._replaced:
            yield self._replaced[0]

    def close(self) -> None:
        try:
            close = getattr(self._app_iter, "close", None)
            if close is not None:
                close()
        finally:
            self._after()


def request_info(environ: WSGIEnvironment) -> RequestInfo:
    """Pick the session-relevant facts out of a WSGI environ."""
    scheme = environ.get("wsgi.url_scheme", "http")
    method = environ.get("REQUEST_METHOD", "GET")
    url = ""
    if method == "GET":
        host = environ.get("HTTP_HOST") or environ.get("SERVER_NAME", "localhost")
        path = environ.get("SCRIPT_NAME", "") + environ.get("PATH_INFO", "/")
        query = environ.get("QUERY_STRING", "")
        url = f"{scheme}://{host}{path}" + (f"?{query}" if query else "")
    cookie = environ.get("HTTP_COOKIE")
    purpose = (environ.get("HTTP_SEC_PURPOSE", "") + environ.get("HTTP_PURPOSE", "")).lower()
    return RequestInfo(
        method=method,
        https=scheme == "https",
        url=url,
        cookie_headers=[cookie] if cookie else [],
        client_ip=environ.get("REMOTE_ADDR"),
        user_agent=environ.get("HTTP_USER_AGENT"),
        xhr=environ.get("HTTP_X_REQUESTED_WITH", "").lower() == "xmlhttprequest"
        or "HTTP_HX_REQUEST" in environ  # htmx, Turbo: a fragment, not a page
        or "HTTP_TURBO_FRAME" in environ
        or environ.get("HTTP_SEC_FETCH_MODE", "navigate").lower() != "navigate",  # fetch() or XHR
        prefetch="prefetch" in purpose,
    )


def _content_type(headers: list[tuple[str, str]]) -> str:
    for name, value in headers:
        if name.lower() == "content-type":
            return value
    return ""


def _error(
    start_response: StartResponse, status: int, retry_after: int = RETRY_AFTER, exc_info: Any = None
) -> list[bytes]:
    start_response(http_reason(status), error_headers(status, retry_after), exc_info)
    return [http_reason(status).encode()]
