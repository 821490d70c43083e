"""The history checker's Dramatiq side: a Redis broker in a namespace of its own, one session actor."""

import os

import dramatiq
from dramatiq.brokers.redis import RedisBroker

from sqla_sessions import Session
from sqla_sessions.dramatiq import session_actor

REDIS_URL = os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
NAMESPACE = os.environ.get("HISTORY_NAMESPACE", "sqla-sessions-history")

# A dead worker's unacked messages come back after 2 s (the default is a minute).
broker = RedisBroker(url=REDIS_URL, namespace=NAMESPACE, heartbeat_timeout=2000)
dramatiq.set_broker(broker)


@session_actor(queue_name=f"{NAMESPACE}-jobs", max_retries=3, min_backoff=100, max_backoff=500)
def push_job(session: Session, value: str) -> None:
    """A background job's write to the shared list: lands once, or not at all if a login cut it off."""
    session.push("log", value)
