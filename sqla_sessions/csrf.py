"""CSRF protection with Laravel's semantics, for ASGI and WSGI apps (and Flask via `init_csrf`).

Put the middleware *inside* the session middleware (it needs the session):

    app = SessionMiddleware(CSRFMiddleware(app), config)                      # ASGI
    app = wsgi.SessionMiddleware(WSGICSRFMiddleware(app), config)             # WSGI

- Safe methods (GET, HEAD, OPTIONS, TRACE) pass; so do paths matching `exempt` globs.
- Anything else must carry the session's token (`session.token()`) in the `X-CSRF-TOKEN` header,
  the `X-XSRF-TOKEN` header, or a `_token` field of a urlencoded or multipart form (bodies up to
  `max_body_bytes` are read for that, then handed to the app unchanged).
- The comparison is constant-time (`hmac.compare_digest`); a mismatch answers 419 ("Page Expired",
  Laravel's status) without calling the app. A session without a token never matches.
"""

from __future__ import annotations

import fnmatch
import hmac
import io
import posixpath
import re
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote_plus

from .asgi import ASGIApp, Message, Receive, Scope, Send
from .core.session import Session

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIApplication, WSGIEnvironment
    from flask import Flask

SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "TRACE"})
FIELD = "_token"
HEADERS = ("x-csrf-token", "x-xsrf-token")
STATUS = 419
MAX_BODY = 1_048_576
_FORM = "application/x-www-form-urlencoded"
_MULTIPART = "multipart/form-data"


def tokens_match(session: Session, presented: str | None) -> bool:
    """Constant-time check of a presented token against the session's (no token never matches)."""
    expected = session.get("_token")
    if not isinstance(expected, str) or not presented:
        return False
    return hmac.compare_digest(expected.encode(), presented.encode("utf-8", "surrogateescape"))


#: Multipart parts and part-header bytes looked at for `_token`, at most: the scan stays linear in
#: the body and bounded whatever the body holds (a parser of every part was a CPU bomb: 2.4 s for
#: 1 MiB of tiny parts, 6 s per MiB for a header with 20,000 parameters).
MAX_PARTS = 1000
MAX_PART_HEADERS = 8192
_TOKEN_VALUE_LIMIT = 512
_DISPOSITION_NAME = re.compile(rb'(?im)^content-disposition:[^\r\n]*?;[ \t]*name[ \t]*=[ \t]*"?([^";\r\n]*)"?')
_BOUNDARY = re.compile(r'(?i);\s*boundary\s*=\s*"?([^";]{1,200})"?')


def token_from_body(content_type: str, body: bytes) -> str | None:
    """The `_token` field of a urlencoded or multipart body, if any. Never raises; linear in the body."""
    media = content_type.split(";", 1)[0].strip().lower()
    try:
        if media == _FORM:
            return _form_token(body)
        if media == _MULTIPART:
            return _multipart_token(content_type, body)
    except Exception:  # hostile bodies: treat as "no token"
        return None
    return None


def _form_token(body: bytes) -> str | None:
    """The first `_token=` field of a urlencoded body: one substring search, not a parse of every pair."""
    if body.startswith(b"_token="):
        index = 0
    else:
        index = body.find(b"&_token=")
        if index == -1:
            return None
        index += 1
    end = body.find(b"&", index)
    value = body[index + 7 : end if end != -1 else len(body)]
    return unquote_plus(value[:_TOKEN_VALUE_LIMIT].decode("latin-1"))


def _multipart_token(content_type: str, body: bytes) -> str | None:
    """Scan the parts' headers for `name="_token"` and return that part's value: no part is parsed,
    none is decoded but that one, and the scan stops at it."""
    found = _BOUNDARY.search(content_type)
    if found is None:
        return None
    delimiter = b"--" + found.group(1).strip().encode("latin-1")
    position = body.find(delimiter)
    for _ in range(MAX_PARTS):
        if position == -1:
            return None
        start = position + len(delimiter)
        if body[start : start + 2] == b"--":  # the closing delimiter
            return None
        headers_end = body.find(b"\r\n\r\n", start, start + MAX_PART_HEADERS)
        if headers_end == -1:
            return None
        following = body.find(b"\r\n" + delimiter, headers_end)
        if following == -1:
            return None
        name = _DISPOSITION_NAME.search(body, start, headers_end)
        if name is not None and name.group(1) == FIELD.encode():
            return body[headers_end + 4 : min(following, headers_end + 4 + _TOKEN_VALUE_LIMIT)].decode(
                "utf-8", "replace"
            )
        position = following + 2
    return None


def is_exempt(path: str, exempt: Sequence[str]) -> bool:
    """Whether *path* matches an exempt glob, as the path the router will dispatch.

    Only a path already in normal form can be exempt: one with dot segments, repeated slashes, a
    backslash or a percent-encoding left in it (`/webhooks/../admin`, `/admin/..%2Fwebhooks/x`,
    which servers hand on decoded and routers do not resolve) might be matched one way here and
    routed another, so it is checked like any other path.
    """
    if not exempt or not path.startswith("/"):
        return False
    if "\\" in path or "%" in path or "//" in path:
        return False
    normalised = posixpath.normpath(path)
    if normalised != path.rstrip("/") and not (path == "/" and normalised == "/"):
        return False
    return any(fnmatch.fnmatchcase(path, glob) for glob in exempt)


