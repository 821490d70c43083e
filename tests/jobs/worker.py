"""The broker and actors of the real-worker tests: imported by the `dramatiq` CLI and by the web app.

Configured by the environment the tests set: TEST_BROKER (redis | rabbitmq), TEST_NAMESPACE,
SQLA_SESSIONS_DATABASE_URL, TEST_SIGNAL_DIR.
"""

import os
import time
from pathlib import Path

import dramatiq
from dramatiq.results import Results
from dramatiq.results.backends.redis import RedisBackend

from sqla_sessions import Session
from sqla_sessions.dramatiq import session_actor

REDIS_URL = os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
RABBITMQ_URL = os.environ.get("TEST_RABBITMQ_URL", "amqp://guest:guest@127.0.0.1:5672/")
NAMESPACE = os.environ.get("TEST_NAMESPACE", "sqla-sessions-test")
HYDRATE_SECONDS = float(os.environ.get("TEST_HYDRATE_SECONDS", "0.5"))


def make_broker() -> dramatiq.Broker:
    if os.environ.get("TEST_BROKER", "redis") == "rabbitmq":
        from dramatiq.brokers.rabbitmq import RabbitmqBroker

        broker: dramatiq.Broker = RabbitmqBroker(url=RABBITMQ_URL)
    else:
        from dramatiq.brokers.redis import RedisBroker

        # A dead worker's unacked messages come back after 2 s (the default is a minute).
        broker = RedisBroker(url=REDIS_URL, namespace=NAMESPACE, heartbeat_timeout=2000, maintenance_chance=1_000_000)
    broker.add_middleware(Results(backend=RedisBackend(url=REDIS_URL, namespace=f"{NAMESPACE}-results")))
    return broker


class RecordEnqueued(dramatiq.Middleware):
    """Writes every message the web app enqueues to a file, so tests can read what reached the broker."""

    def after_enqueue(self, broker: dramatiq.Broker, message: dramatiq.Message, delay: int | None) -> None:
        folder = os.environ.get("TEST_SIGNAL_DIR")
        if folder:
            with open(Path(folder, "enqueued.jsonl"), "ab") as out:
                out.write(message.encode() + b"\n")


broker = make_broker()
broker.add_middleware(RecordEnqueued())
dramatiq.set_broker(broker)
QUEUE = f"{NAMESPACE}-jobs"


@session_actor(queue_name=QUEUE, max_retries=0, store_results=True)
def hydrate(session: Session, marker: str) -> str | None:
    """The seed article's job: check the login marker, do slow work, put the results in the session."""
    if session.get("marker") != marker:
        return None
    time.sleep(HYDRATE_SECONDS)
    session["dashboard"] = {"orders": 3, "marker": marker, "user": session.user_id}
    session.push("hydrations", marker)
    return marker


@session_actor(queue_name=QUEUE, max_retries=0)
def slow_append(session: Session, tag: str, seconds: float) -> None:
    """Announces itself (file named tag.pid), sleeps, then appends *tag*: for the kill test."""
    Path(os.environ["TEST_SIGNAL_DIR"], f"{tag}.{os.getpid()}").touch()
    time.sleep(seconds)
    session.push("runs", tag)
