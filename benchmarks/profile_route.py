"""Where the server's CPU goes on one route: py-spy (GIL-holding samples only) while wrk drives it.

    python benchmarks/profile_route.py [read|increment] [--app sqla_app] [--seconds 8] [--pg URL]

Serves `http_apps:sqla_app` (or `--app`: `flask_sqla_app` runs under gunicorn gthread) with one
worker on core 0 (as `wrk_http.py` does), warms it
up, then records with `py-spy record --gil` during a wrk run on core 1 and prints the share of
GIL-held samples per function (inclusive and self) and the GIL time per request. Samples taken
while a thread waits for PostgreSQL (the GIL released) are not counted: what remains is the CPU a
request costs the server's one core. Hold `flock /tmp/bench.lock` for a measured run.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import uuid
from collections import Counter
from pathlib import Path

import sqlalchemy as sa
import wrk_http

from sqla_sessions import upgrade

RATE = 200  # samples per second


def frame_name(frame: str) -> str:
    """`function (file.py)` from py-spy's `function (path/file.py:line)`."""
    if " (" not in frame:
        return frame
    function, location = frame.split(" (", 1)
    return f"{function} ({location.split(':')[0].rsplit('/', 1)[-1]})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("route", nargs="?", default="read", choices=("read", "increment"))
    parser.add_argument("--seconds", type=float, default=8)
    parser.add_argument("--pg", default="postgresql+psycopg://postgres@127.0.0.1:5432/postgres")
    parser.add_argument("--app", default="sqla_app", help="a factory of benchmarks/http_apps.py")
    args = parser.parse_args()
    table = f"profile_{uuid.uuid4().hex[:8]}"
    upgrade(args.pg, table=table)
    env = {**os.environ, "SQLA_SESSIONS_DATABASE_URL": args.pg, "SQLA_SESSIONS_TABLE": table}
    path, method = ("/read", "GET") if args.route == "read" else ("/increment", "POST")
    process, port = wrk_http.serve(args.app, env, wrk_http.ROOT)
    output = Path(tempfile.mkdtemp()) / "profile.txt"
    try:
        jar = output.with_name("cookies.txt")
        jar.write_text("\n".join(wrk_http.new_cookie(port) for _ in range(64)) + "\n")
        wrk_http.wrk(port, path, method, jar, 64, 1.0)  # warm up: connections, prepared statements
        spy = subprocess.Popen(
            [str(Path(sys.executable).with_name("py-spy")), "record", "--pid", str(process.pid), "--duration",
             str(round(args.seconds)), "--rate", str(RATE), "--format", "raw", "--output", str(output),
             "--nonblocking", "--gil", "--subprocesses"],  # gunicorn: the worker is the master's child
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        raw = wrk_http.wrk(port, path, method, jar, 64, args.seconds)
        spy.wait(60)
    finally:
        process.terminate()
        process.wait(10)
        engine = sa.create_engine(args.pg)
        with engine.begin() as conn:
            conn.exec_driver_sql(f'DROP TABLE IF EXISTS "{table}"')
            conn.exec_driver_sql(f'DROP TABLE IF EXISTS "sqla_sessions_alembic_version_{table}"')
        engine.dispose()
    inclusive: Counter[str] = Counter()
    own: Counter[str] = Counter()
    for line in output.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        frames = [frame_name(f) for f in stack.split(";")]
        for frame in set(frames):
            inclusive[frame] += int(count)
        own[frames[-1]] += int(count)
    total = sum(own.values())
    requests = max(1, raw["requests"])
    print(f"{args.route}: {requests / args.seconds:,.0f} req/s; GIL held {total / RATE:.2f} s of {args.seconds:g} s, "
          f"{1e6 * total / RATE / requests:.0f} µs per request")  # fmt: skip
    for title, counter in (("inclusive", inclusive), ("self", own)):
        print(f"-- {title}")
        for name, count in counter.most_common(30):
            print(f"{100 * count / total:5.1f}%  {name}")


if __name__ == "__main__":
    main()
