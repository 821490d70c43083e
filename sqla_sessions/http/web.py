"""What every web integration does around a request, written once (ASGI, WSGI and Flask use it).

Policy, following Django's middleware and improving on Laravel's:

- the session is saved only for responses below 500 (a failing request must not commit half-done state);
- `Set-Cookie` goes out only when needed: a new row, a new id, a sliding-expiry touch (at most once
  per `touch_interval`), or a deletion (this request invalidated the session, or the cookie is
  malformed). A save refused because the session was destroyed or cut off by a login meanwhile
  leaves the browser's cookie alone: the browser may already hold the login's new cookie;
- `Vary: Cookie` whenever the session was read;
- `previous_url` is recorded on successful, non-XHR, non-prefetch GETs that return HTML, for
  sessions that already exist: a JSON API or a bot never causes a write through it.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any

import sqlalchemy as sa
from sqlalchemy.exc import DBAPIError

from ..config import SessionConfig
from ..core.ids import is_valid_session_id
from ..core.records import SaveAction
from ..core.session import Session
from ..errors import (
    UNAVAILABLE_ERRORS,
    LockTimeout,
    PayloadTooLarge,
    SessionInterrupted,
    StoreMisconfigured,
    StoreUnavailable,
    misconfiguration,
    unavailable,
)
from ..store.handlers.base import BaseHandler
from .cookies import CookieWriter, session_cookie_values, session_id_candidates

#: The store cannot be reached: a lost or refused connection, or no pooled connection within
#: `pool_timeout`. Answered 503 with `Retry-After`.
STORE_UNAVAILABLE = (StoreUnavailable, *UNAVAILABLE_ERRORS)
#: What a store call may raise that `store_failure` answers: an outage (503), or a database that
#: refuses what the config names (a missing table, database or role: 500 and one line saying what
#: to fix). Any other database error (a value a column refuses) is a bug to see, raised as it is.
STORE_ERRORS = (*STORE_UNAVAILABLE, StoreMisconfigured, DBAPIError)
#: What a failed save may raise; `SessionCycle.conclude` turns each into a response.
SAVE_ERRORS = (SessionInterrupted, PayloadTooLarge, TypeError, LockTimeout, *STORE_ERRORS)

logger = logging.getLogger("sqla_sessions")

Headers = list[tuple[str, str]]


@dataclass(slots=True)
class RequestInfo:
    """The few facts about a request that the session cycle needs, from any server interface."""

    method: str
    https: bool
    url: str
    cookie_headers: list[str] = field(default_factory=list)
    client_ip: str | None = None
    user_agent: str | None = None
    xhr: bool = False
    """A script's request for a part of a page (XHR, fetch(), htmx, Turbo frames), not a page shown."""
    prefetch: bool = False


class SessionCycle:
    """Cookie in, headers out: the per-request policy shared by the middlewares."""

    __slots__ = ("_clock", "_cookies", "config", "store")

    def __init__(self, config: SessionConfig, clock: Callable[[], float] = time.time, store: str = "") -> None:
        """*store*: where sessions are stored, as the logs name it (`describe_store`)."""
        self.config = config
        self.store = store or describe_store(None, config)
        self._clock = clock  # the handler's: cookie lifetimes must agree with stored expiry
        self._cookies = CookieWriter(config)

    def session_ids(self, info: RequestInfo) -> list[str]:
        """Every session id worth a lookup (see `cookies.session_id_candidates`); the store's
        `choose_session_id` picks the one that opens a live session."""
        return session_id_candidates(session_cookie_values(info.cookie_headers, self.config.cookie_name))

    def attach_client(self, session: Session, info: RequestInfo) -> None:
        session.ip_address = info.client_ip
        session.user_agent = info.user_agent

    def begin_save(self, session: Session, info: RequestInfo, status: int, content_type: str) -> bool:
        """True when a response with *status* saves the session; a page it shows is noted first (flash
        data counts as shown, `previous_url` is recorded)."""
        if status >= 500:
            return False
        self._note_page_shown(session, info, status, content_type)
        return True

    def conclude(
        self,
        session: Session,
        info: RequestInfo,
        *,
        presented_id: str | None,
        action: SaveAction | None,
        error: Exception | None,
    ) -> Headers | int:
        """Headers to add after a save (or none), or the error status to answer instead of the app's response."""
        interrupted = False
        if isinstance(error, SessionInterrupted):
            logger.warning("session was destroyed or cut off by a login while this request ran; changes dropped")
            interrupted = True
        elif isinstance(error, LockTimeout):
            return refusal(error, self.config)[0]  # nothing was saved: the client may retry
        elif isinstance(error, PayloadTooLarge | TypeError):
            logger.error("session could not be saved; answering 500", exc_info=error)
            return 500
        elif isinstance(error, STORE_ERRORS) and (status := store_failure(error, self.store)) is not None:
            return status
        elif error is not None:
            raise error
        return self.response_headers(session, info, action=action, presented_id=presented_id, interrupted=interrupted)

    def _note_page_shown(self, session: Session, info: RequestInfo, status: int, content_type: str) -> None:
        if (
            info.method == "GET"
            and not info.xhr
            and not info.prefetch
            and 200 <= status < 300
            and content_type.lower().startswith("text/html")
        ):  # a page the user sees: it showed the flash data, and is where "back" goes
            session.mark_page_shown()
            if not session.is_new:
                session.previous_url = info.url

    def response_headers(
        self,
        session: Session,
        info: RequestInfo,
        *,
        action: SaveAction | None,
        presented_id: str | None,
        interrupted: bool = False,
    ) -> Headers:
        """Headers to add: `Set-Cookie` when the browser's cookie must change, `Vary: Cookie` when read.

        *action* is None when the session was not saved (5xx response, or the save was interrupted).
        """
        headers: Headers = []
        cookie: str | None = None
        if interrupted or action is None:
            # Not saved (a 5xx, or the session was destroyed or cut off by a login meanwhile): the
            # browser keeps what it has. It may already hold a newer cookie (the login's response
            # arrived first): a deletion here would log the user out.
            pass
        elif not session.is_new and session.id != presented_id:
            # A row the browser does not hold the id of: created, or its id regenerated, in this request.
            cookie = self._set(session, info)
        elif session.expiry_moved and (
            not self.config.expire_on_close or session.permanent or session.lifetime_changed
        ):  # with expire_on_close, a lifetime back to the config's turns the cookie into a browser-session one
            cookie = self._set(session, info)  # sliding expiry (a touch or a write): at most once per touch_interval
        elif session.permanent_changed and not session.is_new:
            cookie = self._set(session, info)  # `permanent` set or cleared: the cookie outlives the browser or not
        elif (
            presented_id is not None
            and session.is_new
            and (session.id_changed or not is_valid_session_id(presented_id))
            and len(session_cookie_values(info.cookie_headers, self.config.cookie_name)) == 1
        ):
            # This request invalidated its session (logout), or the cookie is malformed: drop it. A
            # well-formed cookie that names no live session is left alone: it may be one a login just
            # replaced, still sent by a request that was in flight, and the browser may hold the new one.
            # With several cookies of the name (one planted from a sibling domain), nothing is deleted:
            # a deletion would hit the one at our Path, the real one, not the planted one.
            cookie = self._cookies.delete(https=info.https)
        if cookie is not None:
            headers.append(("Set-Cookie", cookie))
        if session.accessed or cookie is not None:
            headers.append(("Vary", "Cookie"))
        return headers

    def _set(self, session: Session, info: RequestInfo) -> str:
        # A permanent session (remember-me, `session.permanent = True`) keeps its cookie past the browser's close.
        persistent = session.permanent
        return self._cookies.set(
            session.id, expires_at=session.expires_at, https=info.https, now=self._clock(), persistent=persistent
        )

    def lottery(self) -> bool:
        """True when this request should sweep expired sessions (after its response is sent)."""
        chances, out_of = self.config.lottery
        return chances > 0 and random.randrange(out_of) < chances


