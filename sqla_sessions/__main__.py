"""`python -m sqla_sessions` is the `sqla-sessions` command."""

from .cli import main

main()
