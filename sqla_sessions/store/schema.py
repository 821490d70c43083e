"""The sessions table as SQLAlchemy Core metadata (the migrations create exactly this)."""

from __future__ import annotations

from functools import cache

import sqlalchemy as sa
from sqlalchemy.dialects import mysql

from ..core.records import IP_ADDRESS_LENGTH, USER_AGENT_LENGTH, USER_ID_LENGTH

NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

#: Payloads reach `max_payload_bytes` (256 KiB by default): MySQL's BLOB stops at 64 KiB.
PAYLOAD_TYPE = sa.LargeBinary().with_variant(mysql.LONGBLOB(), "mysql", "mariadb")
#: MySQL compares strings case-insensitively by default; user ids "Bob" and "bob" must differ.
USER_ID_TYPE = sa.String(USER_ID_LENGTH).with_variant(
    mysql.VARCHAR(USER_ID_LENGTH, charset="utf8mb4", collation="utf8mb4_bin"), "mysql", "mariadb"
)


@cache
def sessions_table(name: str = "sessions") -> sa.Table:
    """Return the sessions `Table` called *name*, on its own `MetaData` (one per name, cached)."""
    metadata = sa.MetaData(naming_convention=NAMING_CONVENTION)
    # key: the row's stable key, the first part of the session id `<key>.<secret>`; id_hash: SHA-256 of
    # the secret (compared after the primary-key lookup, never looked up: no index of its own);
    # times are unix seconds in 64-bit integers; expires_at folds idle and absolute expiry together.
    table = sa.Table(
        name,
        metadata,
        sa.Column("key", sa.String(32), primary_key=True),
        sa.Column("id_hash", sa.String(64), nullable=False),
        sa.Column("previous_id_hash", sa.String(64), nullable=True),
        sa.Column("user_id", USER_ID_TYPE, nullable=True),
        sa.Column("ip_address", sa.String(IP_ADDRESS_LENGTH), nullable=True),
        sa.Column("user_agent", sa.String(USER_AGENT_LENGTH), nullable=True),
        sa.Column("payload", PAYLOAD_TYPE, nullable=False),
        sa.Column("version", sa.BigInteger, nullable=False),
        sa.Column("created_at", sa.BigInteger, nullable=False),
        sa.Column("last_activity", sa.BigInteger, nullable=False),
        sa.Column("expires_at", sa.BigInteger, nullable=False),
        # A session's own lifetime in seconds (remember-me, Django's set_expiry); NULL: the config's.
        sa.Column("idle_lifetime", sa.BigInteger, nullable=True),
        sa.Column("absolute_lifetime", sa.BigInteger, nullable=True),
        # Blocking sessions where the database has no row locks (SQLite): who holds the lease, until when
        # (unix milliseconds).
        sa.Column("lease_owner", sa.String(32), nullable=True),
        sa.Column("lease_until", sa.BigInteger, nullable=True),
    )
    sa.Index(None, table.c.user_id, table.c.last_activity)
    sa.Index(None, table.c.expires_at)
    return table
