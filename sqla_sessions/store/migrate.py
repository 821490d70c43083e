"""Run the library's Alembic migrations from Python (what `sqla-sessions migrate` calls).

The migrations keep their own version table, `sqla_sessions_alembic_version`, so a host app's
`alembic_version` is never touched. A table other than `sessions` gets a version table of its own
(`sqla_sessions_alembic_version_<table>`), or a second table in the same database would be taken for
already migrated.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from importlib import resources
from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy.engine import Connection, Engine

from ..config import SessionConfig

DEFAULT_VERSION_TABLE = "sqla_sessions_alembic_version"
_MAX_IDENTIFIER = 63  # PostgreSQL's limit; MySQL allows 64


def version_table_for(table: str) -> str:
    """Return the Alembic version table that tracks the sessions table *table*."""
    if table == "sessions":
        return DEFAULT_VERSION_TABLE
    name = f"{DEFAULT_VERSION_TABLE}_{table}"
    if len(name) > _MAX_IDENTIFIER:  # 0.1's rule, kept: a database it set up finds its history
        digest = hashlib.sha256(table.encode()).hexdigest()[:8]
        name = f"{DEFAULT_VERSION_TABLE}_{table[: _MAX_IDENTIFIER - len(DEFAULT_VERSION_TABLE) - 10]}_{digest}"
    return name


def version_table_has_pk(version_table: str) -> bool:
    """Whether Alembic may give the version table its primary key: it names it `<table>_pkc`, which
    must fit PostgreSQL's 63 characters (a version table works without one)."""
    return len(version_table) + len("_pkc") <= _MAX_IDENTIFIER


def host_include_name(*tables: str) -> Callable[[str | None, str, Mapping[str, str | None]], bool]:
    """An `include_name` for a host app's Alembic `context.configure(...)`: its autogenerate and
    `alembic check` leave the sessions tables (*tables*, default "sessions") and sqla_sessions' own
    version tables alone, whose history `sqla_sessions.upgrade()` keeps (see the README's recipe).
    By default: "sessions" and the table `SQLA_SESSIONS_TABLE` names."""
    ours = set(tables) if tables else {"sessions", table_name_for_migrations()}

    def include_name(name: str | None, type_: str, parent_names: Mapping[str, str | None]) -> bool:
        if type_ != "table" or name is None:
            return True
        return name not in ours and not name.startswith(DEFAULT_VERSION_TABLE)

    return include_name


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
    return str(Path(__file__).resolve().parents[2] / "migrations")  # sqla_sessions/store/migrate.py


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
    """Upgrade the schema (URL default: `SQLA_SESSIONS_DATABASE_URL`); with *sql*, print the DDL instead.

    May be called from a host app's Alembic `env.py` (with its connection), see the README's recipe.
    """
    with _inside_a_host_environment():
        command.upgrade(alembic_config(engine_or_url, table=table), revision, sql=sql)


def upgrade_with_host(connection: Connection, *, table: str | None = None) -> None:
    """From a host app's Alembic `env.py`, after its own `context.run_migrations()`: when the host's
    command is an upgrade, bring the sessions table to its head too, on the host's connection.

    Other commands (`revision --autogenerate`, `check`, `stamp`, `downgrade`, `current`) leave it
    alone. The sessions table keeps its own history in its own version table, so the host's
    `alembic_version` holds only the host's revisions, and a database set up with `upgrade()` (or
    `sqla-sessions migrate`) switches to this recipe as it is.
    """
    from alembic import context

    environment = context.get_context().environment_context
    command_fn = environment.context_opts.get("fn") if environment is not None else None
    if getattr(command_fn, "__name__", None) == "upgrade":
        upgrade(connection, table=table)


def downgrade(
    engine_or_url: Engine | Connection | str | None = None, *, table: str | None = None, revision: str = "base"
) -> None:
    """Downgrade the schema (to nothing, by default)."""
    with _inside_a_host_environment():
        command.downgrade(alembic_config(engine_or_url, table=table), revision)


@contextmanager
def _inside_a_host_environment() -> Iterator[None]:
    """Run an Alembic command of ours, possibly inside a host app's running `env.py`.

    Alembic keeps the running environment in module globals (`alembic.context`, `alembic.op`); a
    nested command installs its own and removes them on exit, so the host's `env.py` would then fail
    as its environment ends (`KeyError: 'config'`). The host's are put back as they were.
    """
    from alembic import context, op

    outer = [(module, getattr(module, "_proxy", None)) for module in (context, op)]
    try:
        yield
    finally:
        for module, proxy in outer:
            if proxy is not None and getattr(module, "_proxy", None) is not proxy:
                proxy._install_proxy()
