"""Lease columns for blocking sessions on databases without row locks (SQLite).

Revision ID: sqla_sessions_0002
Revises: sqla_sessions_0001
Create Date: 2026-11-22
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import context, op

from sqla_sessions.store.migrate import table_name_for_migrations

revision: str = "sqla_sessions_0002"
down_revision: str | Sequence[str] | None = "sqla_sessions_0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Add lease_owner and lease_until (nullable: no rewrite of existing rows)."""
    table = table_name_for_migrations(context.config.attributes)
    with op.batch_alter_table(table) as batch:
        batch.add_column(sa.Column("lease_owner", sa.String(32), nullable=True))
        batch.add_column(sa.Column("lease_until", sa.BigInteger(), nullable=True))


def downgrade() -> None:
    """Drop the lease columns."""
    table = table_name_for_migrations(context.config.attributes)
    with op.batch_alter_table(table) as batch:
        batch.drop_column("lease_until")
        batch.drop_column("lease_owner")
