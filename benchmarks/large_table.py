"""Ten million sessions on PostgreSQL: latency against a small table, GC under load, device listing, HOT updates.

    python benchmarks/large_table.py [--url postgresql+psycopg://postgres@127.0.0.1:5432/postgres]
        [--rows 10000000] [--small 10000] [--expired 1000000] [--keep] [--fill-only]
        [--gc-batch N] [--gc-pause SECONDS] [--fillfactors 100,90,80,70] [--hot-only]

Issue 13 item 4. Two throwaway databases, `sqla_sessions_bench_large` (--rows live sessions plus
--expired expired ones scattered among them) and `sqla_sessions_bench_small` (--small live sessions),
prefix set by `--databases`, are migrated with the library's own migrations and bulk-filled
server-side (`INSERT … SELECT … generate_series`) with the payload bytes of a real saved session.
Then, through the public API (`DatabaseHandler`, `Session`), on --live sessions per table created
through that API (their cookie ids are only ever taken from `session.id`), it prints four tables:

1. load p50/p99 and save p99 on both tables, interleaved in the same run, and the ratio large/small
   (target: within 1.5x);
2. `handler.gc()` of the expired rows in a background thread while the same load runs: load p99
   during GC vs without (target: within 2x), the sweep's duration and rows/s;
3. the statement `list_sessions()` issues, captured on the wire and EXPLAINed (ANALYZE) on the large
   table, custom and generic plan: it must be an index scan on the user index, or the script exits 1;
4. HOT updates (`n_tup_hot_upd / n_tup_upd`) per fillfactor for payload writes, activity touches and
   a mixed request stream, on fresh tables of 100k rows driven by a simulated clock (a run that saw a
   long transaction elsewhere in the cluster, which stops page pruning, is repeated).

Filling 10M rows takes minutes: `--fill-only --keep` fills and exits; later runs reuse databases
whose contents match (topping the expired rows up again after a GC) and drop them at the end
unless `--keep` is given. Measured runs should hold `flock /tmp/bench.lock` (other benchmarks share
the two cores).
"""

from __future__ import annotations

import argparse
import random
import re
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from functools import partial
from typing import Any

import sqlalchemy as sa
from alembic.script import ScriptDirectory
from sqlalchemy.engine import URL, Connection, Engine

from sqla_sessions import DatabaseHandler, SaveAction, Session, SessionConfig, upgrade
from sqla_sessions.store.handlers.engines import create_session_engine
from sqla_sessions.store.migrate import alembic_config, version_table_for
from sqla_sessions.store.schema import sessions_table

TABLE = "sessions"
META = "bench_large_table_meta"
#: "Remember me" sessions: filler rows stay live for 29+ days, so databases kept with --keep stay valid.
LIFETIME_MINUTES = 30 * 24 * 60
FILL_CHUNK = 1_000_000
USER_AGENTS = (
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/131.0.0.0 Safari/537.36",
    "Mozilla/5.0 (iPhone; CPU iPhone OS 18_1 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/18.1 "
    "Mobile/15E148 Safari/604.1",
    "Mozilla/5.0 (X11; Linux x86_64; rv:133.0) Gecko/20100101 Firefox/133.0",
)


def realistic_data(n: int) -> dict[str, Any]:
    """What a shop's session holds: a CSRF token, a small cart, preferences, recent pages (~200 bytes stored)."""
    return {
        "_token": f"{n:040d}",
        "cart": [{"sku": "BOOT-4411", "qty": 1}, {"sku": "SOCK-0032", "qty": 3}],
        "locale": "en-GB",
        "tz": "Europe/Berlin",
        "recent": ["/products/4411", "/search?q=boots"],
        "seen_at": datetime(2026, 11, 30, 12, 0, tzinfo=UTC),
        "total": Decimal("89.90"),
    }


# -- statistics ------------------------------------------------------------------------------------


