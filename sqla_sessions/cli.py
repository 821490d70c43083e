"""`sqla-sessions` (also `python -m sqla_sessions`): migrate, gc, sessions, revoke, stats, demo.

Every command takes `--database-url` (default: `SQLA_SESSIONS_DATABASE_URL`, then the embedded
SQLite default) and `--table` (default: `SQLA_SESSIONS_TABLE`, then `sessions`). Bad input — a
malformed URL, an unreachable database, a missing table — is one clear line on stderr and exit
status 1, never a traceback.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, TypeVar

import click
import sqlalchemy as sa
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from .config import SessionConfig
from .errors import ConfigurationError
from .handlers.database import DatabaseHandler
from .handlers.engines import create_session_engine
from .migrate import upgrade
from .useragents import describe

F = TypeVar("F", bound=Callable[..., Any])
DEFAULT_URL = SessionConfig().database_url

out = Console()
if not out.is_terminal:  # piped or redirected: do not squeeze tables into 80 columns
    out = Console(width=200)
err = Console(stderr=True, soft_wrap=True)


class Failure(click.ClickException):
    """One line on stderr, exit status 1."""

    def show(self, file: Any = None) -> None:
        err.print(f"[bold red]error:[/] {escape(self.message)}", highlight=False)


def database_options(command: F) -> F:
    """`--database-url` and `--table` on every command, with their environment defaults."""
    command = click.option(
        "--table", envvar="SQLA_SESSIONS_TABLE", default="sessions", show_default=True, help="Sessions table."
    )(command)
    command = click.option(
        "--database-url",
        envvar="SQLA_SESSIONS_DATABASE_URL",
        default=DEFAULT_URL,
        show_default=True,
        help="SQLAlchemy URL (env SQLA_SESSIONS_DATABASE_URL).",
    )(command)
    return command


def friendly_errors(command: F) -> F:
    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except (ConfigurationError, ValueError) as exc:
            raise Failure(str(exc)) from None
        except sa.exc.ArgumentError as exc:
            raise Failure(f"database_url: {exc}") from None
        except sa.exc.OperationalError as exc:
            raise Failure(f"cannot reach the database: {_first_line(exc.orig)}") from None
        except sa.exc.DBAPIError as exc:
            raise Failure(f"database error: {_first_line(exc.orig)}") from None
        except ImportError as exc:
            raise Failure(f"missing driver or extra: {exc}") from None

    return wrapper  # type: ignore[return-value]


def _first_line(error: object) -> str:
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__


def open_handler(database_url: str, table: str, **config: Any) -> DatabaseHandler:
    """A handler on an existing, migrated table (else a clear error)."""
    cfg = SessionConfig(database_url=database_url, table=table, **config)
    engine = create_session_engine(database_url, autocommit=True)
    with engine.connect() as conn:  # reach the database first, so "unreachable" is told apart
        if not sa.inspect(conn).has_table(table):
            engine.dispose()
            raise Failure(f"table {table!r} does not exist in this database: run `sqla-sessions migrate` first")
    return DatabaseHandler(engine, cfg)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="sqla-sessions")
def main() -> None:
    """Server-side sessions on SQLAlchemy: schema, clean-up, devices, statistics, and a demo."""


@main.command()
@database_options
@click.option("--sql", is_flag=True, help="Print the DDL instead of running it.")
@click.option("--revision", default="head", show_default=True)
@friendly_errors
def migrate(database_url: str, table: str, sql: bool, revision: str) -> None:
    """Create or upgrade the sessions table (Alembic, own version table)."""
    if not sql:
        with create_session_engine(database_url).connect():
            pass  # fail fast and clearly if the database is unreachable
    upgrade(database_url, table=table, revision=revision, sql=sql)
    if not sql:
        out.print(f"table {table!r} is at revision {revision}")


@main.command()
@database_options
@click.option("--batch-size", type=click.IntRange(1, 1_000_000), default=1000, show_default=True)
@click.option("--dry-run", is_flag=True, help="Count the expired sessions; delete nothing.")
@friendly_errors
def gc(database_url: str, table: str, batch_size: int, dry_run: bool) -> None:
    """Delete expired sessions in bounded batches."""
    handler = open_handler(database_url, table)
    expired = handler.stats().expired
    if dry_run:
        out.print(f"{expired} expired sessions would be deleted (in batches of {batch_size})")
        return
    if out.is_terminal:
        columns = (TextColumn("deleting expired sessions"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
        with Progress(*columns, console=out) as progress:
            task = progress.add_task("gc", total=max(expired, 1))
            deleted = handler.gc(batch_size, on_batch=lambda n: progress.advance(task, n))
    else:
        done = 0

        def report(n: int) -> None:
            nonlocal done
            done += n
            print(f"deleted {n} (total {done})", flush=True)

        deleted = handler.gc(batch_size, on_batch=report)
    out.print(f"deleted {deleted} expired sessions")


@main.command()
@database_options
@click.option("--user", "user_id", required=True, help="The user id whose live sessions to list.")
@friendly_errors
def sessions(database_url: str, table: str, user_id: str) -> None:
    """List a user's live sessions (devices)."""
    handler = open_handler(database_url, table)
    infos = handler.list_sessions(user_id)
    # Everything a client or an operator typed is shown as text, never read as rich markup: a user
    # agent of "[reverse blink]Bot" must not restyle the device list, nor "[/x]" crash it.
    listing = Table(title=escape(f"live sessions of user {user_id!r}"))
    for column in ("key", "ip", "browser", "os", "created", "last active"):
        listing.add_column(column)
    for info in infos:
        browser, system = describe(info.user_agent)
        listing.add_row(
            escape(info.key),
            escape(info.ip_address or "-"),
            escape(browser),
            escape(system),
            _when(info.created_at),
            _when(info.last_activity),
        )
    out.print(listing)
    out.print(f"{len(infos)} session(s)")


