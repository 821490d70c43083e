"""Migrations from Python, under the name earlier releases gave it (now `sqla_sessions.store.migrate`):
`upgrade`, `downgrade`, and the helpers for an application's own Alembic environment."""

from .store.migrate import (
    alembic_config,
    downgrade,
    host_include_name,
    script_location,
    upgrade,
    upgrade_with_host,
    version_table_for,
)

__all__ = [
    "alembic_config",
    "downgrade",
    "host_include_name",
    "script_location",
    "upgrade",
    "upgrade_with_host",
    "version_table_for",
]
