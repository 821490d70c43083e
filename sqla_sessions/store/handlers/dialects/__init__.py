"""What differs between the databases sessions live in, one class each, chosen once when a handler starts.

`Database` says what every database does alike; `PostgreSQL`, `MySQL` (MariaDB too) and `SQLite`
say what is theirs: how a blocking request locks a row (or leases it), how long a save waits for a
lock, how GC deletes a batch, whether many rows are written in one statement, how errors read.
"""

from __future__ import annotations

from sqlalchemy.engine import Engine

from ....config import SessionConfig
from ....errors import ConfigurationError
from ..statements import SessionStatements
from .base import Database
from .mysql import MySQL
from .postgresql import PostgreSQL
from .sqlite import SQLite

__all__ = ["Database", "MySQL", "PostgreSQL", "SQLite", "database_for"]


def database_for(
    engine: Engine, statements: SessionStatements, config: SessionConfig, *, owns_engine: bool
) -> Database:
    """The `Database` of *engine*'s dialect (MariaDB is MySQL's)."""
    name = engine.dialect.name
    if name == "postgresql":
        return PostgreSQL(statements, config)
    if name in ("mysql", "mariadb"):
        return MySQL(statements, config, owns_engine=owns_engine)
    if name == "sqlite":
        return SQLite(statements, config)
    raise ConfigurationError("database_url", f"sessions live in PostgreSQL, MariaDB, MySQL or SQLite, not {name}")
