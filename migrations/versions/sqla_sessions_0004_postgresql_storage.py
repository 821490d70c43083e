"""PostgreSQL storage parameters for the sessions table: fillfactor and per-table autovacuum.

Chosen from `benchmarks/large_table.py` (HOT updates, `n_tup_hot_upd / n_tup_upd`, 100k rows):

| fillfactor | first write | writes within touch_interval | touches | mixed traffic | heap |
|---|---|---|---|---|---|
| 100 | 0.88 | 0.97 | 0.00 | 0.39 | 56.9 MB |
| 90 | 1.00 | 1.00 | 0.00 | 0.43 | 66.4 MB |
| 80 | 1.00 | 1.00 | 0.00 | 0.44 | 72.4 MB |

Writes inside `touch_interval` change no indexed column and are HOT once a page has room; 90 leaves
that room (80 buys one point more for 9 % more heap). Touches move `last_activity` and
`expires_at`, both indexed, so they are never HOT: they leave dead index entries, and a session
table churns far faster than the 20 % default autovacuum waits for on a large table. So vacuum
runs after 2 % dead rows (and 1,000 at least), analyze after 5 %.

A new fillfactor applies to pages written from now on; `VACUUM FULL` (or pg_repack) rewrites the
existing ones. Other databases: nothing to do.

Revision ID: sqla_sessions_0004
Revises: sqla_sessions_0003
Create Date: 2026-12-02
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import context, op

from sqla_sessions.store.migrate import table_name_for_migrations

revision: str = "sqla_sessions_0004"
down_revision: str | Sequence[str] | None = "sqla_sessions_0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

STORAGE = {
    "fillfactor": "90",
    "autovacuum_vacuum_scale_factor": "0.02",
    "autovacuum_vacuum_threshold": "1000",
    "autovacuum_vacuum_insert_scale_factor": "0.05",
    "autovacuum_analyze_scale_factor": "0.05",
}


def upgrade() -> None:
    """Set the storage parameters (PostgreSQL only)."""
    if context.get_context().dialect.name != "postgresql":
        return
    table = table_name_for_migrations(context.config.attributes)
    settings = ", ".join(f"{name} = {value}" for name, value in STORAGE.items())
    op.execute(f'ALTER TABLE "{table}" SET ({settings})')


def downgrade() -> None:
    """Back to the server's defaults (PostgreSQL only)."""
    if context.get_context().dialect.name != "postgresql":
        return
    table = table_name_for_migrations(context.config.attributes)
    op.execute(f'ALTER TABLE "{table}" RESET ({", ".join(STORAGE)})')
