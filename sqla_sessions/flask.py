"""Flask integration: `init_app(app)` makes `flask.session` a sqla_sessions `Session`.

    from sqla_sessions.flask import init_app
    init_app(app, SessionConfig.from_env())

`session.modified = True` (needed with Flask's cookie sessions after nested changes) is accepted and
unnecessary here: changes are found by comparing values. `session.permanent` is always true unless
`expire_on_close` is set; the cookie lifetime is the config's, not Flask's `PERMANENT_SESSION_LIFETIME`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, cast

try:
    from flask import Flask, Request, Response
    from flask.sessions import SessionInterface, SessionMixin
except ImportError:  # pragma: no cover - depends on the installed extras
    raise ImportError("sqla_sessions.flask needs Flask: pip install 'sqla-sessions[flask]'") from None

from .config import SessionConfig
from .handlers.base import BaseHandler
from .handlers.database import DatabaseHandler
from .session import Session
from .web import SessionCycle, sweep_batches
from .wsgi import finish_response, request_info

if TYPE_CHECKING:
    from _typeshed.wsgi import WSGIEnvironment

_PRESENTED = "sqla_sessions.presented_id"
_INFO = "sqla_sessions.request_info"


class SqlaSessionInterface(SessionInterface):
    """A Flask `SessionInterface` backed by a sqla_sessions handler."""

    def __init__(self, handler: BaseHandler[Any]) -> None:
        self.handler = handler
        self.cycle = SessionCycle(handler.config, handler.now)

    def open_session(self, app: Flask, request: Request) -> SessionMixin | None:
        environ: WSGIEnvironment = request.environ
        info = request_info(environ)
        presented = self.cycle.session_id(info)
        session = self.handler.load(presented)
        self.cycle.attach_client(session, info)
        environ[_PRESENTED] = presented
        environ[_INFO] = info
        return cast(SessionMixin, session)  # duck-typed: a MutableMapping with the SessionMixin flags

    def save_session(self, app: Flask, session: SessionMixin, response: Response) -> None:
        if not isinstance(session, Session):  # pragma: no cover - another interface's session
            return
        environ = _request_environ()
        info = environ.get(_INFO) or request_info(environ)
        outcome = finish_response(
            self.cycle, session, info, environ.get(_PRESENTED), response.status_code, response.content_type or ""
        )
        if isinstance(outcome, int):
            response.status_code = outcome
            response.set_data(response.status.encode())
            response.content_type = "text/plain; charset=utf-8"
            if outcome == 503:
                response.headers["Retry-After"] = "5"
            return
        for name, value in outcome:
            response.headers.add(name, value)
        if self.cycle.lottery():
            response.call_on_close(lambda: self.handler.gc(max_batches=sweep_batches(self.handler.config)))


def _request_environ() -> WSGIEnvironment:
    from flask import request

    environ: WSGIEnvironment = request.environ
    return environ


def init_app(app: Flask, config: SessionConfig | None = None, *, handler: BaseHandler[Any] | None = None) -> None:
    """Make `flask.session` a sqla_sessions `Session` for *app*."""
    if handler is None:
        config = config or SessionConfig()
        handler = DatabaseHandler(config.database_url, config)
    app.session_interface = SqlaSessionInterface(handler)
    app.extensions["sqla_sessions"] = handler
