"""The statements on the sessions table every database shares, built once in SQLAlchemy Core.

Each is built with bound parameters when a handler starts, so it compiles once. A database's own
forms (row locks, batches, GC, sizes) are in `handlers.dialects`.
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa

from ...core.records import Record

#: The row's columns, in the order every SELECT returns them (`record_of`).
COLUMNS = (
    "key",
    "id_hash",
    "user_id",
    "payload",
    "version",
    "created_at",
    "last_activity",
    "expires_at",
    "ip_address",
    "user_agent",
    "previous_id_hash",
    "idle_lifetime",
    "absolute_lifetime",
)

#: The columns a save of changes writes (all but the key it is found by).
WRITABLE = tuple(name for name in COLUMNS if name != "key")


class SessionStatements:
    """The statements of one sessions table (parameters named `b_*` find rows, `v_*` are written)."""

    def __init__(self, table: sa.Table) -> None:
        self.table = t = table
        self.columns = cols = [t.c[name] for name in COLUMNS]
        self.now = now = sa.bindparam("now", type_=sa.BigInteger)
        key = sa.bindparam("b_key", type_=t.c.key.type)
        version = sa.bindparam("b_version", type_=sa.BigInteger)
        self.select_by_key = sa.select(*cols).where(t.c.key == key, t.c.expires_at > now)
        self.select_for_update = sa.select(*cols).where(t.c.key == key).with_for_update()
        # Explicit columns: the lease columns stay NULL, and the compiled SQL names exactly these binds.
        self.insert = sa.insert(t).values({name: sa.bindparam(name, type_=t.c[name].type) for name in COLUMNS})
        writable = {name: sa.bindparam(f"v_{name}", type_=t.c[name].type) for name in WRITABLE}
        self.update = sa.update(t).where(t.c.key == key).values(**writable)
        found = (t.c.key == key, t.c.version == version, t.c.expires_at > now)
        self.compare_and_set = sa.update(t).where(*found).values(**writable)
        self.touch = (
            sa.update(t)
            .where(*found)
            .values(
                last_activity=sa.bindparam("v_last_activity", type_=sa.BigInteger),
                expires_at=sa.bindparam("v_expires_at", type_=sa.BigInteger),
            )
        )
        self.delete = sa.delete(t).where(t.c.key == key)
        user = sa.bindparam("b_user_id", type_=t.c.user_id.type)
        # A device list shows no payload: an empty one is selected in its place (nothing TOASTed is read).
        listed = [sa.literal(b"", sa.LargeBinary).label("payload") if c.name == "payload" else c for c in cols]
        self.select_user = (
            sa.select(*listed).where(t.c.user_id == user, t.c.expires_at > now).order_by(t.c.last_activity.desc())
        )
        self.delete_user = sa.delete(t).where(t.c.user_id == user)
        self.delete_user_except = sa.delete(t).where(t.c.user_id == user, t.c.key != key)

        # Blocking sessions: a row lock (PostgreSQL, MariaDB/MySQL) or a lease (SQLite). The secret's hash
        # is in the WHERE clause so a wrong secret locks nothing; comparing it in SQL leaks no timing worth
        # having: both sides are SHA-256 digests, and the bearer of a guess cannot steer a digest's bytes.
        id_hash = sa.bindparam("b_id_hash", type_=t.c.id_hash.type)
        opened = sa.or_(t.c.id_hash == id_hash, t.c.previous_id_hash == id_hash)
        self.select_opened_for_update = (
            sa.select(*cols).where(t.c.key == key, opened, t.c.expires_at > now).with_for_update()
        )
        self.exists_opened = sa.select(t.c.key).where(t.c.key == key, opened, t.c.expires_at > now)
        # lease_until is in milliseconds: whole seconds would cut a hold short by up to a second.
        free = sa.or_(t.c.lease_until.is_(None), t.c.lease_until <= sa.bindparam("now_ms", type_=sa.BigInteger))
        self.take_lease = (
            sa.update(t)
            .where(t.c.key == key, opened, t.c.expires_at > now, free)
            .values(lease_owner=sa.bindparam("owner"), lease_until=sa.bindparam("until", type_=sa.BigInteger))
            .returning(*cols)
        )
        self.drop_lease = (
            sa.update(t)
            .where(t.c.key == key, t.c.lease_owner == sa.bindparam("owner"))
            .values(lease_owner=None, lease_until=None)
        )
        live = t.c.expires_at > now
        self.counts: sa.Select[Any] = sa.select(  # type: ignore[assignment]
            sa.func.count().filter(live),
            sa.func.count().filter(sa.not_(live)),
            sa.func.count(sa.distinct(t.c.user_id)).filter(live),
        )

    def unless_locked(self, update: sa.Update) -> sa.Update:
        """*update* (of one row by `b_key`) that skips the row when another transaction holds it,
        instead of waiting for its lock (PostgreSQL: `FOR UPDATE SKIP LOCKED` in a subquery)."""
        t = self.table
        key = sa.bindparam("b_key", type_=t.c.key.type)
        unlocked = sa.select(t.c.key).where(t.c.key == key).with_for_update(skip_locked=True).scalar_subquery()
        return update.where(t.c.key == unlocked)

    def select_by_keys(self, count: int) -> sa.Select[Any]:
        """The live rows of *count* keys (`b_key_0`…): an IN list of its own per count, compiled once each."""
        t = self.table
        keys = [sa.bindparam(f"b_key_{i}", type_=t.c.key.type) for i in range(count)]
        return sa.select(*self.columns).where(t.c.key.in_(keys), t.c.expires_at > self.now)


def row_values(record: Record) -> dict[str, Any]:
    """The parameters of `SessionStatements.insert`."""
    return {name: getattr(record, name) for name in COLUMNS}


def write_values(record: Record) -> dict[str, Any]:
    """The parameters of `SessionStatements.update` (and, with `b_version` and `now`, of `compare_and_set`)."""
    return {  # spelled out: a save builds this once per request
        "b_key": record.key,
        "v_id_hash": record.id_hash,
        "v_user_id": record.user_id,
        "v_payload": record.payload,
        "v_version": record.version,
        "v_created_at": record.created_at,
        "v_last_activity": record.last_activity,
        "v_expires_at": record.expires_at,
        "v_ip_address": record.ip_address,
        "v_user_agent": record.user_agent,
        "v_previous_id_hash": record.previous_id_hash,
        "v_idle_lifetime": record.idle_lifetime,
        "v_absolute_lifetime": record.absolute_lifetime,
    }


def record_of(row: Any) -> Record:
    """The `Record` of a row selected in `COLUMNS` order."""
    payload = row[3]
    return Record(
        key=row[0],
        id_hash=row[1],
        user_id=row[2],
        payload=payload if isinstance(payload, bytes) else bytes(payload),
        version=row[4],
        created_at=row[5],
        last_activity=row[6],
        expires_at=row[7],
        ip_address=row[8],
        user_agent=row[9],
        previous_id_hash=row[10],
        idle_lifetime=row[11],
        absolute_lifetime=row[12],
    )
