"""The exceptions sqla_sessions raises.

```
SessionError
├── ConfigurationError   (also a ValueError)
├── PayloadTooLarge
├── LockTimeout
├── SessionInterrupted
└── StoreUnavailable
```
"""

from __future__ import annotations

from sqlalchemy.exc import DisconnectionError, InterfaceError, OperationalError
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
    """Raised when a blocking request waited `block_wait_seconds` for its session's lock."""

    def __init__(self, waited: float) -> None:
        super().__init__(f"session lock not acquired within {waited:g} s")
        self.waited = waited


class SessionInterrupted(SessionError):
    """Raised when a save finds its session destroyed meanwhile (logout, revoke, expiry); nothing is written."""


class StoreUnavailable(SessionError):
    """Raised by `session.save()`/`reload()` (and their async forms) called by the app when the store
    cannot be reached; the middlewares answer 503 with `Retry-After` for it, as for their own saves."""
