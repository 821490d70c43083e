"""Flask integration: `init_app(app)` makes `flask.session` a sqla_sessions `Session`.

    from sqla_sessions.flask import init_app
    from sqla_sessions.store.locking import blocking

    init_app(app, SessionConfig.from_env(), blocking=["/checkout/*"])

    @app.post("/pay")
    @blocking                      # this view's requests of one session run one at a time
    def pay(): ...

`session.modified = True` (needed with Flask's cookie sessions after nested changes) is accepted and
unnecessary here: changes are found by comparing values. `session.permanent` is Flask's flag: False
by default, True for a remembered session (`login_user(..., remember=True)`) or once the app sets it
(stored with the session); a permanent session's cookie outlives the browser even with `expire_on_close`.

Without a config, `init_app` reads one from the app (`config_from_app`): `SQLA_SESSIONS_*` keys of
`app.config`, then `SQLA_SESSIONS_*` environment variables, then the Flask settings an app changed
from Flask's defaults (`SESSION_COOKIE_*`, `PERMANENT_SESSION_LIFETIME`), as Flask-Session does.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, cast

try:
    from flask import Flask, Request, Response, request
    from flask import current_app as flask_app
    from flask import session as flask_session
    from flask.sessions import SessionInterface, SessionMixin
except ImportError:  # pragma: no cover - depends on the installed extras
    raise ImportError("sqla_sessions.flask needs Flask: pip install 'sqla-sessions[flask]'") from None

from werkzeug.datastructures import ImmutableMultiDict
from werkzeug.exceptions import HTTPException

from .config import SessionConfig, config_from_flask_settings
from .core.session import Session
from .errors import LockTimeout, StoreMisconfigured, StoreUnavailable
from .http.bodies import BodyRefused, read_wsgi_body
from .http.web import (
    RETRY_AFTER,
    STORE_ERRORS,
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
from .store.locking import Blocking, BlockingSession, blocking_matcher, is_marked_blocking
from .wsgi import finish_response, request_info

if TYPE_CHECKING:
    from _typeshed.wsgi import WSGIEnvironment

_HELD = "sqla_sessions.held"
_PRESENTED = "sqla_sessions.presented_id"
_INFO = "sqla_sessions.request_info"
_REFUSED_TOKEN = "sqla_sessions.refused_remember_token"  # its cookie name: the response deletes it
_UNANSWERED = "sqla_sessions.unanswered"  # at opening: a LockTimeout, or the status a failed store call gets
logger = logging.getLogger("sqla_sessions")


class SqlaSessionInterface(SessionInterface):
    """A Flask `SessionInterface` backed by a sqla_sessions handler."""

    def __init__(self, handler: BaseHandler[Any], blocking: Blocking = None) -> None:
        self.handler = handler
        self.cycle = SessionCycle(handler.config, handler.now, describe_store(handler, handler.config))
        self._blocking = blocking_matcher(blocking, lambda environ: environ.get("PATH_INFO", ""))
        self._marked_views: tuple[object, int, bool] = (None, -1, False)  # app, its view count, any marked
        self.on_open: Callable[[Session, Request], None] | None = None
        """Run on every opened session, before the app sees it (the Flask-Login bridge's gate)."""

    def _has_marked_views(self, app: Flask) -> bool:
        """Whether any view of *app* is marked `@blocking`: looked at again only when views were added
        (Flask refuses to replace an endpoint's view with another)."""
        views = app.view_functions
        if self._marked_views[0] is not app or self._marked_views[1] != len(views):
            self._marked_views = (app, len(views), any(is_marked_blocking(view) for view in views.values()))
        return self._marked_views[2]

    def open_session(self, app: Flask, request: Request) -> SessionMixin | None:
        environ: WSGIEnvironment = request.environ
        info = request_info(environ)
        presented: str | None = None
        try:
            presented = self.handler.choose_session_id(self.cycle.session_ids(info))
            if self._is_blocking(app, environ):
                # The whole body first (before Flask reads it): the lock waits for nobody (sqla_sessions.http.bodies).
                read_wsgi_body(environ, self.handler.config.block_body_bytes)
                held = BlockingSession.open(self.handler, presented, address=info.client_ip)
            else:
                held = BlockingSession(self.handler, self.handler.load(presented))
            if self.on_open is not None:
                try:
                    self.on_open(held.session, request)
                except BaseException:
                    held.release()  # a blocking request's lock, connection and share go back at once
                    raise
        except (LockTimeout, BodyRefused, *STORE_ERRORS) as exc:
            # Flask turns exceptions raised here into 500s: answer from a before_request hook instead
            # (423 for a lock wait that ran out, 413 for a body too large, 503 for an unreachable
            # database, 500 for a misconfigured one).
            if isinstance(exc, BodyRefused):
                environ[_UNANSWERED] = exc.status
            elif isinstance(exc, LockTimeout):
                environ[_UNANSWERED] = exc
            else:
                status = store_failure(exc, self.cycle.store)
                if status is None:
                    raise
                environ[_UNANSWERED] = status
            held = BlockingSession(self.handler, Session(self.handler))
        self.cycle.attach_client(held.session, info)
        environ[_HELD] = held
        environ[_PRESENTED] = presented
        environ[_INFO] = info
        return cast(SessionMixin, held.session)  # duck-typed: a MutableMapping with the SessionMixin flags

    def save_session(self, app: Flask, session: SessionMixin, response: Response) -> None:
        environ: WSGIEnvironment = request.environ
        held: BlockingSession | None = environ.get(_HELD)
        if held is None or environ.get(_UNANSWERED) is not None:
            return
        info = environ.get(_INFO) or request_info(environ)
        outcome = finish_response(
            self.cycle, held, info, environ.get(_PRESENTED), response.status_code, response.content_type or ""
        )
        if isinstance(outcome, int):
            response.status = http_reason(outcome)
            response.set_data(response.status.encode())
            for name, value in error_headers(outcome):
                response.headers[name] = value
            return
        for name, value in outcome:
            response.headers.add(name, value)
        if self.cycle.lottery():
            response.call_on_close(lambda: self.handler.gc(max_batches=sweep_batches(self.handler.config)))

    def _is_blocking(self, app: Flask, environ: WSGIEnvironment) -> bool:
        if self._blocking is not None and self._blocking(environ):
            return True
        if not self._has_marked_views(app):
            return False  # the common app: no URL matching here, on every request, for nothing
        try:  # Flask matches the URL after opening the session, so look the view up here
            endpoint, _ = app.url_map.bind_to_environ(environ).match()
        except HTTPException:
            return False
        return is_marked_blocking(app.view_functions.get(str(endpoint)))


def init_app(
    app: Flask,
    config: SessionConfig | None = None,
    *,
    handler: BaseHandler[Any] | None = None,
    blocking: Blocking = None,
) -> None:
    """Make `flask.session` a sqla_sessions `Session` for *app*.

    *config*: by default read from the app (see `config_from_app`). *blocking*: path globs or a
    callable given the WSGI environ; views can also be marked with `sqla_sessions.store.locking.blocking`.
    """
    if handler is None and config is None:
        config = config_from_app(app)
    _, handler = resolve_handler(config, handler)
    interface = app.session_interface = SqlaSessionInterface(handler, blocking)
    app.extensions["sqla_sessions"] = handler

    def _answer_session_failure() -> Response | None:
        unanswered: LockTimeout | int | None = request.environ.get(_UNANSWERED)
        if unanswered is None:
            return None
        if isinstance(unanswered, LockTimeout):
            return _error(*refusal(unanswered, handler.config))
        return _error(unanswered, RETRY_AFTER)

    def _store_failed(exc: StoreUnavailable | StoreMisconfigured) -> Response:
        return _error(store_failure(exc, interface.cycle.store) or 500, RETRY_AFTER)

    def _error(status: int, retry_after: int) -> Response:
        return app.response_class(http_reason(status), status=status, headers=error_headers(status, retry_after))

    app.register_error_handler(StoreUnavailable, _store_failed)
    app.register_error_handler(StoreMisconfigured, _store_failed)

    interface.on_open = _bridge_flask_login(app, handler)

    # First of the app-wide hooks, whenever init_app is called: a "login required" hook registered
    # earlier must not answer (a redirect to the login page) for a store that is down.
    app.before_request_funcs.setdefault(None, []).insert(0, _answer_session_failure)

    @app.teardown_request
    def _release(_exc: BaseException | None) -> None:
        held: BlockingSession | None = request.environ.get(_HELD)
        if held is not None:
            held.release()  # no-op after the save; a rollback if the request failed


def config_from_app(app: Flask) -> SessionConfig:
    """The app's session config (see `config.config_from_flask_settings`): `app.config["SQLA_SESSIONS_<FIELD>"]`,
    then `SQLA_SESSIONS_<FIELD>` variables, then the Flask settings the app changed from Flask's defaults."""
    return config_from_flask_settings(app.config, Flask.default_config)


#: What Flask-Login keeps in the session about its logged-in user.
_FLASK_LOGIN_KEYS = ("_user_id", "_fresh", "_id", "_remember", "_remember_seconds")


def _flask_login_keys(session: Session) -> dict[str, Any]:
    return {key: session[key] for key in _FLASK_LOGIN_KEYS if key in session}


def _bridge_flask_login(app: Flask, handler: BaseHandler[Any]) -> Callable[[Session, Request], None] | None:
    """With Flask-Login installed, `login_user()` is our `login()` (a new id, the previous session cut
    off, `user_id` set so device lists and `revoke_user` work) and `logout_user()` our `logout()`.
    Returns the gate the session interface runs on every opened session (see `_legacy_token_gate`).

    Flask-Login writes its keys before it signals, and our login starts from an empty session when
    another user was logged in: its keys are carried over. Signals are app-scoped: other apps of the
    process are untouched.

    "Remember me" is ours, not Flask-Login's stateless `remember_token` cookie (which a revocation
    cannot reach): `login_user(user, remember=True)` makes a remembered session and Flask-Login
    sets no cookie of its own. A `remember_token` it set before the switch is refused and deleted,
    unless the config's `legacy_remember_until` is still ahead and `revoke_user()` did not refuse
    the user's tokens since: then it logs the user in once more, into a new remembered session (a
    change of privilege, like any login: a session id planted in the browser does not become the
    user's), and is deleted.

    `SESSION_PROTECTION = "strong"`: when Flask-Login drops its keys from a session that is not
    permanent (its client changed), the session is logged out here too (its row and `user_id` go).
    """
    try:
        from flask_login import session_protected, user_loaded_from_cookie, user_logged_in, user_logged_out
    except ImportError:
        return None

    def logged_in(sender: Flask, user: Any, **_: Any) -> None:
        current: object = flask_session  # werkzeug's proxy answers isinstance() for the real object
        if not isinstance(current, Session):
            return
        kept = _flask_login_keys(current)
        remember = kept.pop("_remember", None) == "set"
        duration = kept.pop("_remember_seconds", None)  # login_user(..., duration=timedelta(...))
        current.login(user.get_id(), remember=remember)
        if remember and isinstance(duration, int | float) and duration > 0:
            current.set_lifetime(int(duration), current.lifetime[1])
        current.update(kept)
        for key in ("_remember", "_remember_seconds"):  # no remember_token cookie: ours does the job
            current.pop(key, None)

    def loaded_from_cookie(sender: Flask, user: Any, **_: Any) -> None:
        current: object = flask_session
        if not isinstance(current, Session):
            return
        kept = _flask_login_keys(current)
        current.login(user.get_id(), remember=True)
        current.update(kept)
        current["_remember"] = "clear"  # Flask-Login deletes its cookie: the remembered session replaces it

    def logged_out(sender: Flask, user: Any, **_: Any) -> None:
        current: object = flask_session
        if isinstance(current, Session):
            kept = _flask_login_keys(current)  # "_remember": "clear"
            current.logout()
            current.update(kept)

    def protected(sender: Flask, **_: Any) -> None:
        # "strong" mode dropped Flask-Login's keys ("basic", or a permanent session, keeps them and
        # marks the session not fresh): the row must not stay logged in under the user's id.
        current: object = flask_session
        if isinstance(current, Session) and current.user_id is not None and "_user_id" not in current:
            logged_out(sender, None)

    def no_refreshed_remember_cookie() -> None:
        # REMEMBER_COOKIE_REFRESH_EACH_REQUEST makes Flask-Login issue its stateless remember_token
        # on every response of a logged-in user: a revoked device would come straight back with it.
        if app.config.get("REMEMBER_COOKIE_REFRESH_EACH_REQUEST"):
            app.config["REMEMBER_COOKIE_REFRESH_EACH_REQUEST"] = False
            logger.warning(
                "REMEMBER_COOKIE_REFRESH_EACH_REQUEST turned off: remember-me is a remembered session here "
                "(revocable), not Flask-Login's remember_token cookie"
            )

    no_refreshed_remember_cookie()
    app.before_request_funcs.setdefault(None, []).insert(0, no_refreshed_remember_cookie)  # set after init_app
    user_logged_in.connect(logged_in, app, weak=False)
    user_loaded_from_cookie.connect(loaded_from_cookie, app, weak=False)
    user_logged_out.connect(logged_out, app, weak=False)
    session_protected.connect(protected, app, weak=False)
    app.after_request(_delete_refused_token)
    return lambda session, request: _legacy_token_gate(app, handler, session, request)


def _legacy_token_gate(app: Flask, handler: BaseHandler[Any], session: Session, request: Request) -> None:
    """Refuse Flask-Login's `remember_token` cookie unless `legacy_remember_until` accepts it.

    Run as the session opens, before anything can ask for `current_user`: a refused cookie is taken
    out of the request (Flask-Login never sees it) and deleted by the response (`_delete_refused_token`).
    Nothing is written to the session: an anonymous visitor's refused token leaves no row.
    """
    name = app.config.get("REMEMBER_COOKIE_NAME", "remember_token")
    cookie = request.cookies.get(name)
    if cookie is None or getattr(app, "login_manager", None) is None:
        return
    if "_user_id" in session:
        reason = "a user is logged in"  # Flask-Login would not read it: a leftover
    else:
        from flask_login.utils import decode_cookie

        until = handler.config.legacy_remember_until_seconds
        if until is None:
            reason = "legacy_remember_until is not set"
        elif until <= handler.now():
            reason = "legacy_remember_until has passed"
        else:
            try:
                user_id = decode_cookie(cookie)
            except (TypeError, ValueError):  # a cookie no signature could match (non-ASCII, say)
                user_id = None
            if user_id is None:
                reason = "its signature does not match"
            elif handler.legacy_tokens_refused(user_id):
                reason = "revoke_user() refused the user's old tokens"
            else:
                return  # accepted: Flask-Login logs the user in, `loaded_from_cookie` makes it our login
    logger.warning("Flask-Login remember_token cookie refused (%s): deleted, nobody logged in by it", reason)
    kept = request.cookies.copy()
    kept.poplist(name)
    request.cookies = ImmutableMultiDict(kept)  # werkzeug caches the parsed cookies on the request
    request.environ[_REFUSED_TOKEN] = name


def _delete_refused_token(response: Response) -> Response:
    """Delete a refused `remember_token` where Flask-Login set it."""
    name = request.environ.get(_REFUSED_TOKEN)
    if name is not None:
        config = flask_app.config
        response.delete_cookie(
            name,
            path=config.get("REMEMBER_COOKIE_PATH", "/"),
            domain=config.get("REMEMBER_COOKIE_DOMAIN"),
            secure=bool(config.get("REMEMBER_COOKIE_SECURE", False)),
            httponly=bool(config.get("REMEMBER_COOKIE_HTTPONLY", True)),
            samesite=config.get("REMEMBER_COOKIE_SAMESITE"),
        )
    return response
