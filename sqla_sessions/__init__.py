"""Server-side HTTP sessions on SQLAlchemy 2 that never lose a concurrent write."""

from typing import TYPE_CHECKING, Any

from .config import SessionConfig
from .core.records import SaveAction, SessionInfo
from .core.session import Session
from .errors import (
    ConfigurationError,
    LockTimeout,
    PayloadTooLarge,
    SessionError,
    SessionInterrupted,
    StoreMisconfigured,
    StoreUnavailable,
    TooManyRequests,
)
from .store.handlers import DatabaseHandler, MemoryHandler, SessionHandler

__version__ = "0.3.0"

if TYPE_CHECKING:
    from .store.migrate import downgrade, upgrade


def __getattr__(name: str) -> Any:
    # Alembic is imported only by what migrates: a web or worker process that never does pays
    # nothing for it at import (a third of a second, and Alembic's plugin log lines).
    if name in ("upgrade", "downgrade"):
        from . import migrate

        return getattr(migrate, name)
    raise AttributeError(f"module 'sqla_sessions' has no attribute {name!r}")


__all__ = [
    "ConfigurationError",
    "DatabaseHandler",
    "LockTimeout",
    "MemoryHandler",
    "PayloadTooLarge",
    "SaveAction",
    "Session",
    "SessionConfig",
    "SessionError",
    "SessionHandler",
    "SessionInfo",
    "SessionInterrupted",
    "StoreMisconfigured",
    "StoreUnavailable",
    "TooManyRequests",
    "__version__",
    "downgrade",
    "upgrade",
]
