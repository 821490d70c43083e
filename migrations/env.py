"""Alembic environment for the sqla_sessions schema (the template's two-function shape).

Where the URL comes from, first match wins: an Engine/Connection in `config.attributes["connection"]`,
`-x url=…`, `config.attributes["url"]`, `SQLA_SESSIONS_DATABASE_URL`, `sqlalchemy.url` in the ini.
The table: `-x table=…`, `config.attributes["sqla_sessions_table"]`, `SQLA_SESSIONS_TABLE`, "sessions".
"""

from __future__ import annotations

import os
from logging.config import fileConfig

from alembic import context
from sqlalchemy import pool
from sqlalchemy.engine import Connection, Engine

from sqla_sessions.store.handlers.engines import create_session_engine, normalize_url
from sqla_sessions.store.migrate import table_name_for_migrations, version_table_for, version_table_has_pk
from sqla_sessions.store.schema import sessions_table

config = context.config
if config.config_file_name is not None and config.attributes.get("configure_logger", True):
    fileConfig(config.config_file_name, disable_existing_loggers=False)

x_args = context.get_x_argument(as_dictionary=True)
if "table" in x_args:
    config.attributes["sqla_sessions_table"] = x_args["table"]
table = table_name_for_migrations(config.attributes)
config.attributes["sqla_sessions_table"] = table  # the revisions read it
target_metadata = sessions_table(table).metadata
version_table = version_table_for(table)


def _url() -> str:
    url = (
        x_args.get("url")
        or config.attributes.get("url")
        or os.environ.get("SQLA_SESSIONS_DATABASE_URL")
        or config.get_main_option("sqlalchemy.url")
    )
    if not url:
        raise SystemExit("sqla_sessions migrations: set SQLA_SESSIONS_DATABASE_URL or pass -x url=...")
    return str(url)


def _include_name(name: str | None, type_: str, parent_names: object) -> bool:
    # Autogenerate/check look at the sessions table only, never at a host app's tables.
    return type_ != "table" or name == table


def run_migrations_offline() -> None:
    """Print the DDL (`alembic upgrade head --sql`)."""
    context.configure(
        url=normalize_url(_url()),
        target_metadata=target_metadata,
        literal_binds=True,
        dialect_opts={"paramstyle": "named"},
        version_table=version_table,
        version_table_pk=version_table_has_pk(version_table),
        include_name=_include_name,
    )
    with context.begin_transaction():
        context.run_migrations()


def _run(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        version_table=version_table,
        version_table_pk=version_table_has_pk(version_table),
        include_name=_include_name,
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    """Run against a live database: a shared Engine/Connection, or one made from the URL."""
    shared = config.attributes.get("connection")
    if isinstance(shared, Connection):
        _run(shared)
        return
    engine = shared if isinstance(shared, Engine) else create_session_engine(_url(), poolclass=pool.NullPool)
    try:
        with engine.connect() as connection:
            _run(connection)
            connection.commit()
    finally:
        if engine is not shared:
            engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
