"""The demo's broker and background job; also the module `dramatiq` worker processes import.

`SQLA_SESSIONS_DEMO_BROKER` picks the broker: unset for an in-process StubBroker (the embedded
default), `redis://…` or `amqp://…` for real worker processes (`dramatiq sqla_sessions.demo.jobs`).
"""

from __future__ import annotations

import os
import random
import time

import dramatiq

from ..core.session import Session
from ..dramatiq import session_actor

BROKER_ENV = "SQLA_SESSIONS_DEMO_BROKER"
HYDRATE_SECONDS = float(os.environ.get("SQLA_SESSIONS_DEMO_JOB_SECONDS", "1.5"))


def make_broker(url: str | None) -> dramatiq.Broker:
    if not url:
        from dramatiq.brokers.stub import StubBroker

        stub = StubBroker()
        stub.emit_after("process_boot")
        return stub
    if url.startswith(("redis://", "rediss://")):
        from dramatiq.brokers.redis import RedisBroker

        return RedisBroker(url=url)  # type: ignore[no-untyped-call]
    if url.startswith(("amqp://", "amqps://")):
        from dramatiq.brokers.rabbitmq import RabbitmqBroker

        return RabbitmqBroker(url=url)
    raise ValueError(f"{BROKER_ENV}: unsupported broker URL {url!r} (redis://… or amqp://…)")


broker = make_broker(os.environ.get(BROKER_ENV))
dramatiq.set_broker(broker)


@session_actor(max_retries=3, queue_name="sqla_sessions_demo")
def hydrate(session: Session, marker: str) -> None:
    """The seed article's job: after login, compute a dashboard and put it in the session."""
    if session.get("marker") != marker:
        return  # a later login superseded this job
    started = time.monotonic()
    time.sleep(HYDRATE_SECONDS)  # the slow part: reports, recommendations, an API call …
    rng = random.Random(marker)
    session["dashboard"] = {
        "open_orders": rng.randint(1, 9),
        "recommendations": rng.sample(["teapot", "lamp", "notebook", "chair", "plant", "clock"], 3),
        "computed_by": f"dramatiq worker pid {os.getpid()}",
        "took_ms": round((time.monotonic() - started) * 1000),
    }
