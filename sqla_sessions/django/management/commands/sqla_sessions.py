"""`manage.py sqla_sessions <command>`: the `sqla-sessions` CLI on the database and table the settings name.

python manage.py sqla_sessions migrate        # create or upgrade the sessions table
python manage.py sqla_sessions stats
python manage.py sqla_sessions sessions 42    # user 42's devices
python manage.py clearsessions                # Django's own: expired sessions, in bounded batches
"""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from sqla_sessions.cli import main
from sqla_sessions.django import session_config


class Command(BaseCommand):
    help = "Run an sqla-sessions command (migrate, gc, sessions, revoke, stats) on the configured sessions table."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("args", nargs="*", help="the sqla-sessions command and its arguments, e.g. migrate")

    def run_from_argv(self, argv: list[str]) -> None:
        # Everything after the command's name goes to the CLI untouched (its own --help, options, ...).
        self.handle(*argv[2:])

    def handle(self, *args: str, **options: Any) -> None:
        config = session_config()
        try:
            main.main(
                ["--database-url", config.database_url, "--table", config.table, *args],
                prog_name="manage.py sqla_sessions",
            )
        except SystemExit as exit:  # click ends the process; a management command returns or raises
            if exit.code not in (0, None):
                raise CommandError(f"sqla-sessions exited with status {exit.code}") from None
