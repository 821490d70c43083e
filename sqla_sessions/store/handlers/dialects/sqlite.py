"""SQLite: no row locks (blocking requests lease the row), one writer at a time."""

from __future__ import annotations

from .base import Database


class SQLite(Database):
    """Everything `Database` says: it is SQLite's."""

    name = "sqlite"
