"""`sqla-sessions` (also `python -m sqla_sessions`): migrate, gc, sessions, revoke, stats, demo.

Every command takes `--database-url` (default: `SQLA_SESSIONS_DATABASE_URL`, then the embedded
SQLite default, with a warning) and `--table` (default: `SQLA_SESSIONS_TABLE`, then `sessions`),
before or after the command's name; the database used is said on stderr. Bad input — a
malformed URL, an unreachable database, a missing table — is one clear line on stderr and exit
status 1, never a traceback.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, TypeVar

import click
import sqlalchemy as sa
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from .config import SessionConfig
from .errors import ConfigurationError, misconfiguration
from .http.useragents import describe
from .store.handlers.database import DatabaseHandler
from .store.handlers.engines import create_session_engine, masked_url
from .store.migrate import upgrade

F = TypeVar("F", bound=Callable[..., Any])
DEFAULT_URL = SessionConfig().database_url
DEMO_URL = "sqlite:///sqla_sessions_demo.db"

out = Console()
if not out.is_terminal:  # piped or redirected: do not squeeze tables into 80 columns
    out = Console(width=200)
err = Console(stderr=True, soft_wrap=True)


def visible(text: str) -> str:
    """*text* with every character a terminal could act on written out as its Python escape.

    What the CLI prints comes from clients (a user agent is whatever the User-Agent header said, an
    address whatever a proxy passed on) and from the database's own messages. Raw, an ESC sequence
    would retitle or recolour the operator's terminal, a C1 control (U+009B is a CSI) do the same on
    terminals that take 8-bit controls, a bidi override (U+202E) make a line read other than it is.
    Escaped (`\\x1b`, `\\x9b`, `\\u202e`), the operator sees that something was there. Every
    character `str.isprintable` rejects is escaped: C0, DEL, C1, format characters (bidi controls,
    zero-width ones), line and paragraph separators, unassigned code points; and the backslash
    itself, so that an escape shown is never one the client typed.
    """
    if text.isprintable() and "\\" not in text:
        return text  # nearly every value: no copy
    return "".join(_escaped(char) for char in text)


def _escaped(char: str) -> str:
    if char == "\\":
        return "\\\\"
    return char if char.isprintable() else char.encode("unicode_escape").decode("ascii")


def shown(text: str) -> Text:
    """What the CLI prints of anything not written in this file: `visible`, and read as plain text,
    never as rich markup or emoji codes (a user agent of "[reverse blink]Bot" must not restyle the
    device list, nor "[/x]" crash it)."""
    return Text(visible(text))


class Failure(click.ClickException):
    """One line on stderr, exit status 1."""

    def show(self, file: Any = None) -> None:
        err.print(Text.assemble(("error:", "bold red"), " ", shown(self.message)))


def _env(name: str) -> str | None:
    return os.environ.get(name) or None


def database_options(command: F) -> F:
    """`--database-url` and `--table`, accepted on the group (before the command) and on the command.

    The command's own option wins, then the group's, then the environment, then the default; --help
    shows what will be used.
    """
    command = click.option(
        "--table",
        default=None,
        show_default=_env("SQLA_SESSIONS_TABLE") or "sessions",
        help="Sessions table (env SQLA_SESSIONS_TABLE).",
    )(command)
    command = click.option(
        "--database-url",
        default=None,
        show_default=masked_url(_env("SQLA_SESSIONS_DATABASE_URL") or DEFAULT_URL),
        help="SQLAlchemy URL (env SQLA_SESSIONS_DATABASE_URL).",
    )(command)
    return command


def _resolve(
    database_url: str | None, table: str | None, *, default_url: str = DEFAULT_URL, warn_default: bool = True
) -> tuple[str, str]:
    """The database and table a command uses; said on stderr (password masked), with a warning for
    the embedded SQLite default, so nobody works on `./sessions.db` by accident."""
    given = click.get_current_context().find_root().params
    url = database_url or given.get("database_url") or _env("SQLA_SESSIONS_DATABASE_URL")
    chosen_table = table or given.get("table") or _env("SQLA_SESSIONS_TABLE") or "sessions"
    if url is None and warn_default:
        url = default_url
        warning = f" no --database-url and no SQLA_SESSIONS_DATABASE_URL: using {masked_url(url)}"
        err.print(Text.assemble(("warning:", "yellow"), shown(warning)))
    else:
        url = url or default_url
        err.print(shown(f"database: {masked_url(url)}, table {chosen_table}"))
    return url, chosen_table


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
            what = misconfiguration(exc)
            if what is not None:
                raise Failure(f"the database refused the configuration ({what}): {_first_line(exc.orig)}") from None
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
            raise Failure(f"table {table!r} not found in {masked_url(database_url)}: run `sqla-sessions migrate`")
    context = click.get_current_context(silent=True)
    if context is not None:  # run in a process that goes on (`manage.py sqla_sessions`, tests): close it
        context.call_on_close(engine.dispose)
    return DatabaseHandler(engine, cfg)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="sqla-sessions")
@database_options
def main(database_url: str | None, table: str | None) -> None:
    """Server-side sessions on SQLAlchemy: schema, clean-up, devices, statistics, and a demo.

    --database-url and --table go before or after the command.
    """


@main.command()
@database_options
@click.option("--sql", is_flag=True, help="Print the DDL instead of running it.")
@click.option("--revision", default="head", show_default=True)
@friendly_errors
def migrate(database_url: str | None, table: str | None, sql: bool, revision: str) -> None:
    """Create or upgrade the sessions table (Alembic, own version table)."""
    database_url, table = _resolve(database_url, table)
    if not sql:
        with create_session_engine(database_url).connect():
            pass  # fail fast and clearly if the database is unreachable
    upgrade(database_url, table=table, revision=revision, sql=sql)
    if not sql:
        out.print(shown(f"table {table!r} is at revision {revision}"))


@main.command()
@database_options
@click.option("--batch-size", type=click.IntRange(1, 1_000_000), default=1000, show_default=True)
@click.option(
    "--pause",
    type=click.FloatRange(0, 60),
    default=0,
    show_default=True,
    help="Seconds between batches: a paced sweep that leaves room for live traffic (large tables).",
)
@click.option("--dry-run", is_flag=True, help="Count the expired sessions; delete nothing.")
@friendly_errors
def gc(database_url: str | None, table: str | None, batch_size: int, pause: float, dry_run: bool) -> None:
    """Delete expired sessions in bounded batches."""
    database_url, table = _resolve(database_url, table)
    handler = open_handler(database_url, table)
    expired = handler.stats().expired
    if dry_run:
        out.print(f"{expired} expired sessions would be deleted (in batches of {batch_size})")
        return
    if out.is_terminal:
        columns = (TextColumn("deleting expired sessions"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
        with Progress(*columns, console=out) as progress:
            task = progress.add_task("gc", total=max(expired, 1))
            deleted = handler.gc(batch_size, on_batch=lambda n: progress.advance(task, n), pause=pause)
    else:
        done = 0

        def report(n: int) -> None:
            nonlocal done
            done += n
            print(f"deleted {n} (total {done})", flush=True)

        deleted = handler.gc(batch_size, on_batch=report, pause=pause)
    out.print(f"deleted {deleted} expired sessions")


@main.command()
@database_options
@click.option("--user", "user_id", required=True, help="The user id whose live sessions to list.")
@friendly_errors
def sessions(database_url: str | None, table: str | None, user_id: str) -> None:
    """List a user's live sessions (devices)."""
    database_url, table = _resolve(database_url, table)
    handler = open_handler(database_url, table)
    infos = handler.list_sessions(user_id)
    listing = Table(title=shown(f"live sessions of user {user_id!r}"))
    for column in ("key", "ip", "browser", "os", "created", "last active"):
        listing.add_column(column)
    for info in infos:
        browser, system = describe(info.user_agent)
        listing.add_row(
            shown(info.key),
            shown(info.ip_address or "-"),
            shown(browser),
            shown(system),
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
def revoke(
    database_url: str | None, table: str | None, key: str | None, user_id: str | None, except_key: str | None
) -> None:
    """Log out one session (KEY) or all of a user's sessions (--user ID [--except KEY])."""
    database_url, table = _resolve(database_url, table)
    if (key is None) == (user_id is None):
        raise click.UsageError("give either a session KEY or --user ID")
    if except_key is not None and user_id is None:
        raise click.UsageError("--except goes with --user")
    handler = open_handler(database_url, table)
    if key is not None:
        if not handler.revoke(key):
            raise Failure(f"no session with key {key!r}")
        out.print(shown(f"revoked session {key}"))
    else:
        count = handler.revoke_user(user_id, except_key=except_key)
        out.print(shown(f"revoked {count} session(s) of user {user_id!r}"))


@main.command()
@database_options
@friendly_errors
def stats(database_url: str | None, table: str | None) -> None:
    """Live and expired sessions, users, and the table's size."""
    database_url, table = _resolve(database_url, table)
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
    default=None,
    show_default=masked_url(_env("SQLA_SESSIONS_DATABASE_URL") or DEMO_URL),
    help="SQLAlchemy URL (env SQLA_SESSIONS_DATABASE_URL).",
)
@click.option("--table", default=None, show_default=_env("SQLA_SESSIONS_TABLE") or "sessions")
@click.option("--broker", help="redis://… or amqp://…: real dramatiq worker processes (default: in-process).")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True)
@click.option("--workers", type=click.IntRange(1, 16), default=2, show_default=True, help="With --broker.")
@friendly_errors
def demo(database_url: str | None, table: str | None, broker: str | None, host: str, port: int, workers: int) -> None:
    """Run the demo app (login, background job, flash, devices, race, blocking) under uvicorn."""
    try:
        from .demo.server import serve
    except ImportError as exc:
        raise Failure(f"the demo needs its extra: pip install 'sqla-sessions[demo]' ({exc})") from None
    if importlib.util.find_spec("python_multipart") is None:  # the login form; without it every POST is a 500
        raise Failure("the demo needs its extra: pip install 'sqla-sessions[demo]' (python-multipart is missing)")
    database_url, table = _resolve(database_url, table, default_url=DEMO_URL, warn_default=False)
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
