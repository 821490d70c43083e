"""Server-side HTTP sessions on SQLAlchemy 2 that never lose a concurrent write."""

from .config import SessionConfig
from .errors import (
    ConfigurationError,
    LockTimeout,
    PayloadTooLarge,
    SessionError,
    SessionInterrupted,
    StoreUnavailable,
)
from .handlers import DatabaseHandler, MemoryHandler, SessionHandler
from .migrate import downgrade, upgrade
from .records import SaveAction, SessionInfo
from .session import Session

__version__ = "0.1.0"

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
    "StoreUnavailable",
    "__version__",
    "downgrade",
    "upgrade",
]
