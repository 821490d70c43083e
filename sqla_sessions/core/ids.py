"""Session ids (the cookie value), stable keys and the stored hash of an id's secret.

A session id is a split token, `<key>.<secret>`: the key names the row (its primary key, what
background jobs address), the secret proves the bearer may use it. Only a SHA-256 hash of the
secret is stored, so a read of the table hijacks nothing; every lookup by cookie is a primary-key
lookup, which a sharded PostgreSQL (Citus, …) routes to one node by the distribution column.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets

#: 30 random bytes: 240 bits, 40 characters of base64url; the same length Laravel uses.
_SECRET_BYTES = 30
_KEY_PATTERN = re.compile(r"[0-9a-f]{32}")
_ID_PATTERN = re.compile(r"([0-9a-f]{32})\.([A-Za-z0-9_-]{40})")
#: Characters in a session id: 32 (key) + 1 + 40 (secret).
SESSION_ID_LENGTH = 73


def generate_session_key() -> str:
    """Return a fresh stable key: 128 random bits as hex. Not a credential on its own."""
    return secrets.token_hex(16)


def new_session_id(key: str) -> str:
    """Return a session id for the row *key*, with a fresh secret: 240 bits from `secrets`."""
    return f"{key}.{secrets.token_urlsafe(_SECRET_BYTES)}"


def is_valid_session_id(value: object) -> bool:
    """Tell whether *value* has the exact shape of an id we mint (anything else is never looked up)."""
    return isinstance(value, str) and _ID_PATTERN.fullmatch(value) is not None


def session_key_of(session_id: str) -> str:
    """The row key a (well-formed) session id names."""
    return session_id[:32]


def secret_hash(session_id: str) -> str:
    """The SHA-256 hex digest of the id's secret: what the row stores in place of the id."""
    return hashlib.sha256(session_id[33:].encode("ascii")).hexdigest()


def secret_matches(session_id: str, stored_hash: str) -> bool:
    """Tell, in constant time, whether *session_id*'s secret is the one *stored_hash* was made from."""
    return hmac.compare_digest(secret_hash(session_id), stored_hash)


def is_valid_session_key(value: object) -> bool:
    """Tell whether *value* has the shape of a stable key."""
    return isinstance(value, str) and _KEY_PATTERN.fullmatch(value) is not None
