"""Create the sessions table.

Revision ID: sqla_sessions_0001
Revises:
Create Date: 2026-11-22
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import context, op
from sqlalchemy.dialects import mysql

from sqla_sessions.store.migrate import table_name_for_migrations

revision: str = "sqla_sessions_0001"
down_revision: str | Sequence[str] | None = None
# A branch label of its own, so a host app can keep these migrations beside its own:
# `alembic upgrade sqla_sessions@head`.
branch_labels: str | Sequence[str] | None = ("sqla_sessions",)
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Create the table, its unique id hash and the (user_id, last_activity) and expiry indexes."""
    table = table_name_for_migrations(context.config.attributes)
    op.create_table(
        table,
        sa.Column("key", sa.String(32), nullable=False),
        sa.Column("id_hash", sa.String(64), nullable=False),
        sa.Column(
            "user_id",
            sa.String(255).with_variant(
                mysql.VARCHAR(255, charset="utf8mb4", collation="utf8mb4_bin"), "mysql", "mariadb"
            ),
            nullable=True,
        ),
        sa.Column("ip_address", sa.String(45), nullable=True),
        sa.Column("user_agent", sa.String(512), nullable=True),
        sa.Column("payload", sa.LargeBinary().with_variant(mysql.LONGBLOB(), "mysql", "mariadb"), nullable=False),
        sa.Column("version", sa.BigInteger(), nullable=False),
        sa.Column("created_at", sa.BigInteger(), nullable=False),
        sa.Column("last_activity", sa.BigInteger(), nullable=False),
        sa.Column("expires_at", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("key", name=f"pk_{table}"),
        sa.UniqueConstraint("id_hash", name=f"uq_{table}_id_hash"),
    )
    op.create_index(f"ix_{table}_user_id_last_activity", table, ["user_id", "last_activity"])
    op.create_index(f"ix_{table}_expires_at", table, ["expires_at"])


def downgrade() -> None:
    """Drop the table (and with it every session)."""
    table = table_name_for_migrations(context.config.attributes)
    op.drop_index(f"ix_{table}_expires_at", table_name=table)
    op.drop_index(f"ix_{table}_user_id_last_activity", table_name=table)
    op.drop_table(table)
