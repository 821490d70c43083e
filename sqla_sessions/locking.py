"""Blocking sessions, under the name earlier releases gave it (now `sqla_sessions.store.locking`):
`@blocking` marks an ASGI endpoint, `BlockingSession` locks one session outside a request."""

from .store.locking import BlockingSession, LockedRequest, blocking

__all__ = ["BlockingSession", "LockedRequest", "blocking"]