@main.command()
@database_options
@click.argument("key", required=False)
@click.option("--user", "user_id", help="Revoke every session of this user.")
@click.option("--except", "except_key", help="With --user: keep this session.")
@friendly_errors
def revoke(database_url: str, table: str, key: str | None, user_id: str | None, except_key: str | None) -> None:
    """Log out one session (KEY) or all of a user's sessions (--user ID [--except KEY])."""
    if (key is None) == (user_id is None):
        raise click.UsageError("give either a session KEY or --user ID")
    if except_key is not None and user_id is None:
        raise click.UsageError("--except goes with --user")
    handler = open_handler(database_url, table)
    if key is not None:
        if not handler.revoke(key):
            raise Failure(f"no session with key {key!r}")
        out.print(escape(f"revoked session {key}"))
    else:
        count = handler.revoke_user(user_id, except_key=except_key)
        out.print(escape(f"revoked {count} session(s) of user {user_id!r}"))


@main.command()
@database_options
@friendly_errors
def stats(database_url: str, table: str) -> None:
    """Live and expired sessions, users, and the table's size."""
    handler = open_handler(database_url, table)
    numbers = handler.stats()
    listing = Table(show_header=False)
    listing.add_row("live sessions", str(numbers.live))
    listing.add_row("expired (awaiting gc)", str(numbers.expired))
    listing.add_row("users with a live session", str(numbers.users))
    listing.add_row("table size", _size(numbers.table_bytes))
    out.print(listing)


@main.command()
@click.option(
    "--database-url",
    envvar="SQLA_SESSIONS_DATABASE_URL",
    default="sqlite:///sqla_sessions_demo.db",
    show_default=True,
    help="SQLAlchemy URL (env SQLA_SESSIONS_DATABASE_URL).",
)
@click.option("--table", envvar="SQLA_SESSIONS_TABLE", default="sessions", show_default=True)
@click.option("--broker", help="redis://… or amqp://…: real dramatiq worker processes (default: in-process).")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True)
@click.option("--workers", type=click.IntRange(1, 16), default=2, show_default=True, help="With --broker.")
@friendly_errors
def demo(database_url: str, table: str, broker: str | None, host: str, port: int, workers: int) -> None:
    """Run the demo app (login, background job, flash, devices, race, blocking) under uvicorn."""
    try:
        from .demo.server import serve
    except ImportError as exc:
        raise Failure(f"the demo needs its extra: pip install 'sqla-sessions[demo]' ({exc})") from None
    serve(database_url=database_url, table=table, broker_url=broker, host=host, port=port, workers=workers)


def _when(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _size(size: int | None) -> str:
    if size is None:
        return "unknown on this database"
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{size} B"


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
