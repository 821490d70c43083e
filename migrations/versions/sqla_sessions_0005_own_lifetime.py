"""A session's own lifetime: `idle_lifetime` and `absolute_lifetime` (seconds; NULL: the config's).

"Remember me" (`login(user, remember=True)`), `Session.set_lifetime()` and Django's `set_expiry()`
give one session a lifetime of its own. It lives on the row, not in the payload, so a touch (which
reads no payload) slides the expiry by the session's own lifetime, and a long-lived device session
is one row the user can see and revoke.

Revision ID: sqla_sessions_0005
Revises: sqla_sessions_0004
Create Date: 2026-12-02
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import context, op

from sqla_sessions.store.migrate import table_name_for_migrations

revision: str = "sqla_sessions_0005"
down_revision: str | Sequence[str] | None = "sqla_sessions_0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

COLUMNS = ("idle_lifetime", "absolute_lifetime")


def upgrade() -> None:
    """Add the two nullable columns (a catalog change only: no table rewrite, no default to fill in)."""
    table = table_name_for_migrations(context.config.attributes)
    for name in COLUMNS:
        op.add_column(table, sa.Column(name, sa.BigInteger, nullable=True))


def downgrade() -> None:
    """Drop them (sessions fall back to the config's lifetime)."""
    table = table_name_for_migrations(context.config.attributes)
    for name in COLUMNS:
        op.drop_column(table, name)
