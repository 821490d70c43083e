"""Session ids (the cookie value), stable keys (what background jobs address) and their hashes."""

from __future__ import annotations

import hashlib
import re
import secrets

#: 30 random bytes: 240 bits, 40 characters of base64url; the same length Laravel uses.
_ID_BYTES = 30
_ID_PATTERN = re.compile(r"[A-Za-z0-9_-]{40}")
_KEY_PATTERN = re.compile(r"[0-9a-f]{32}")


def generate_session_id() -> str:
    """Return a fresh session id: 240 bits from `secrets`."""
    return secrets.token_urlsafe(_ID_BYTES)


def is_valid_session_id(value: object) -> bool:
    """Tell whether *value* has the exact shape of an id we mint (anything else is never looked up)."""
    return isinstance(value, str) and _ID_PATTERN.fullmatch(value) is not None


def hash_session_id(session_id: str) -> str:
    """Return the SHA-256 hex digest stored in place of the id, so a read of the table hijacks nothing."""
    return hashlib.sha256(session_id.encode("ascii")).hexdigest()


def generate_session_key() -> str:
    """Return a fresh stable key: 128 random bits as hex. Not a credential: it never reaches a cookie."""
    return secrets.token_hex(16)


def is_valid_session_key(value: object) -> bool:
    """Tell whether *value* has the shape of a stable key."""
    return isinstance(value, str) and _KEY_PATTERN.fullmatch(value) is not None
