"""`sqla-sessions demo`: migrate, start the workers, serve the demo with uvicorn."""

from __future__ import annotations

import os
import subprocess
import sys

import uvicorn

from ..config import SessionConfig
from ..store.handlers.engines import masked_url
from ..store.migrate import upgrade


def serve(*, database_url: str, table: str, broker_url: str | None, host: str, port: int, workers: int) -> None:
    os.environ["SQLA_SESSIONS_DATABASE_URL"] = database_url
    os.environ["SQLA_SESSIONS_TABLE"] = table
    if broker_url:
        os.environ["SQLA_SESSIONS_DEMO_BROKER"] = broker_url
    else:
        os.environ.pop("SQLA_SESSIONS_DEMO_BROKER", None)
    config = SessionConfig(database_url=database_url, table=table, touch_interval=15)
    upgrade(database_url, table=table)

    from .app import create_app  # after the environment is set: the jobs module picks its broker from it

    worker_pool = None
    if broker_url:
        command = [sys.executable, "-m", "dramatiq", "sqla_sessions.demo.jobs", "--processes", str(workers)]
        worker_pool = subprocess.Popen([*command, "--threads", "2"], env=os.environ.copy())
    where = f"{masked_url(broker_url)} with {workers} worker processes" if broker_url else "an in-process worker"
    shown = masked_url(database_url)  # never print a password
    print(f"sqla_sessions demo on http://{host}:{port}  (sessions in {shown}, jobs on {where})", flush=True)
    try:
        uvicorn.run(create_app(config, in_process_worker=not broker_url), host=host, port=port, log_level="warning")
    finally:
        if worker_pool is not None:
            worker_pool.terminate()
            worker_pool.wait(30)
