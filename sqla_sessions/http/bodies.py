"""A blocking request's body, read whole before its session is locked.

A blocking request holds its session's row lock and a pooled connection from the moment it is
opened until its response starts. If the app then waited for the request body (a form, a JSON
payload, a CSRF token in either), a client sending its body slowly, or not at all, would hold both
for as long as it liked. So the body is read first, bounded by `block_body_bytes` (413 past it),
and handed to the app from memory: the lock is taken only once the client has said everything.

Non-blocking requests are left alone: they hold nothing while the app runs.
"""

from __future__ import annotations

import io
from collections.abc import Awaitable, Callable, MutableMapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from _typeshed.wsgi import WSGIEnvironment

Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]

#: The answer to a body over `block_body_bytes`.
TOO_LARGE = 413
#: The answer to a body the client stopped sending before its `Content-Length` (WSGI: the server
#: cannot tell us it left, only that the input ended early).
INCOMPLETE = 400


class BodyRefused(Exception):
    """The body cannot be read whole: too large (413), or cut short (400). `status` says which."""

    def __init__(self, status: int) -> None:
        super().__init__(f"request body refused ({status})")
        self.status = status


class ClientGone(Exception):
    """The client disconnected before its body was complete (ASGI): there is no one to answer."""


def declared_length(value: str | bytes | None) -> int | None:
    """The `Content-Length` a request declared, None when absent or unreadable (the server checks it)."""
    if value is None:
        return None
    try:
        length = int(value)
    except ValueError:
        return None
    return length if length >= 0 else None


async def read_asgi_body(scope: MutableMapping[str, Any], receive: Receive, limit: int) -> Receive:
    """Read the whole body of an ASGI http request (at most *limit* bytes) and return a `receive`
    that hands it to the app again, then defers to the server's (for `http.disconnect`).

    Raises `BodyRefused(413)` past *limit* (by the declared length, before reading anything, or by
    what arrived) and `ClientGone` if the client disconnected meanwhile."""
    declared = None
    for name, value in scope.get("headers", ()):
        if name.lower() == b"content-length":
            declared = declared_length(value)
    if declared is not None and declared > limit:
        raise BodyRefused(TOO_LARGE)
    messages: list[Message] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientGone
        messages.append(message)
        size += len(message.get("body", b""))
        if size > limit:
            raise BodyRefused(TOO_LARGE)
        if not message.get("more_body", False):
            break
    pending = iter(messages)

    async def replay() -> Message:
        message = next(pending, None)
        return message if message is not None else await receive()

    return replay


def read_wsgi_body(environ: WSGIEnvironment, limit: int) -> None:
    """Read the whole body of a WSGI request (at most *limit* bytes) into memory, in place of
    `wsgi.input`. Raises `BodyRefused` (413 past *limit*, 400 when the input ends early).

    With neither a `Content-Length` nor `wsgi.input_terminated` there is no body to read (PEP 3333:
    reading past the length may block)."""
    declared = declared_length(environ.get("CONTENT_LENGTH") or None)
    stream = environ.get("wsgi.input")
    if stream is None:
        return
    if declared is not None:
        if declared > limit:
            raise BodyRefused(TOO_LARGE)
        body = _read_up_to(stream, declared)
        if len(body) < declared:
            raise BodyRefused(INCOMPLETE)
    elif environ.get("wsgi.input_terminated"):
        body = _read_up_to(stream, limit + 1)  # chunked: read to the end, or one byte past the limit
        if len(body) > limit:
            raise BodyRefused(TOO_LARGE)
        environ["CONTENT_LENGTH"] = str(len(body))
    else:
        return
    environ["wsgi.input"] = io.BytesIO(body)


def _read_up_to(stream: Any, size: int) -> bytes:
    parts: list[bytes] = []
    left = size
    while left > 0:
        chunk = stream.read(min(left, 65_536))
        if not chunk:
            break
        parts.append(chunk)
        left -= len(chunk)
    return b"".join(parts)
