"""Client CPU per primary-key SELECT on each way a statement can go to PostgreSQL, in one run.

    python benchmarks/statement_paths.py [--pg URL] [--runs 4000]

The baseline is SQLAlchemy's `Connection.execute` of the Core statement (what an application writes);
beside it `exec_driver_sql` of the same SQL, psycopg's cursor as `handlers.runner` uses it (reused
and new per statement, `prepare=True, binary=True`), and psycopg's `RawCursor` with `$n` placeholders.
Best of 3 × `--runs`, `time.process_time` (the client's CPU, not the round trip).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from typing import Any

import psycopg
import sqlalchemy as sa

TABLE = "bench_statement_paths"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pg", default="postgresql+psycopg://postgres@127.0.0.1/test")
    parser.add_argument("--runs", type=int, default=4000)
    args = parser.parse_args()
    engine = sa.create_engine(args.pg, isolation_level="AUTOCOMMIT", connect_args={"prepare_threshold": None})
    metadata = sa.MetaData()
    table = sa.Table(
        TABLE,
        metadata,
        sa.Column("key", sa.String(64), primary_key=True),
        sa.Column("payload", sa.LargeBinary),
        sa.Column("v", sa.BigInteger),
    )
    metadata.drop_all(engine)
    metadata.create_all(engine)
    try:
        with engine.connect() as conn:
            conn.execute(table.insert(), [{"key": f"k{i}", "payload": b"x" * 200, "v": i} for i in range(100)])
        statement = sa.select(table.c.key, table.c.payload, table.c.v).where(
            table.c.key == sa.bindparam("k"), table.c.v > sa.bindparam("n")
        )
        sql = statement.compile(dialect=engine.dialect).string
        values = {"k": "k5", "n": 0}
        results: list[tuple[str, float]] = []

        def measure(name: str, run: Callable[[], Any]) -> None:
            best = float("inf")
            for _ in range(3):
                started = time.process_time()
                for _ in range(args.runs):
                    run()
                best = min(best, (time.process_time() - started) / args.runs * 1e6)
            results.append((name, best))

        with engine.connect() as conn:
            measure("Connection.execute (baseline)", lambda: conn.execute(statement, values).first())
            measure("Connection.exec_driver_sql", lambda: conn.exec_driver_sql(sql, values).first())
            driver: Any = conn.connection.dbapi_connection
            cursor = driver.cursor()

            def reused() -> None:
                cursor.execute(sql, values, prepare=True, binary=True)
                cursor.fetchone()

            def fresh() -> None:
                with driver.cursor() as each:
                    each.execute(sql, values, prepare=True, binary=True)
                    each.fetchone()

            raw = psycopg.RawCursor(driver)
            raw_sql = f"SELECT key, payload, v FROM {TABLE} WHERE key = $1 AND v > $2"

            def raw_cursor() -> None:
                raw.execute(raw_sql, ("k5", 0), prepare=True, binary=True)
                raw.fetchone()

            measure("psycopg cursor, reused", reused)
            measure("psycopg cursor, one per statement (handlers.runner)", fresh)
            measure("psycopg RawCursor, reused", raw_cursor)
    finally:
        metadata.drop_all(engine)
        engine.dispose()
    baseline = results[0][1]
    print(f"{'path':55s} {'µs CPU':>8s} {'ratio':>6s}")
    for name, micros in results:
        print(f"{name:55s} {micros:8.1f} {micros / baseline:6.2f}")


if __name__ == "__main__":
    main()
