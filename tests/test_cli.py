"""`sqla-sessions`: every command on a real database, and bad input as one clear line."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from sqla_sessions import DatabaseHandler, SessionConfig
from sqla_sessions.cli import main, visible
from tests.conftest import Backend, backend_for

CHROME = "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/120.0 Safari/537.36"


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """The real command, as a user types it (`python -m sqla_sessions` is the same entry point)."""
    return subprocess.run(
        [sys.executable, "-m", "sqla_sessions", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **(env or {})},
    )


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    url = f"sqlite:///{tmp_path / 'cli.db'}"
    result = run("migrate", "--database-url", url)
    assert result.returncode == 0, result.stderr
    return url


def seed(url: str, user: str, count: int, *, agent: str = CHROME) -> list[str]:
    handler = DatabaseHandler(url, SessionConfig(database_url=url))
    keys = []
    for _ in range(count):
        session = handler.load(None)
        session.ip_address, session.user_agent = "198.51.100.7", agent
        session.login(user)
        session.save()
        keys.append(session.key or "")
    handler.close()
    return keys


def test_sessions_lists_a_users_devices_with_browser_and_os(sqlite_url: str) -> None:
    keys = seed(sqlite_url, "ada", 2)
    result = CliRunner().invoke(main, ["sessions", "--user", "ada", "--database-url", sqlite_url])
    assert result.exit_code == 0, result.output
    assert all(key in result.output for key in keys)
    assert "Chrome 120" in result.output and "Linux" in result.output and "198.51.100.7" in result.output
    assert "2 session(s)" in result.output


def test_revoke_one_and_revoke_a_user_except_one(sqlite_url: str) -> None:
    keys = seed(sqlite_url, "bob", 3)
    runner = CliRunner()
    assert "revoked session" in runner.invoke(main, ["revoke", keys[0], "--database-url", sqlite_url]).output
    missing = runner.invoke(main, ["revoke", keys[0], "--database-url", sqlite_url])
    assert missing.exit_code == 1 and "no session with key" in missing.output
    result = runner.invoke(main, ["revoke", "--user", "bob", "--except", keys[2], "--database-url", sqlite_url])
    assert "revoked 1 session(s)" in result.output
    assert "1 session(s)" in runner.invoke(main, ["sessions", "--user", "bob", "--database-url", sqlite_url]).output
    usage = runner.invoke(main, ["revoke", "--database-url", sqlite_url])
    assert usage.exit_code == 2


def test_stats_and_gc(sqlite_url: str) -> None:
    seed(sqlite_url, "cy", 2)
    handler = DatabaseHandler(sqlite_url, SessionConfig(database_url=sqlite_url))
    with handler.engine.begin() as conn:
        conn.exec_driver_sql("UPDATE sessions SET expires_at = 0")  # everything has expired
    seed(sqlite_url, "dee", 1)
    stats = run("stats", "--database-url", sqlite_url)
    assert stats.returncode == 0
    assert "live sessions" in stats.stdout and "│ 1" in stats.stdout.replace("┃", "│")
    dry = run("gc", "--dry-run", "--database-url", sqlite_url)
    assert "2 expired sessions would be deleted" in dry.stdout
    gc = run("gc", "--batch-size", "1", "--database-url", sqlite_url)  # not a terminal: plain lines
    assert gc.returncode == 0
    assert "deleted 1 (total 1)" in gc.stdout and "deleted 1 (total 2)" in gc.stdout
    assert "deleted 2 expired sessions" in gc.stdout
    assert handler.stats().expired == 0 and handler.stats().live == 1


def test_environment_supplies_the_url(sqlite_url: str) -> None:
    seed(sqlite_url, "eve", 1)
    result = run("sessions", "--user", "eve", env={"SQLA_SESSIONS_DATABASE_URL": sqlite_url})
    assert result.returncode == 0 and "1 session(s)" in result.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["stats", "--database-url", "not a url"], "database_url"),
        (["stats", "--database-url", "postgresql+psycopg://nobody@127.0.0.1:1/x?connect_timeout=2"], "cannot reach"),
        (["gc", "--database-url", "sqlite:////nonexistent/dir/x.db"], "database file cannot be opened"),
        (["stats", "--database-url", "nosuchdialect://x"], "database_url"),
    ],
    ids=["malformed-url", "unreachable", "unopenable-file", "unknown-dialect"],
)
def test_bad_input_is_one_clear_line(args: list[str], message: str) -> None:
    result = run(*args)
    assert result.returncode == 1
    said, error = result.stderr.strip().splitlines()  # which database, then the one line that went wrong
    assert said.startswith("database: ") and message in error
    assert "Traceback" not in result.stderr


def test_a_missing_table_says_to_migrate(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'empty.db'}"
    result = run("stats", "--database-url", url)
    assert result.returncode == 1
    assert f"table 'sessions' not found in {url}: run `sqla-sessions migrate`" in result.stderr


def test_options_go_before_or_after_the_command(sqlite_url: str) -> None:
    seed(sqlite_url, "ann", 2)
    before = run("--database-url", sqlite_url, "sessions", "--user", "ann")
    after = run("sessions", "--user", "ann", "--database-url", sqlite_url)
    assert before.returncode == after.returncode == 0, before.stderr
    assert "2 session(s)" in before.stdout and "2 session(s)" in after.stdout
    # The command's own option wins over the group's; the environment comes last.
    wrong = "sqlite:////nonexistent/dir/x.db"
    both = run("--database-url", wrong, "sessions", "--user", "ann", "--database-url", sqlite_url)
    assert both.returncode == 0 and "2 session(s)" in both.stdout
    env = run("--table", "sessions", "stats", env={"SQLA_SESSIONS_DATABASE_URL": sqlite_url})
    assert env.returncode == 0 and f"database: {sqlite_url}, table sessions" in env.stderr


def test_the_database_used_is_said_with_its_password_masked_and_the_sqlite_default_warned(tmp_path: Path) -> None:
    secret_url = "postgresql+psycopg://app:hunter2@127.0.0.1:1/app?connect_timeout=1"
    result = run("stats", "--database-url", secret_url)
    assert "app:***@127.0.0.1:1/app" in result.stderr and "hunter2" not in result.stderr
    shown = run("stats", "--help", env={"SQLA_SESSIONS_DATABASE_URL": secret_url})
    assert "app:***@127.0.0.1:1/app" in shown.stdout and "hunter2" not in shown.stdout  # what will be used
    env = {k: v for k, v in os.environ.items() if not k.startswith("SQLA_SESSIONS_")}
    default = subprocess.run(
        [sys.executable, "-m", "sqla_sessions", "stats"], capture_output=True, text=True, cwd=tmp_path, env=env
    )
    assert "warning: no --database-url and no SQLA_SESSIONS_DATABASE_URL: using sqlite:///sessions.db" in (
        default.stderr
    )


def test_migrate_on_postgresql_and_print_sql(tmp_root: Path) -> None:
    backend: Backend = backend_for("postgresql", tmp_root)
    result = run("migrate", "--database-url", backend.url, "--table", "cli_sessions")
    assert result.returncode == 0, result.stderr
    assert "'cli_sessions' is at revision head" in result.stdout
    assert run("stats", "--database-url", backend.url, "--table", "cli_sessions").returncode == 0
    ddl = run("migrate", "--sql", "--database-url", "postgresql+psycopg://u@h/db")
    assert "CREATE TABLE sessions" in ddl.stdout


def test_help_lists_every_command() -> None:
    result = run("--help")
    for command in ("migrate", "gc", "sessions", "revoke", "stats", "demo"):
        assert command in result.stdout


def test_what_clients_and_operators_typed_is_shown_as_text_not_markup(sqlite_url: str) -> None:
    seed(sqlite_url, "[bold]ada", 1, agent="[reverse blink]Bot")
    runner = CliRunner()
    listing = runner.invoke(main, ["sessions", "--user", "[bold]ada", "--database-url", sqlite_url])
    assert listing.exit_code == 0, listing.output
    assert "[bold]ada" in listing.output and "Traceback" not in listing.output
    revoked = runner.invoke(main, ["revoke", "[/x]", "--database-url", sqlite_url])
    assert revoked.exit_code != 0 and "[/x]" in revoked.output and "Traceback" not in revoked.output
    by_user = runner.invoke(main, ["revoke", "--user", "[/x]", "--database-url", sqlite_url])
    assert by_user.exit_code == 0 and "[/x]" in by_user.output


def test_gc_can_be_paced(sqlite_url: str) -> None:
    result = CliRunner().invoke(main, ["gc", "--database-url", sqlite_url, "--batch-size", "5", "--pause", "0.01"])
    assert result.exit_code == 0, result.output
    assert "deleted" in result.output
    bad = CliRunner().invoke(main, ["gc", "--database-url", sqlite_url, "--pause", "-1"])
    assert bad.exit_code != 0


HOSTILE = ("\x1b]0;pwned\x07", "\x1b[31m", "\x9b", "\u202e", "\x7f", "\x00", "\r", "\u2028", "\u200b")


def test_control_characters_from_stored_values_never_reach_the_terminal(sqlite_url: str) -> None:
    """A user agent (the client's own header) or an address holding escape sequences, C1 controls,
    DEL, bidi overrides: the device list shows them escaped, and prints none of them."""
    android = "Mozilla/5.0 (Linux; Android 13; {}) AppleWebKit/537.36 Chrome/120.0 Mobile Safari/537.36"
    handler = DatabaseHandler(sqlite_url, SessionConfig(database_url=sqlite_url))
    for n, bad in enumerate(HOSTILE):
        session = handler.load(None)
        session.ip_address = f"198.51.100.{n}{bad}\u202e1.0.0.1"
        session.user_agent = f"{bad}Evil{bad}Bot/1.0 {android.format(bad)} \\x1b"
        session.login("mallory")
        session.save()
    handler.close()

    result = run("sessions", "--user", "mallory", "--database-url", sqlite_url)

    assert result.returncode == 0, result.stderr
    printed = result.stdout + result.stderr
    assert not [char for char in printed if char != "\n" and not char.isprintable()], ascii(printed)
    assert "\\x1b" in printed and "\\x9b" in printed and "\\u202e" in printed  # seen to be there
    assert f"{len(HOSTILE)} session(s)" in result.stdout


def test_visible_escapes_every_character_a_terminal_could_act_on() -> None:
    assert visible("Chrome 120 / Linux ✓") == "Chrome 120 / Linux ✓"
    assert visible("a\x1b[31mb\x07c\x9bd\u202ee\x7ff\u2028g") == "a\\x1b[31mb\\x07c\\x9bd\\u202ee\\x7ff\\u2028g"
    assert visible("typed \\x1b") == "typed \\\\x1b"  # a backslash the client sent is not an escape shown
    assert visible("\U000e0001 \ud800") == "\\U000e0001 \\ud800"  # a tag character, a lone surrogate