def pct(values: Sequence[float], q: float) -> float:
    """The q-quantile (nearest rank) of *values*, in milliseconds when the values are seconds."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))] * 1000


@dataclass
class Latencies:
    loads: list[float] = field(default_factory=list)
    saves: list[float] = field(default_factory=list)
    """Saves of a changed session: the compare-and-set UPDATE."""
    misses: int = 0
    """Loads of a live cookie that came back as a new session: a broken benchmark, never acceptable."""


# -- databases -------------------------------------------------------------------------------------


def database_url(url: str, name: str) -> URL:
    return sa.make_url(url).set(database=name)


def database_exists(admin: Engine, name: str) -> bool:
    with admin.connect() as conn:
        return conn.execute(sa.text("SELECT 1 FROM pg_database WHERE datname = :n"), {"n": name}).first() is not None


def drop_database(admin: Engine, name: str) -> None:
    with admin.connect() as conn:
        conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def column_expressions(rows: int) -> dict[str, str]:
    """SQL per column for series number `i` (live: `la` is its last activity; `dead`: expired row).

    Keys and id hashes are distinct hex digests of the series number; 30 % of rows belong to a user,
    about four devices per user, spread over the whole table as they would be over time.
    """
    users = max(1, rows * 3 // 40)
    return {
        "key": "md5('k' || i || :salt)",
        "id_hash": "encode(sha256(('i' || i || :salt)::bytea), 'hex')",
        "user_id": f"CASE WHEN i % 10 < 3 THEN 'user-' || (((i / 10) * 3 + i % 10) % {users}) END",
        "ip_address": "'10.' || (i >> 16) % 256 || '.' || (i >> 8) % 256 || '.' || i % 256",
        "user_agent": "(CAST(:ua AS text[]))[1 + i % 3]",
        "payload": ":payload",
        "version": "1 + i % 20",
        "created_at": "la - i % 2592000",
        "last_activity": "la",
        "expires_at": "la + CAST(:lifetime AS bigint)",
    }


def fill_columns(conn: Connection, rows: int, table: str = TABLE) -> tuple[str, str]:
    """The column list and SELECT list for the filler INSERT, from the table as migrated.

    Built from the live schema (not a hard-coded list), so a migration that adds a nullable column
    still fills; a new NOT NULL column without a default stops here with its name.
    """
    expressions = column_expressions(rows)
    columns = conn.execute(
        sa.text(
            "SELECT column_name, is_nullable, column_default FROM information_schema.columns "
            "WHERE table_schema = current_schema() AND table_name = :t ORDER BY ordinal_position"
        ),
        {"t": table},
    ).all()
    names = []
    for name, nullable, default in columns:
        if name in expressions:
            names.append(name)
        elif nullable == "NO" and default is None:
            raise SystemExit(f"large_table.py does not know how to fill the NOT NULL column {name!r}")
    return ", ".join(names), ", ".join(expressions[n] for n in names)


def insert_rows(
    conn: Connection,
    lo: int,
    hi: int,
    *,
    rows: int,
    stride: int,
    payload: bytes,
    salt: str,
    table: str = TABLE,
    columns: tuple[str, str] | None = None,
) -> None:
    """Insert series numbers lo..hi: every *stride*-th row expired within the last week, the rest live."""
    names, values = columns or fill_columns(conn, rows, table)
    # Live rows were last active within the past day (expiring in 29-30 days); expired ones expired
    # within the past week. Both are scattered: GC then deletes from pages all over the heap.
    expired = f"i % {stride} = 0" if stride else "false"
    conn.execute(
        sa.text(
            f"INSERT INTO {table} ({names}) SELECT {values} "
            "FROM generate_series(CAST(:lo AS bigint), CAST(:hi AS bigint)) AS i, "
            f"LATERAL (SELECT CASE WHEN {expired} THEN CAST(:now AS bigint) - :lifetime - 1 - i % 604800 "
            f"ELSE CAST(:now AS bigint) - (i * 7919) % 86400 END AS la) AS t"
        ),
        {
            "lo": lo,
            "hi": hi,
            "now": int(time.time()),
            "lifetime": LIFETIME_MINUTES * 60,
            "payload": payload,
            "ua": list(USER_AGENTS),
            "salt": salt,
        },
    )


def drop_indexes(conn: Connection) -> list[str]:
    """Drop the table's indexes and constraints; return the DDL recreating them exactly as migrated.

    Bulk loading into a table without indexes and building them afterwards (a sort) is several times
    faster than 10M random insertions into four B-trees through 128 MB of shared buffers.
    """
    oid = {"t": TABLE}
    constraints = conn.execute(
        sa.text(
            "SELECT conname, pg_get_constraintdef(oid) FROM pg_constraint "
            "WHERE conrelid = CAST(:t AS regclass) AND contype IN ('p', 'u')"
        ),
        oid,
    ).all()
    indexes = conn.execute(
        sa.text(
            "SELECT i.relname, pg_get_indexdef(i.oid) FROM pg_index x JOIN pg_class i ON i.oid = x.indexrelid "
            "WHERE x.indrelid = CAST(:t AS regclass) "
            "AND NOT EXISTS (SELECT 1 FROM pg_constraint c WHERE c.conindid = i.oid)"
        ),
        oid,
    ).all()
    for name, _ in constraints:
        conn.exec_driver_sql(f'ALTER TABLE {TABLE} DROP CONSTRAINT "{name}"')
    for name, _ in indexes:
        conn.exec_driver_sql(f'DROP INDEX "{name}"')
    return [ddl for _, ddl in indexes] + [f'ALTER TABLE {TABLE} ADD CONSTRAINT "{n}" {d}' for n, d in constraints]


def sample_payload(url: URL) -> bytes:
    """Save a real session through the library and return its stored bytes (the codec's format)."""
    config = SessionConfig(database_url=url.render_as_string(hide_password=False), lifetime=LIFETIME_MINUTES)
    handler = DatabaseHandler(create_session_engine(url, autocommit=True, config=config, pool_size=1), config)
    try:
        session = handler.load(None)
        session.put(realistic_data(0))
        session.save()
        with handler.engine.connect() as conn:
            payload = conn.execute(sa.select(handler.table.c.payload).where(handler.table.c.key == session.key))
            data = bytes(payload.scalar_one())
        handler.destroy(session.key or "")
        return data
    finally:
        handler.engine.dispose()


def head_revision() -> str | None:
    return ScriptDirectory.from_config(alembic_config()).get_current_head()


def step(engine: Engine, action: Callable[[Connection], object], attempts: int = 10) -> None:
    """Run one atomic fill step, again on a new connection if the server went away meanwhile."""
    for attempt in range(1, attempts + 1):
        try:
            with engine.connect() as conn:
                conn.exec_driver_sql("SET maintenance_work_mem = '1GB'")  # index builds sort in memory
                conn.exec_driver_sql("SET max_parallel_maintenance_workers = 2")
                action(conn)
                return
        except sa.exc.OperationalError as exc:
            if attempt == attempts:
                raise
            print(f"  retrying after: {str(exc.orig).strip().splitlines()[0]}", flush=True)
            time.sleep(10)


def prepare_database(admin: Engine, url: str, name: str, rows: int, expired: int) -> URL:
    """Create, migrate and fill database *name* (or reuse it when it holds the same fill)."""
    db = database_url(url, name)
    engine = create_session_engine(db, autocommit=True)
    try:
        if database_exists(admin, name):
            with engine.connect() as conn:
                filled = sa.inspect(conn).has_table(META)
                meta = conn.execute(sa.text(f"SELECT rows, expired FROM {META}")).first() if filled else None
                revision = conn.execute(sa.text(f"SELECT version_num FROM {version_table_for(TABLE)}")).scalar()
                columns = {c["name"] for c in sa.inspect(conn).get_columns(TABLE)}
            # A fill made before a new (or edited) migration is not the schema the library expects now.
            current = revision == head_revision() and columns == {c.name for c in sessions_table(TABLE).columns}
            if meta is not None and tuple(meta) == (rows, expired) and current:
                top_up_expired(engine, expired)
                return db
            print(f"{name}: exists with another fill; recreating", flush=True)
            engine.dispose()
            drop_database(admin, name)
        with admin.connect() as conn:
            conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
        upgrade(engine, table=TABLE)
        payload = sample_payload(db)
        total = rows + expired
        stride = total // expired if expired else 0
        started = time.perf_counter()
        with engine.connect() as conn:
            recreate = drop_indexes(conn)
        # Each step is atomic and retried on a fresh connection: the project's fault tests restart the
        # PostgreSQL cluster, and a 10M-row fill should not start over for that.
        for lo in range(1, total + 1, FILL_CHUNK):
            hi = min(total, lo + FILL_CHUNK - 1)
            step(engine, partial(insert_rows, lo=lo, hi=hi, rows=rows, stride=stride, payload=payload, salt=""))
            print(f"{name}: {hi:,}/{total:,} rows, {time.perf_counter() - started:.0f} s", flush=True)
        loaded = time.perf_counter()
        for ddl in recreate:
            step(engine, partial(Connection.exec_driver_sql, statement=ddl))
        indexed = time.perf_counter()
        step(engine, lambda c: c.exec_driver_sql(f"VACUUM (ANALYZE) {TABLE}"))
        with engine.connect() as conn:
            conn.exec_driver_sql(f"CREATE TABLE {META} (rows bigint, expired bigint, payload_bytes int)")
            conn.execute(
                sa.text(f"INSERT INTO {META} VALUES (:r, :e, :p)"), {"r": rows, "e": expired, "p": len(payload)}
            )
            size = conn.execute(sa.text("SELECT pg_total_relation_size(:t)"), {"t": TABLE}).scalar_one()
        done = time.perf_counter()
        print(
            f"{name}: filled {total:,} rows ({len(payload)}-byte payloads) in {done - started:.0f} s: "
            f"insert {loaded - started:.0f} s, indexes {indexed - loaded:.0f} s, vacuum {done - indexed:.0f} s; "
            f"{size / 2**30:.2f} GiB with indexes",
            flush=True,
        )
        return db
    finally:
        engine.dispose()


def top_up_expired(engine: Engine, expired: int) -> None:
    """A reused database whose expired rows a previous run's GC swept gets them back (into the freed space)."""
    # Dead tuples of the previous run (its GC, its writes) go first, so the new rows fill the holes.
    step(engine, partial(Connection.exec_driver_sql, statement=f"VACUUM (ANALYZE) {TABLE}"))
    with engine.connect() as conn:
        now = int(time.time())
        have = conn.execute(sa.text(f"SELECT count(*) FROM {TABLE} WHERE expires_at <= :now"), {"now": now}).scalar()
        payload = bytes(conn.execute(sa.text(f"SELECT payload FROM {TABLE} LIMIT 1")).scalar_one())
    missing = expired - int(have or 0)
    if missing <= 0:
        return
    started = time.perf_counter()
    # A fresh salt keeps keys and id hashes distinct from every earlier fill; stride 1: all expired.
    # Chunks of 100k: a restart of the server (the fault tests do that) costs one chunk, not the lot.
    for lo in range(1, missing + 1, 100_000):
        hi = min(missing, lo + 99_999)
        step(engine, partial(insert_rows, lo=lo, hi=hi, rows=missing, stride=1, payload=payload, salt=f"-{now}"))
    step(engine, partial(Connection.exec_driver_sql, statement=f"VACUUM (ANALYZE) {TABLE}"))
    print(f"topped up {missing:,} expired rows in {time.perf_counter() - started:.0f} s", flush=True)


# -- the workload, through the library ---------------------------------------------------------------


def make_handler(
    db: URL, *, table: str = TABLE, clock: Callable[[], float] = time.time, pool: int = 2
) -> DatabaseHandler:
    config = SessionConfig(
        database_url=db.render_as_string(hide_password=False), table=table, lifetime=LIFETIME_MINUTES
    )
    engine = create_session_engine(db, autocommit=True, config=config, pool_size=pool)
    return DatabaseHandler(engine, config, clock=clock)


def create_live(handler: DatabaseHandler, count: int) -> list[Session]:
    """Create *count* sessions as requests would (30 % logged in, three devices per user); keep the objects.

    The cookie value is `session.id` after the save: never built by hand, whatever its format.
    """
    created = []
    users = max(1, count * 3 // 10 // 3)
    for n in range(count):
        session = handler.load(None)
        session.put(realistic_data(n))
        session.ip_address = f"192.0.2.{n % 250}"
        session.user_agent = USER_AGENTS[n % 3]
        if n % 10 < 3:
            session.login(f"live-user-{n % users}")
        session.save()
        created.append(session)
    return created


def request(handler: DatabaseHandler, cookie: str, *, write: bool, into: Latencies | None) -> SaveAction:
    """One request: load by cookie, change the session (a write) or not (read-only), save at its end."""
    started = time.perf_counter()
    session = handler.load(cookie)
    loaded = time.perf_counter()
    if session.is_new and into is not None:
        into.misses += 1
    if write:
        session["visits"] = session.get("visits", 0) + 1
    saving = time.perf_counter()
    action = session.save()
    if into is not None:
        into.loads.append(loaded - started)
        if write:
            into.saves.append(time.perf_counter() - saving)
    return action


def measure(
    handlers: dict[str, DatabaseHandler], cookies: dict[str, list[str]], ops: int, rng: random.Random
) -> dict[str, Latencies]:
    """*ops* requests per table (one in four writes), in rounds of 100 alternating between the tables,
    so that the noise of a shared machine lands on both alike."""
    results = {name: Latencies() for name in handlers}
    order = list(handlers)
    for round_ in range(ops // 100):
        for name in order if round_ % 2 else reversed(order):
            for _ in range(100):
                request(handlers[name], rng.choice(cookies[name]), write=rng.random() < 0.25, into=results[name])
    return results


def load_for(handler: DatabaseHandler, cookies: list[str], seconds: float, rng: random.Random) -> Latencies:
    result = Latencies()
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        request(handler, rng.choice(cookies), write=rng.random() < 0.25, into=result)
    return result


@dataclass
class Sweep:
    rows: int = 0
    seconds: float = 0.0
    batches: list[tuple[float, int]] = field(default_factory=list)
    """(seconds, rows) of each batch."""
    error: BaseException | None = None
    wal_bytes: int = 0
    """WAL written meanwhile (the load's too, a small part): deleting scattered rows dirties a page per row."""
    checkpoints: int = 0


def wal_position(engine: Engine) -> tuple[int, int]:
    """Bytes of WAL written so far, and checkpoints requested so far (cluster-wide)."""
    with engine.connect() as conn:
        lsn, checkpoints = conn.execute(
            sa.text(
                "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), '0/0'), checkpoints_req + checkpoints_timed "
                "FROM pg_stat_bgwriter"
            )
        ).one()
    return int(lsn), int(checkpoints)


def gc_under_load(
    db: URL,
    handler: DatabaseHandler,
    cookies: list[str],
    quiet_seconds: float,
    rng: random.Random,
    batch: int | None,
    pause: float,
    gc_seconds: float | None = None,
) -> tuple[Latencies, Latencies, Sweep, int]:
    """Load p99 without GC (before and after the sweep, pooled: a disturbance in one does not make
    the ratio), then with `handler.gc()` sweeping in a thread (its own handler and pool), for at most
    *gc_seconds* (None: until no expired row is left)."""
    quiet = load_for(handler, cookies, quiet_seconds / 2, rng)
    sweeper = make_handler(db, pool=1)
    sweep = Sweep()
    wal_before = wal_position(sweeper.engine)

    def run() -> None:
        started = last = time.perf_counter()

        def batch_done(rows: int) -> None:
            nonlocal last
            now = time.perf_counter()
            # A batch's time excludes the pause before it (gc() sleeps between batches, after this call).
            sweep.batches.append((now - last - (pause if sweep.batches else 0), rows))
            sweep.rows += rows
            last = now
            if gc_seconds is not None and now - started >= gc_seconds:
                raise _EnoughSweeping

        try:
            # Paced or not, through the public API: `gc(pause=...)` sleeps between batches, so the
            # sweep's WAL and page writes stay a bounded share of the machine.
            sweeper.gc(batch, on_batch=batch_done, pause=pause)
        except _EnoughSweeping:
            pass
        except BaseException as exc:  # reported by the main thread
            sweep.error = exc
        sweep.seconds = time.perf_counter() - started

    thread = threading.Thread(target=run, name="gc")
    thread.start()
    during = Latencies()
    while thread.is_alive():
        request(handler, rng.choice(cookies), write=rng.random() < 0.25, into=during)
    thread.join()
    wal_after = wal_position(sweeper.engine)
    sweep.wal_bytes = wal_after[0] - wal_before[0]
    sweep.checkpoints = wal_after[1] - wal_before[1]
    sweeper.engine.dispose()
    if sweep.error is not None:
        raise sweep.error
    after = load_for(handler, cookies, quiet_seconds / 2, rng)
    quiet.loads.extend(after.loads)
    quiet.saves.extend(after.saves)
    quiet.misses += after.misses
    return quiet, during, sweep, batch or sweeper.config.gc_batch_size


class _EnoughSweeping(Exception):
    """Ends a sweep bounded by --gc-seconds (raised from its on_batch callback)."""


# -- device listing ------------------------------------------------------------------------------------


def device_listing_plan(db: URL, user_id: str) -> tuple[str, list[str], list[str], int]:
    """EXPLAIN ANALYZE the statement `list_sessions()` sends, as it sends it (custom plan), and its
    generic plan (psycopg prepares a statement after 5 runs; PostgreSQL may then plan it generically)."""
    handler = make_handler(db, pool=1)
    captured: list[tuple[str, Any]] = []

    # A listener on this engine only: it sends every statement through Connection.execute, which is
    # where list_sessions() runs anyway (the per-request fast path stays on the measured handlers).
    @sa.event.listens_for(handler.engine, "before_cursor_execute")
    def capture(conn: Any, cursor: Any, statement: str, parameters: Any, context: Any, executemany: bool) -> None:
        captured.append((statement, parameters))

    try:
        devices = handler.list_sessions(user_id)
        statement, parameters = next((s, p) for s, p in captured if "user_id" in s and s.lstrip().startswith("SELECT"))
        with handler.engine.connect() as conn:
            custom = [r[0] for r in conn.exec_driver_sql("EXPLAIN (ANALYZE, BUFFERS) " + statement, parameters)]
            # The generic plan: a prepared statement with $n placeholders, planned without the values.
            names: list[str] = []

            def number(match: re.Match[str]) -> str:
                names.append(match.group(1))
                return f"${len(names)}"

            prepared = re.sub(r"%\((\w+)\)s", number, statement)
            driver = conn.connection.driver_connection
            assert driver is not None
            from psycopg import sql

            args = ", ".join(sql.Literal(parameters[n]).as_string(driver) for n in names)
            conn.exec_driver_sql("SET plan_cache_mode = force_generic_plan")
            conn.exec_driver_sql(f"PREPARE sqla_devices AS {prepared}")
            generic = [r[0] for r in conn.exec_driver_sql(f"EXPLAIN (ANALYZE) EXECUTE sqla_devices({args})")]
            conn.exec_driver_sql("DEALLOCATE sqla_devices")
            conn.exec_driver_sql("RESET plan_cache_mode")
        return statement, custom, generic, len(devices)
    finally:
        handler.engine.dispose()


def user_index(db: URL) -> str:
    engine = create_session_engine(db)
    try:
        with engine.connect() as conn:
            names = (
                conn.execute(
                    sa.text("SELECT indexname FROM pg_indexes WHERE tablename = :t AND indexdef LIKE '%(user_id%'"),
                    {"t": TABLE},
                )
                .scalars()
                .all()
            )
        return names[0] if names else "(none)"
    finally:
        engine.dispose()


def index_bound(plan: Sequence[str], index: str) -> bool:
    """No sequential scan, and the rows come through the user index (a plain, backward or bitmap index scan)."""
    text = "\n".join(plan)
    scan = rf"(Index (Only )?Scan( Backward)? using|Bitmap Index Scan on) {index}\b"
    return "Seq Scan" not in text and re.search(scan, text) is not None


# -- HOT updates -----------------------------------------------------------------------------------------


def oldest_transaction(engine: Engine) -> float:
    """Age in seconds of the oldest other open transaction holding a snapshot, in any database.

    While one is open, page pruning cannot reclaim the old versions it might still see, so HOT
    updates run out of room on the page: the HOT figures are only valid without such a transaction.
    """
    with engine.connect() as conn:
        age = conn.execute(
            sa.text(
                "SELECT coalesce(max(extract(epoch FROM now() - xact_start)), 0) FROM pg_stat_activity "
                "WHERE pid <> pg_backend_pid() AND backend_xmin IS NOT NULL"
            )
        ).scalar()
    return float(age or 0)


def wait_for_quiet(engine: Engine, seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while oldest_transaction(engine) >= 1 and time.monotonic() < deadline:
        time.sleep(1)


class Clock:
    """A simulated clock: touches fall due when the workload says so, not when the wall clock does."""

    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


def hot_run(small: URL, fillfactor: int, workload: str, rows: int, live: int, ops: int) -> dict[str, float]:
    """HOT ratio of one workload on a fresh table of *rows* sessions at *fillfactor*."""
    table = f"hot_{fillfactor}_{workload}"
    admin = create_session_engine(small, autocommit=True)
    clock = Clock()
    handler: DatabaseHandler | None = None
    try:
        with admin.connect() as conn:  # left over by an interrupted run
            conn.exec_driver_sql(f"DROP TABLE IF EXISTS {table}")
            conn.exec_driver_sql(f"DROP TABLE IF EXISTS {version_table_for(table)}")
        upgrade(admin, table=table)
        with admin.connect() as conn:
            # Before the fill: fillfactor only applies to pages filled after it is set.
            conn.exec_driver_sql(f"ALTER TABLE {table} SET (fillfactor = {fillfactor}, autovacuum_enabled = off)")
            payload = bytes(conn.execute(sa.text(f"SELECT payload FROM {TABLE} LIMIT 1")).scalar_one())
            insert_rows(conn, 1, rows, rows=rows, stride=0, payload=payload, salt="", table=table)
            # The live sessions land together on pages of their own at the end of the heap, filled to the
            # fillfactor, as the sessions created lately do in production (the ones being written).
            handler = make_handler(small, table=table, clock=clock)
            sessions = create_live(handler, live)
            cookies = [s.id for s in sessions]
            conn.exec_driver_sql(f"VACUUM (ANALYZE) {table}")
            heap = conn.execute(sa.text("SELECT pg_relation_size(:t)"), {"t": table}).scalar_one()
        rng = random.Random(fillfactor)
        interval = handler.config.touch_interval
        oldest = 0.0
        actions: dict[SaveAction, int] = {}
        if workload == "first":
            ops = live  # one write per session: the first update of rows on freshly filled pages
            # In random order: rows of one page updated back to back (creation order) would find the
            # previous update's old version still visible to some snapshot, not yet prunable.
            rng.shuffle(cookies)
        for n in range(ops):
            if workload in ("writes", "first"):
                # Payload changes within touch_interval of the last recorded activity: no indexed column moves.
                clock.now += 0.001
                write = True
            elif workload == "touches":
                # Read-only requests, each one past touch_interval: last_activity and expires_at move.
                if n % live == 0:
                    clock.now += interval
                write = False
            else:
                # A request stream: each session is hit every 30 s on average, one request in four writes.
                clock.now += 30 / live
                write = rng.random() < 0.25
            cookie = cookies[n % live] if workload in ("touches", "first") else rng.choice(cookies)
            action = request(handler, cookie, write=write, into=None)
            actions[action] = actions.get(action, 0) + 1
            if n % 100 == 0:
                oldest = max(oldest, oldest_transaction(admin))
        handler.engine.dispose()  # the backends exit and flush their table statistics
        handler = None
        updates = sum(actions.get(a, 0) for a in (SaveAction.UPDATED, SaveAction.TOUCHED, SaveAction.MERGED))
        deadline = time.monotonic() + 15
        with admin.connect() as conn:
            while True:
                upd, hot = conn.execute(
                    sa.text("SELECT n_tup_upd, n_tup_hot_upd FROM pg_stat_user_tables WHERE relname = :t"),
                    {"t": table},
                ).one()
                if upd >= updates or time.monotonic() > deadline:
                    break
                time.sleep(0.5)
        return {
            "updates": float(upd),
            "hot": float(hot),
            "ratio": hot / upd if upd else float("nan"),
            "touched": float(actions.get(SaveAction.TOUCHED, 0)),
            "heap_mb": heap / 2**20,
            "oldest_xact": oldest,
        }
    finally:
        if handler is not None:
            handler.engine.dispose()
        with admin.connect() as conn:
            conn.exec_driver_sql(f"DROP TABLE IF EXISTS {table}")
            conn.exec_driver_sql(f"DROP TABLE IF EXISTS {version_table_for(table)}")
        admin.dispose()


def print_hot(args: argparse.Namespace, admin: Engine, small: URL) -> None:
    """The HOT table: every workload on a fresh table per fillfactor."""
    print(f"\n== HOT updates (n_tup_hot_upd / n_tup_upd), {args.hot_rows:,} rows, {args.live:,} live, "
          f"{args.hot_ops:,} requests, no vacuum during the run ==")  # fmt: skip
    columns = ("heap MB", "1st write", "writes", "touches", "mixed", "(touches)", "xact s")
    print(f"{'fillfactor':>10} " + " ".join(f"{c:>9}" for c in columns))
    for fillfactor in (int(f) for f in args.fillfactors.split(",") if f):
        figures = {}
        for workload in ("first", "writes", "touches", "mixed"):
            for _ in range(3):  # a long transaction elsewhere (the test suite) spoils a run: wait, run again
                wait_for_quiet(admin)
                figures[workload] = hot_run(small, fillfactor, workload, args.hot_rows, args.live, args.hot_ops)
                if figures[workload]["oldest_xact"] < 2:
                    break
        mixed = figures["mixed"]
        print(
            f"{fillfactor:>10} {figures['writes']['heap_mb']:>9.1f} {figures['first']['ratio']:>9.2f} "
            f"{figures['writes']['ratio']:>9.2f} {figures['touches']['ratio']:>9.2f} {mixed['ratio']:>9.2f} "
            f"{mixed['touched'] / max(1.0, mixed['updates']):>9.0%} "
            f"{max(f['oldest_xact'] for f in figures.values()):>9.0f}"
        )
    print(
        f"1st write: one payload write per session; writes: {args.hot_ops / args.live:.0f} per session within "
        "touch_interval; touches: activity only (last_activity and expires_at, both indexed); mixed: each "
        "session hit every 30 s, 1 in 4 writes; (touches): share of the mixed updates that moved the activity; "
        "xact s: oldest other open transaction seen meanwhile (one of more than a few seconds, in any database, "
        "stops page pruning and lowers every HOT figure)"
    )


# -- main ---------------------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="postgresql+psycopg://postgres@127.0.0.1:5432/postgres")
    parser.add_argument("--rows", type=int, default=10_000_000, help="live rows of the large table")
    parser.add_argument("--small", type=int, default=10_000, help="live rows of the small table")
    parser.add_argument("--expired", type=int, default=1_000_000, help="expired rows among the large table's")
    parser.add_argument("--live", type=int, default=2_000, help="sessions created through the API per table")
    parser.add_argument("--ops", type=int, default=20_000, help="requests per table for the latency figures")
    parser.add_argument("--quiet-seconds", type=float, default=15, help="load without GC, before the sweep")
    parser.add_argument("--gc-batch", type=int, default=None, help="batch size for gc() (default: the config's)")
    parser.add_argument("--gc-pause", type=float, default=0, help="seconds between batches: a paced sweep")
    parser.add_argument(
        "--gc-seconds", type=float, default=None, help="stop the sweep after this long (default: when done)"
    )
    parser.add_argument("--hot-rows", type=int, default=100_000)
    parser.add_argument("--hot-ops", type=int, default=10_000)
    parser.add_argument("--fillfactors", default="100,90,80,70", help="HOT runs ('': none)")
    parser.add_argument("--hot-only", action="store_true", help="only the HOT runs (small database only)")
    parser.add_argument("--databases", default="sqla_sessions_bench", help="prefix of the two databases' names")
    parser.add_argument("--keep", action="store_true", help="keep the databases for the next run")
    parser.add_argument("--fill-only", action="store_true", help="fill (implies --keep) and exit")
    args = parser.parse_args()
    rng = random.Random(13)
    small_db, large_db = f"{args.databases}_small", f"{args.databases}_large"
    admin = sa.create_engine(args.url, isolation_level="AUTOCOMMIT")
    keep = args.keep or args.fill_only
    handlers: dict[str, DatabaseHandler] = {}
    live: dict[str, list[Session]] = {}
    failed = False
    try:
        small = prepare_database(admin, args.url, small_db, args.small, 0)
        if args.hot_only:
            print_hot(args, admin, small)
            return 0
        large = prepare_database(admin, args.url, large_db, args.rows, args.expired)
        if args.fill_only:
            return 0
        names = {"small": small, "large": large}
        for name, db in names.items():
            handlers[name] = make_handler(db)
            live[name] = create_live(handlers[name], args.live)
        cookies = {name: [s.id for s in sessions] for name, sessions in live.items()}
        for name in handlers:  # warm the pool, the prepared statements and the live rows' pages
            for cookie in cookies[name]:
                request(handlers[name], cookie, write=False, into=None)

        results = measure(handlers, cookies, args.ops, rng)
        s, g = results["small"], results["large"]
        print(
            f"\n== {args.rows:,} live rows vs {args.small:,}: {args.ops:,} requests each, 1 in 4 writes, interleaved =="
        )
        print(f"{'':<14} {f'{args.small:,}':>10} {f'{args.rows:,}':>12} {'ratio':>7}  target")
        for label, a, b, target in (
            ("load p50 ms", pct(s.loads, 0.5), pct(g.loads, 0.5), ""),
            ("load p99 ms", pct(s.loads, 0.99), pct(g.loads, 0.99), "<= 1.5"),
            ("save p50 ms", pct(s.saves, 0.5), pct(g.saves, 0.5), ""),
            ("save p99 ms", pct(s.saves, 0.99), pct(g.saves, 0.99), "<= 1.5"),
        ):
            print(f"{label:<14} {a:>10.3f} {b:>12.3f} {b / a:>7.2f}  {target}")
        misses = s.misses + g.misses

        quiet, during, sweep, batch = gc_under_load(
            large,
            handlers["large"],
            cookies["large"],
            args.quiet_seconds,
            rng,
            args.gc_batch,
            args.gc_pause,
            args.gc_seconds,
        )
        misses += quiet.misses + during.misses
        # Whether batches slow down as the sweep walks the expiry index past the entries it deleted.
        full = [b for b in sweep.batches if b[1] == batch] or sweep.batches
        tenth = max(1, len(full) // 10)

        def rate(batches: list[tuple[float, int]]) -> float:
            return sum(n for _, n in batches) / max(1e-9, sum(d for d, _ in batches))

        first, last = rate(full[:tenth]), rate(full[-tenth:])
        slowest = max(d for d, _ in sweep.batches) * 1000
        paced = f", {args.gc_pause:g} s between batches" if args.gc_pause else ""
        stopped = args.gc_seconds is not None and sweep.seconds >= args.gc_seconds
        bounded = f" (stopped after {args.gc_seconds:g} s)" if stopped else ""
        print(
            f"\n== GC of {sweep.rows:,} expired rows{bounded} among {args.rows:,} live, batches of {batch}{paced}, "
            "under load =="
        )
        print(f"{'':<14} {'quiet':>10} {'during GC':>12} {'ratio':>7}  target")
        for label, a, b, target in (
            ("load p50 ms", pct(quiet.loads, 0.5), pct(during.loads, 0.5), ""),
            ("load p99 ms", pct(quiet.loads, 0.99), pct(during.loads, 0.99), "<= 2"),
            ("save p99 ms", pct(quiet.saves, 0.99), pct(during.saves, 0.99), ""),
        ):
            print(f"{label:<14} {a:>10.3f} {b:>12.3f} {b / a:>7.2f}  {target}")
        print(
            f"sweep: {sweep.seconds:.1f} s, {sweep.rows / sweep.seconds:,.0f} rows/s "
            f"(first tenth of the batches {first:,.0f} rows/s, last tenth {last:,.0f}, slowest batch "
            f"{slowest:.0f} ms); "
            f"{len(during.loads):,} requests meanwhile, {len(quiet.loads):,} in {args.quiet_seconds:.0f} s "
            "before and after"
        )
        print(
            f"WAL meanwhile: {sweep.wal_bytes / 2**20:,.0f} MiB ({sweep.wal_bytes / max(1, sweep.rows):,.0f} bytes "
            f"per row deleted), {sweep.checkpoints} checkpoints"
        )

        index = user_index(large)
        user = next(s.user_id for s in live["large"] if s.user_id is not None)
        statement, custom, generic, devices = device_listing_plan(large, user)
        print(f"\n== device listing on {args.rows:,} rows ({devices} devices of {user}); index {index} ==")
        print(" ".join(statement.split()))
        for title, plan in (("custom plan (as sent)", custom), ("generic plan (prepared)", generic)):
            ok = index_bound(plan, index)
            failed |= not ok
            print(f"-- {title}: {'index-bound' if ok else 'NOT INDEX-BOUND'}")
            for line in plan:
                print(f"   {line}")

        print_hot(args, admin, small)
        if misses:
            print(f"\n{misses} loads of a live cookie found no session: the figures are not valid")
            failed = True
        return 1 if failed else 0
    finally:
        for name, handler in handlers.items():
            if keep:  # leave the kept databases as filled: the API-created sessions go again
                for session in live.get(name, []):
                    if session.key is not None:
                        handler.destroy(session.key)
            handler.engine.dispose()
        if not keep:
            for name in (small_db, large_db):
                drop_database(admin, name)
        admin.dispose()


if __name__ == "__main__":
    sys.exit(main())
