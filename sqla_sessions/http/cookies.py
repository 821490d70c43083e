"""The session cookie: read it from request headers without ever raising, and write `Set-Cookie` values.

Only the session id (a strict `<32 hex>.<40 base64url>` token) ever goes into a cookie value, and every
attribute comes from the validated config, so session content can never reach a response header.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from email.utils import formatdate

from ..config import SessionConfig
from ..core.ids import is_valid_session_id

#: A Cookie header longer than this is not scanned further (browsers send at most ~8 KB in total).
MAX_COOKIE_HEADER = 16_384


def session_cookie_values(headers: Iterable[str], name: str) -> list[str]:
    """Return every value of cookie *name* in the given `Cookie` header values, in order. Never raises."""
    values = []
    for header in headers:
        for pair in header[:MAX_COOKIE_HEADER].split(";"):
            key, sep, value = pair.partition("=")
            if sep and key.strip() == name:
                values.append(value.strip().strip('"'))
    return values


#: Well-formed session cookies of one request that are looked up, at most (each costs a SELECT).
MAX_CANDIDATES = 3


def session_id_candidates(values: list[str]) -> list[str]:
    """The session ids worth a lookup, in the order presented: the distinct well-formed values (at most
    `MAX_CANDIDATES`); with none, the first value alone (to be refused as malformed); [] for no cookie.

    Several values arrive when a sibling subdomain planted a cookie of the same name (cookie
    tossing): the real one must still be found, not whichever the browser sent first.
    """
    candidates: list[str] = []
    for value in values:
        if is_valid_session_id(value) and value not in candidates:
            candidates.append(value)
            if len(candidates) == MAX_CANDIDATES:
                break
    return candidates or values[:1]


class CookieWriter:
    """Builds `Set-Cookie` header values from a config."""

    __slots__ = ("_attributes", "_config", "_name")

    def __init__(self, config: SessionConfig) -> None:
        self._config = config
        self._name = config.cookie_name
        attributes = [f"Path={config.cookie_path}"]
        if config.cookie_domain:
            attributes.append(f"Domain={config.cookie_domain}")
        if config.cookie_http_only:
            attributes.append("HttpOnly")
        attributes.append(f"SameSite={config.cookie_same_site.capitalize()}")
        if config.cookie_partitioned:
            attributes.append("Partitioned")
        self._attributes = "; ".join(attributes)

    def _secure(self, https: bool) -> str:
        secure = self._config.cookie_secure
        if self._name.startswith(("__Host-", "__Secure-")):
            secure = True  # browsers refuse these prefixes without Secure
        elif secure is None:
            secure = https or self._config.cookie_partitioned or self._config.cookie_same_site == "none"
        return "; Secure" if secure else ""

    def set(
        self,
        session_id: str,
        *,
        expires_at: int | None,
        https: bool,
        now: float | None = None,
        persistent: bool = False,
    ) -> str:
        """The `Set-Cookie` value that stores *session_id* until *expires_at* (a session cookie if None).

        With `expire_on_close` the cookie ends with the browser, unless *persistent* (remember-me).
        """
        if not is_valid_session_id(session_id):  # defence in depth: nothing else may reach a header
            raise ValueError("refusing to write a malformed session id into a cookie")
        lifetime = ""
        if expires_at is not None and (persistent or not self._config.expire_on_close):
            now = time.time() if now is None else now
            max_age = max(0, int(expires_at) - int(now))
            lifetime = f"; Max-Age={max_age}; Expires={formatdate(now + max_age, usegmt=True)}"
        return f"{self._name}={session_id}{lifetime}; {self._attributes}{self._secure(https)}"

    def delete(self, *, https: bool) -> str:
        """The `Set-Cookie` value that removes the session cookie."""
        return (
            f"{self._name}=; Max-Age=0; Expires=Thu, 01 Jan 1970 00:00:00 GMT; {self._attributes}{self._secure(https)}"
        )