def resolve_handler(
    config: SessionConfig | None, handler: BaseHandler[Any] | None
) -> tuple[SessionConfig, BaseHandler[Any]]:
    """The integrations' arguments: a given handler (and its config), else a `DatabaseHandler` for *config*."""
    if handler is None:
        config = config or SessionConfig()
        from ..store.handlers.database import DatabaseHandler

        handler = DatabaseHandler(config.database_url, config)
        if config.check_on_startup:
            handler.check()
    return config or handler.config, handler


def describe_store(handler: BaseHandler[Any] | None, config: SessionConfig) -> str:
    """ "table 'sessions' in postgresql://app@db/app" (password masked), for log lines."""
    engine = getattr(handler, "engine", None)
    if engine is not None:
        url = engine.url.render_as_string(hide_password=True)
    else:
        try:
            url = sa.make_url(config.database_url).render_as_string(hide_password=True)
        except sa.exc.ArgumentError:
            url = "an unparsable database_url"
    return f"table {config.table!r} in {url}"


def store_failure(exc: BaseException, store: str) -> int | None:
    """Log a failed store call in one place and say what to answer: 503 (with `Retry-After`) for an
    outage, 500 with one line naming what to fix when the database refuses what the config names;
    None for any other error (the caller raises it)."""
    what = misconfiguration(exc)
    if what is not None:
        hint = ": run `sqla-sessions migrate`" if what.startswith(("table", "column")) else ""
        logger.error("session store misconfigured, %s: %s%s; answering 500", what, store, hint)
        return 500
    if isinstance(exc, STORE_UNAVAILABLE) or unavailable(exc):
        logger.error("session store unreachable (%s); answering 503", store, exc_info=exc)
        return 503
    return None


def refusal(exc: LockTimeout, config: SessionConfig) -> tuple[int, int]:
    """Log a request refused for its session's lock or its share of the pool, and say what to answer:
    the status (`lock_timeout_status`, 429 past a client's share) and the `Retry-After` seconds."""
    if exc.status is not None:
        logger.warning("request refused: %s", exc)
    elif exc.waited:
        logger.warning("request gave up after waiting %g s for its session", exc.waited)
    else:
        logger.warning("request refused at once: its session holds its share of the store's connections")
    return exc.status or config.lock_timeout_status, max(1, math.ceil(exc.waited))


#: Seconds a client is told to wait after a 503 (an unreachable store, a pool that stayed dry).
RETRY_AFTER = 5


def error_headers(status: int, retry_after: int = RETRY_AFTER) -> Headers:
    """The headers of a response the session layer gives instead of the app's (every integration's):
    plain text, never cached, and `Retry-After` where waiting helps (not after a misconfiguration's
    500, nor a body refused as too large or incomplete)."""
    headers = [("Content-Type", "text/plain; charset=utf-8"), ("Cache-Control", "no-store")]
    if status not in (400, 413, 500):
        headers.append(("Retry-After", str(retry_after)))
    return headers


def http_reason(status: int) -> str:
    """`423 Locked`-style status line text."""
    try:
        return f"{status} {HTTPStatus(status).phrase}"
    except ValueError:
        return str(status)


def sweep_batches(config: SessionConfig) -> int:
    """How many GC batches one lottery sweep may run: bounded, so a backlog is worked off over time."""
    return 10 if config.gc_batch_size >= 100 else 100
