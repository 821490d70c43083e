"""Where session rows live, under the name earlier releases gave it (now `sqla_sessions.store.handlers`)."""

from .store.handlers import BaseHandler, DatabaseHandler, MemoryHandler, SessionHandler

__all__ = ["BaseHandler", "DatabaseHandler", "MemoryHandler", "SessionHandler"]