def _body_text() -> bytes:
    return b"419 Page Expired: the CSRF token is missing or does not match"


class CSRFMiddleware:
    """ASGI CSRF check; place it inside `sqla_sessions.asgi.SessionMiddleware`."""

    def __init__(self, app: ASGIApp, *, exempt: Sequence[str] = (), max_body_bytes: int = MAX_BODY) -> None:
        self.app = app
        self.exempt = tuple(exempt)
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in SAFE_METHODS or is_exempt(scope["path"], self.exempt):
            await self.app(scope, receive, send)
            return
        session: Session = scope["session"]
        headers = {name.lower(): value for name, value in scope.get("headers", ())}
        presented = next((headers[h.encode()].decode("latin-1") for h in HEADERS if h.encode() in headers), None)
        replay: list[Message] = []
        if presented is None and isinstance(session.get(FIELD), str):  # no token to match: nothing to read
            content_type = headers.get(b"content-type", b"").decode("latin-1")
            if content_type.split(";", 1)[0].strip().lower() in (_FORM, _MULTIPART):
                body, replay = await self._read_body(receive)
                if body is not None:
                    presented = token_from_body(content_type, body)
        if not tokens_match(session, presented):
            await send({"type": "http.response.start", "status": STATUS, "headers": [(b"content-type", b"text/plain")]})
            await send({"type": "http.response.body", "body": _body_text()})
            return
        if not replay:
            await self.app(scope, receive, send)
            return

        async def replaying() -> Message:
            return replay.pop(0) if replay else await receive()

        await self.app(scope, replaying, send)

    async def _read_body(self, receive: Receive) -> tuple[bytes | None, list[Message]]:
        """Read the body (to hand it on unchanged); None past the size limit."""
        messages: list[Message] = []
        size = 0
        while True:
            message = await receive()
            messages.append(message)
            if message["type"] != "http.request":
                return None, messages
            size += len(message.get("body", b""))
            if size > self.max_body_bytes:
                return None, messages
            if not message.get("more_body", False):
                return b"".join(m.get("body", b"") for m in messages), messages


class WSGICSRFMiddleware:
    """WSGI CSRF check; place it inside `sqla_sessions.wsgi.SessionMiddleware`."""

    def __init__(self, app: WSGIApplication, *, exempt: Sequence[str] = (), max_body_bytes: int = MAX_BODY) -> None:
        self.app = app
        self.exempt = tuple(exempt)
        self.max_body_bytes = max_body_bytes

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        method = environ.get("REQUEST_METHOD", "GET")
        if method in SAFE_METHODS or is_exempt(environ.get("PATH_INFO", ""), self.exempt):
            return self.app(environ, start_response)
        session: Session = environ["sqla_sessions.session"]
        presented = environ.get("HTTP_X_CSRF_TOKEN") or environ.get("HTTP_X_XSRF_TOKEN")
        if presented is None and isinstance(session.get(FIELD), str):  # no token to match: nothing to read
            presented = self._token_from_form(environ)
        if not tokens_match(session, presented):
            start_response("419 Page Expired", [("Content-Type", "text/plain")])
            return [_body_text()]
        return self.app(environ, start_response)

    def _token_from_form(self, environ: WSGIEnvironment) -> str | None:
        content_type = environ.get("CONTENT_TYPE", "")
        if content_type.split(";", 1)[0].strip().lower() not in (_FORM, _MULTIPART):
            return None
        try:
            length = int(environ.get("CONTENT_LENGTH") or 0)
        except ValueError:
            return None
        if not 0 < length <= self.max_body_bytes:
            return None
        body = environ["wsgi.input"].read(length)
        environ["wsgi.input"] = io.BytesIO(body)  # the app reads the same body
        return token_from_body(content_type, body)


def init_csrf(app: Flask, *, exempt: Sequence[str] = ()) -> None:
    """Flask: check the token before every unsafe request (after `sqla_sessions.flask.init_app`)."""
    from flask import request, session

    @app.before_request
    def _check_csrf() -> Any:
        if request.method in SAFE_METHODS or is_exempt(request.path, tuple(exempt)):
            return None
        current: object = session  # werkzeug's proxy answers isinstance() for the real object
        presented = request.headers.get("X-CSRF-TOKEN") or request.headers.get("X-XSRF-TOKEN")
        if presented is None and isinstance(current, Session) and isinstance(current.get(FIELD), str):
            presented = request.form.get(FIELD)  # werkzeug's parser: streaming, with part limits
        if isinstance(current, Session) and tokens_match(current, presented):
            return None
        return app.response_class(_body_text(), status=STATUS, content_type="text/plain")
