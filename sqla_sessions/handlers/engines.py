"""Engines that sqla_sessions creates itself from a URL, with the settings sessions need."""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import URL, Engine, make_url
from sqlalchemy.pool import StaticPool

from ..errors import ConfigurationError

#: Seconds a SQLite writer waits for the database write lock before "database is locked".
SQLITE_BUSY_TIMEOUT = 15


def normalize_url(url: str | URL) -> URL:
    """Parse *url*; a bare `postgresql://` means psycopg 3 (SQLAlchemy 2.0 would pick psycopg2)."""
    try:
        parsed = make_url(url)
    except sa.exc.ArgumentError as exc:
        raise ConfigurationError("database_url", f"not a database URL: {exc}") from None
    if parsed.drivername in ("postgresql", "postgres"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    return parsed


def create_session_engine(url: str | URL, *, autocommit: bool = False, **kwargs: Any) -> Engine:
    """Create an engine for *url*: SQLite gets WAL and a busy timeout, `:memory:` one shared database.

    With *autocommit*, every connection is put in autocommit once, when it is opened: the setting
    session handlers want (one statement, one round trip). Setting it per checkout instead
    (`engine.execution_options(isolation_level=…)`) costs a round trip to reset it at every return.
    """
    parsed = normalize_url(url)
    if autocommit:
        kwargs.setdefault("isolation_level", "AUTOCOMMIT")
    if parsed.get_backend_name() != "sqlite":
        return sa.create_engine(parsed, **kwargs)
    connect_args = dict(kwargs.pop("connect_args", {}))
    connect_args.setdefault("timeout", SQLITE_BUSY_TIMEOUT)
    connect_args.setdefault("check_same_thread", False)
    in_memory = parsed.database in (None, "", ":memory:")
    if in_memory:
        # One connection shared by every thread, or each thread would see its own empty database.
        kwargs.setdefault("poolclass", StaticPool)
    engine = sa.create_engine(parsed, connect_args=connect_args, **kwargs)
    if not in_memory:
        use_wal(engine)
    return engine


def use_wal(engine: Engine) -> None:
    """Put every new SQLite connection of *engine* in WAL mode: readers run beside the one writer."""

    @sa.event.listens_for(engine, "connect")
    def _wal(dbapi_connection: Any, _record: Any) -> None:
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.close()


def is_autocommit_engine(engine: Engine) -> bool:
    """True if *engine* opens its connections in autocommit (`create_engine(…, isolation_level="AUTOCOMMIT")`)."""
    # SQLAlchemy keeps create_engine()'s level on the dialect (a private name, stable since 1.4).
    return getattr(engine.dialect, "_on_connect_isolation_level", None) == "AUTOCOMMIT" or (
        engine.get_execution_options().get("isolation_level") == "AUTOCOMMIT"
    )
