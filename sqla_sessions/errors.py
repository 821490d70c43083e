"""The exceptions sqla_sessions raises.

```
SessionError
├── ConfigurationError   (also a ValueError)
├── PayloadTooLarge
├── LockTimeout
├── SessionInterrupted
├── StoreUnavailable
└── StoreMisconfigured
```
"""

from __future__ import annotations

from sqlalchemy.exc import DBAPIError, DisconnectionError, InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout

#: What an unreachable store raises from SQLAlchemy: a lost or refused connection, or no pooled
#: connection within `pool_timeout` (not a data or integrity error, which is a bug to see).
UNAVAILABLE_ERRORS = (OperationalError, InterfaceError, PoolTimeout, DisconnectionError)


class SessionError(Exception):
    """Root of every error this library raises on purpose."""


class ConfigurationError(SessionError, ValueError):
    """Raised when a setting is invalid; the message names the field."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


class PayloadTooLarge(SessionError):
    """Raised when a save would store more than `max_payload_bytes`; nothing is written."""

    def __init__(self, size: int, limit: int) -> None:
        super().__init__(f"session payload is {size} bytes, over the limit of {limit} bytes")
        self.size = size
        self.limit = limit


class LockTimeout(SessionError):
    """Raised when a blocking request waited `block_wait_seconds` for its session's lock, when a save
    waited `write_wait_seconds` for its row, or at once when the session holds its share of the pool
    (`session_connections`); answered `lock_timeout_status` (423)."""

    status: int | None = None  # None: the config's lock_timeout_status

    def __init__(self, waited: float) -> None:
        super().__init__(f"session lock not acquired within {waited:g} s")
        self.waited = waited


class TooManyRequests(LockTimeout):
    """Raised when one client address holds its share of the pool already (`address_connections`);
    answered 429 with `Retry-After` (see `sqla_sessions.store.fairshare`)."""

    status = 429

    def __init__(self, address: str, share: int) -> None:
        SessionError.__init__(self, f"client {address} holds its share of the session store ({share} connections)")
        self.waited = 0.0


class SessionInterrupted(SessionError):
    """Raised when a save finds its session destroyed meanwhile (logout, revoke, expiry); nothing is written."""


class StoreUnavailable(SessionError):
    """Raised by `session.save()`/`reload()` (and their async forms) called by the app when the store
    cannot be reached; the middlewares answer 503 with `Retry-After` for it, as for their own saves."""


class StoreMisconfigured(SessionError):
    """The database answers, but what the config names is not there or is refused: the table (not
    migrated), the database, the schema, the role or its password, a grant. No retry helps: the
    middlewares answer 500 and log one line saying what to fix, not 503."""


# PostgreSQL SQLSTATEs: undefined table, invalid schema, unknown database, role/password refused, no grant.
_PG_MISCONFIGURED = {
    "42P01": "table not found",
    "42703": "column not found (an older schema)",
    "3F000": "schema not found",
    "3D000": "database not found",
    "28000": "role refused",
    "28P01": "password refused",
    "42501": "permission denied",
}
# MySQL/MariaDB error numbers: no such table, unknown database, access denied (user, database, command).
_MYSQL_MISCONFIGURED = {
    1146: "table not found",
    1054: "column not found (an older schema)",
    1049: "database not found",
    1045: "role or password refused",
    1044: "permission denied",
    1142: "permission denied",
}
# Connection-time refusals carry no SQLSTATE in every driver: their server message tells.
_MESSAGES = (
    ("no such table", "table not found"),
    ("no such column", "column not found (an older schema)"),
    ("unable to open database file", "database file cannot be opened"),
    ("does not exist", "not found"),
    ("password authentication failed", "password refused"),
    ("access denied", "role or password refused"),
    ("permission denied", "permission denied"),
)


def unavailable(exc: BaseException) -> bool:
    """Whether *exc* is an outage a retry can outlast: a lost or refused connection, a pool that stayed
    dry, or a server that answers read-only (a primary demoted during a failover)."""
    if isinstance(exc, UNAVAILABLE_ERRORS):
        return True
    return isinstance(exc, DBAPIError) and getattr(exc.orig, "sqlstate", None) == "25006"


def misconfiguration(exc: BaseException) -> str | None:
    """What is misconfigured when *exc* (a SQLAlchemy or driver error, or one raised from it) says the
    database refuses what the config names; None for anything else (an outage, a bug)."""
    error: BaseException | None = exc
    while error is not None and not isinstance(error, DBAPIError):
        error = error.__cause__
    if error is None:
        return None
    orig = error.orig
    sqlstate = getattr(orig, "sqlstate", None)
    if sqlstate in _PG_MISCONFIGURED:
        return _PG_MISCONFIGURED[sqlstate]
    args = getattr(orig, "args", ())
    if args and isinstance(args[0], int) and args[0] in _MYSQL_MISCONFIGURED:
        return _MYSQL_MISCONFIGURED[args[0]]
    text = str(orig).lower()
    if sqlstate is None and not (args and isinstance(args[0], int) and args[0] >= 2000):  # 2xxx: client errors
        for marker, what in _MESSAGES:
            if marker in text:
                return what
    return None
