"""Run the library's Alembic migrations from Python (what `sqla-sessions migrate` calls).

The migrations keep their own version table, `sqla_sessions_alembic_version`, so a host app's
`alembic_version` is never touched. A table other than `sessions` gets a version table of its own
(`sqla_sessions_alembic_version_<table>`), or a second table in the same database would be taken for
already migrated.
"""

from __future__ import annotations

import hashlib
import os
from importlib import resources
from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy.engine import Connection, Engine

from .config import SessionConfig

DEFAULT_VERSION_TABLE = "sqla_sessions_alembic_version"
_MAX_IDENTIFIER = 63  # PostgreSQL's limit; MySQL allows 64


def version_table_for(table: str) -> str:
    """Return the Alembic version table that tracks the sessions table *table*."""
    if table == "sessions":
        return DEFAULT_VERSION_TABLE
    name = f"{DEFAULT_VERSION_TABLE}_{table}"
    limit = _MAX_IDENTIFIER - len("_pkc")  # Alembic names the version table's primary key <name>_pkc
    if len(name) > limit:
        digest = hashlib.sha256(table.encode()).hexdigest()[:8]
        name = f"{DEFAULT_VERSION_TABLE}_{table[: limit - len(DEFAULT_VERSION_TABLE) - 10]}_{digest}"
    return name


def table_name_for_migrations(attributes: dict[str, object] | None = None) -> str:
    """The sessions table a migration run works on: env.py's choice, else `SQLA_SESSIONS_TABLE`, else sessions."""
    chosen = (attributes or {}).get("sqla_sessions_table")
    table = str(chosen) if chosen else os.environ.get("SQLA_SESSIONS_TABLE") or "sessions"
    SessionConfig(table=table)  # the same rule as the config's: a plain identifier the index names fit beside
    return table


def script_location() -> str:
    """The migrations folder: inside the installed package (wheel), else the repository checkout's."""
    packaged = resources.files("sqla_sessions") / "migrations"
    if packaged.is_dir():
        return str(packaged)
    return str(Path(__file__).resolve().parent.parent / "migrations")


def alembic_config(engine_or_url: Engine | Connection | str | None = None, *, table: str | None = None) -> Config:
    """Build an Alembic `Config` for the library's migrations (no alembic.ini needed)."""
    cfg = Config()
    cfg.set_main_option("script_location", script_location())
    # Pass values through `attributes`, not main options: ConfigParser interpolation breaks on '%'.
    if isinstance(engine_or_url, Engine | Connection):
        cfg.attributes["connection"] = engine_or_url
    elif engine_or_url is not None:
        cfg.attributes["url"] = engine_or_url
    if table is not None:
        cfg.attributes["sqla_sessions_table"] = table
    return cfg


def upgrade(
    engine_or_url: Engine | Connection | str | None = None,
    *,
    table: str | None = None,
    revision: str = "head",
    sql: bool = False,
) -> None:
    """Upgrade the schema (URL default: `SQLA_SESSIONS_DATABASE_URL`); with *sql*, print the DDL instead."""
    command.upgrade(alembic_config(engine_or_url, table=table), revision, sql=sql)


def downgrade(
    engine_or_url: Engine | Connection | str | None = None, *, table: str | None = None, revision: str = "base"
) -> None:
    """Downgrade the schema (to nothing, by default)."""
    command.downgrade(alembic_config(engine_or_url, table=table), revision)
