"""Split-token session ids: the cookie names the row by key; the id hash is no longer looked up.

Cookies become `<key>.<secret>` and every lookup is by primary key, so the unique index on
`id_hash` (now the hash of the secret alone) goes. `previous_id_hash` holds the id a
`regenerate(destroy=False)` keeps valid. Sessions stored before this revision were reached only
through that index by cookies of the old shape, which are refused from now on: they are deleted
here (their users sign in again once), so device lists don't show sessions nobody can reach.

Revision ID: sqla_sessions_0003
Revises: sqla_sessions_0002
Create Date: 2026-12-02
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import context, op
from sqlalchemy.dialects import mysql

from sqla_sessions.store.migrate import table_name_for_migrations

revision: str = "sqla_sessions_0003"
down_revision: str | Sequence[str] | None = "sqla_sessions_0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Delete the sessions only old-shaped cookies reach; drop the unique index on id_hash; add previous_id_hash."""
    table = table_name_for_migrations(context.config.attributes)
    op.execute(sa.table(table).delete())
    with op.batch_alter_table(table, copy_from=_snapshot(table, split_tokens=False)) as batch:
        batch.drop_constraint(f"uq_{table}_id_hash", type_="unique")
        batch.add_column(sa.Column("previous_id_hash", sa.String(64), nullable=True))


def downgrade() -> None:
    """Bring the unique index back (after deleting the sessions of the split-token shape)."""
    table = table_name_for_migrations(context.config.attributes)
    op.execute(sa.table(table).delete())
    with op.batch_alter_table(table, copy_from=_snapshot(table, split_tokens=True)) as batch:
        batch.drop_column("previous_id_hash")
        batch.create_unique_constraint(f"uq_{table}_id_hash", ["id_hash"])


def _snapshot(table: str, *, split_tokens: bool) -> sa.Table:
    """The table as revision 0002 left it, or this one (SQLite rebuilds tables: this spares reflecting
    it, so `alembic upgrade head --sql` prints the DDL too). A snapshot, not `schema.py`, which moves on."""
    constraints: list[sa.Constraint | sa.Column[str]] = [sa.PrimaryKeyConstraint("key", name=f"pk_{table}")]
    if split_tokens:
        constraints.append(sa.Column("previous_id_hash", sa.String(64), nullable=True))
    else:
        constraints.append(sa.UniqueConstraint("id_hash", name=f"uq_{table}_id_hash"))
    snapshot = sa.Table(
        table,
        sa.MetaData(),
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
        sa.Column("lease_owner", sa.String(32), nullable=True),
        sa.Column("lease_until", sa.BigInteger(), nullable=True),
        *constraints,
    )
    sa.Index(f"ix_{table}_user_id_last_activity", snapshot.c.user_id, snapshot.c.last_activity)
    sa.Index(f"ix_{table}_expires_at", snapshot.c.expires_at)
    return snapshot
