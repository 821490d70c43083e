"""Session handlers: where session rows live."""

from .base import BaseHandler, SessionHandler
from .database import DatabaseHandler
from .memory import MemoryHandler

__all__ = ["BaseHandler", "DatabaseHandler", "MemoryHandler", "SessionHandler"]
