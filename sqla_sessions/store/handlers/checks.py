"""`check_table`: the one-line answer to "is the sessions table there, at this version, and ours to write?"."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager

import sqlalchemy as sa
from sqlalchemy.engine import URL, Connection
from sqlalchemy.exc import DBAPIError

from ...errors import StoreMisconfigured, StoreUnavailable, misconfiguration


def check_table(connect: Callable[[], AbstractContextManager[Connection]], table: sa.Table, url: URL) -> None:
    """Raise `StoreMisconfigured` (what to fix, one line) or `StoreUnavailable` (the server cannot be
    reached) unless *table* is there with every column, and the role may read and write it."""
    where = f"table {table.name!r} in {url.render_as_string(hide_password=True)}"
    try:
        with connect() as conn:
            inspector = sa.inspect(conn)
            if not inspector.has_table(table.name):
                raise StoreMisconfigured(f"{where} not found: run `sqla-sessions migrate`")
            columns = {column["name"] for column in inspector.get_columns(table.name)}
            conn.execute(sa.select(table.c.key).limit(0))  # the role may read it
            if conn.dialect.name == "postgresql":  # and write it (the catalog tells, nothing is written)
                # has_table_privilege with a list is true when *any* is held: ask for each.
                name = sa.func.quote_ident(table.name)
                held = [sa.func.has_table_privilege(name, kind) for kind in ("INSERT", "UPDATE", "DELETE")]
                if not all(conn.execute(sa.select(*held)).one()):
                    raise StoreMisconfigured(f"{where}: the role may not insert, update and delete rows")
    except DBAPIError as exc:
        what = misconfiguration(exc)
        reason = str(exc.orig).strip().splitlines()[0] if str(exc.orig).strip() else type(exc.orig).__name__
        if what is not None:
            raise StoreMisconfigured(f"{what} for {where}: {reason}") from exc
        raise StoreUnavailable(f"cannot reach the database for {where}: {reason}") from exc
    missing = sorted(set(table.c.keys()) - columns)
    if missing:
        raise StoreMisconfigured(f"{where} lacks columns {missing} (an older schema): run `sqla-sessions migrate`")
