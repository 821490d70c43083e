"""Engines that sqla_sessions creates itself from a URL, with the settings sessions need."""

from __future__ import annotations

import math
import re
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from sqlalchemy.engine import URL, Engine, make_url
from sqlalchemy.pool import StaticPool

from ...errors import ConfigurationError

if TYPE_CHECKING:
    from ...config import SessionConfig

#: PgBouncer's default port: `prepared_statements="auto"` turns server-side prepared statements off there.
PGBOUNCER_PORT = 6432

#: psycopg's `prepare_threshold` under "auto": it prepares a statement when asked to (`prepare=True`), never by
#: counting its runs (the count is never reached).
ONLY_WHEN_ASKED = 2**31 - 1

#: Seconds a SQLite writer waits for the database write lock before "database is locked".
SQLITE_BUSY_TIMEOUT = 15


def masked_url(url: str) -> str:
    """*url* fit to print: its password replaced by `***`, also when it is not a URL SQLAlchemy reads
    (a scheme forgotten, a broker's URL)."""
    try:
        return sa.make_url(url).render_as_string(hide_password=True)
    except sa.exc.ArgumentError:
        return re.sub(r":[^:@/]*@", ":***@", url)


def normalize_url(url: str | URL) -> URL:
    """Parse *url*; a bare `postgresql://` means psycopg 3 (SQLAlchemy 2.0 would pick psycopg2)."""
    try:
        parsed = make_url(url)
    except sa.exc.ArgumentError as exc:
        raise ConfigurationError("database_url", f"not a database URL: {exc}") from None
    if parsed.drivername in ("postgresql", "postgres"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    return parsed


def prepared_statements_on(url: URL, setting: str) -> bool:
    """Whether server-side prepared statements are used for *url* at first ("auto": not on PgBouncer's
    port; elsewhere until the server refuses one, see `handlers.prepared`)."""
    if setting == "auto":
        port = url.port or url.query.get("port")  # a unix socket names its port in the query
        return str(port) != str(PGBOUNCER_PORT)
    return setting == "on"


def engine_options(url: str | URL, config: SessionConfig) -> dict[str, Any]:
    """`create_engine` arguments for *url* from the config's engine settings (pool, timeouts, prepares)."""
    parsed = normalize_url(url)
    backend = parsed.get_backend_name()
    # Bound parameters are session payloads (and CSRF tokens): never in an error message or a log.
    options: dict[str, Any] = {"hide_parameters": True}
    if not (backend == "sqlite" and parsed.database in (None, "", ":memory:")):  # StaticPool: no sizing
        options.update(
            pool_size=config.pool_size,
            max_overflow=config.max_overflow,
            pool_timeout=config.pool_timeout,
            pool_recycle=config.pool_recycle,
            pool_pre_ping=config.pool_pre_ping,
        )
    connect_args: dict[str, Any] = {}
    if backend == "postgresql":
        connect_args["connect_timeout"] = max(2, math.ceil(config.connect_timeout))  # libpq: whole seconds, >= 2
        # Text travels as UTF-8 whatever the database's default encoding: a user agent or a user id
        # outside the server's charset must not make every save of that browser fail.
        connect_args["client_encoding"] = "utf8"
        # A peer that vanished (a host down, packets dropped) is noticed within seconds, not after the
        # kernel's default of minutes: keepalives while waiting, a bound on unacknowledged data.
        connect_args.update(
            keepalives=1,
            keepalives_idle=10,
            keepalives_interval=5,
            keepalives_count=3,
            tcp_user_timeout=int(1000 * max(10, config.connect_timeout * 2)),
        )
        if config.prepared_statements != "on":
            # psycopg never prepares by itself (its threshold out of reach): under "auto" only the hot
            # statements go prepared, asked for (`handlers.runner`); "off" and PgBouncer's port prepare
            # nothing at all (a threshold of None: psycopg then prepares nothing, even when asked).
            named = prepared_statements_on(parsed, config.prepared_statements)
            connect_args["prepare_threshold"] = ONLY_WHEN_ASKED if named else None
    elif backend in ("mysql", "mariadb"):
        connect_args["connect_timeout"] = max(1, math.ceil(config.connect_timeout))
        if "charset" not in parsed.query:
            connect_args["charset"] = "utf8mb4"
        # A write waits for a row lock another request holds at most write_wait_seconds (InnoDB's
        # default is 50 s, holding a connection and a thread all along); blocking requests set their own.
        # A URL's own init_command is kept instead (one statement only, unless multi-statements are on):
        # then its connections wait as long as the server lets them.
        if "init_command" not in parsed.query:
            connect_args["init_command"] = f"SET SESSION innodb_lock_wait_timeout = {mysql_lock_wait_seconds(config)}"
        # pymysql waits for an answer forever otherwise (also for the server's greeting at connect).
        # The longest legitimate wait is a write queued behind a blocking request's row lock, which its
        # holder gives up at its first save past block_lock_seconds, or the database after that long idle.
        longest_lock_wait = 2 * max(config.block_wait_seconds, config.block_lock_seconds) + 5
        answer_within = math.ceil(config.connect_timeout + longest_lock_wait)
        connect_args.update(read_timeout=answer_within, write_timeout=answer_within)
    if connect_args:
        options["connect_args"] = connect_args
    return options


def create_session_engine(
    url: str | URL, *, autocommit: bool = False, config: SessionConfig | None = None, **kwargs: Any
) -> Engine:
    """Create an engine for *url*: SQLite gets WAL and a busy timeout, `:memory:` one shared database.

    With *autocommit*, every connection is put in autocommit once, when it is opened: the setting
    session handlers want (one statement, one round trip). Setting it per checkout instead
    (`engine.execution_options(isolation_level=…)`) costs a round trip to reset it at every return.
    With *config*, its engine settings apply (pool size, timeouts, prepared statements); explicit
    keyword arguments win.
    """
    parsed = normalize_url(url)
    if config is not None:
        for name, value in engine_options(parsed, config).items():
            if name.startswith("pool_") and name != "pool_pre_ping" or name == "max_overflow":
                if "poolclass" in kwargs:  # a pool class of the caller's (NullPool, …) takes no sizing
                    continue
            if name == "connect_args":
                kwargs["connect_args"] = {**value, **kwargs.get("connect_args", {})}
            else:
                kwargs.setdefault(name, value)
    if autocommit:
        kwargs.setdefault("isolation_level", "AUTOCOMMIT")
    if parsed.get_backend_name() != "sqlite":
        return sa.create_engine(parsed, **kwargs)
    connect_args = dict(kwargs.pop("connect_args", {}))
    connect_args.setdefault("timeout", SQLITE_BUSY_TIMEOUT)
    connect_args.setdefault("check_same_thread", False)
    in_memory = parsed.database in (None, "", ":memory:")
    if in_memory:
        # One connection shared by every thread, or each thread would see its own empty database.
        kwargs.setdefault("poolclass", StaticPool)
    engine = sa.create_engine(parsed, connect_args=connect_args, **kwargs)
    if not in_memory:
        use_wal(engine)
    return engine


def use_wal(engine: Engine) -> None:
    """Put every new SQLite connection of *engine* in WAL mode: readers run beside the one writer."""

    @sa.event.listens_for(engine, "connect")
    def _wal(dbapi_connection: Any, _record: Any) -> None:
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.close()


def mysql_lock_wait_seconds(config: SessionConfig) -> int:
    """`innodb_lock_wait_timeout` for a save's row-lock wait (whole seconds, at least 1)."""
    return max(1, math.ceil(config.write_wait_seconds))
