"""Fair share of the pool: no one session, and no one client address, holds more than its part of it.

Most store calls hold a pooled connection for a millisecond or two, and nothing bounds them here:
they cannot crowd anyone out. Two kinds of call hold one for as long as someone else decides:

- a blocking request holds its connection (and its session's row lock) while the app runs;
- a save that lost its race (or met a row another request holds) waits for that row's lock, up to
  its bound, holding a connection and a thread.

Those *long holds* are counted here, per process, by session key and by client address. Past
`session_connections` holds of one session a call is refused at once with `LockTimeout` (423):
its session is busy. Past `address_connections` holds of one address, with `TooManyRequests` (429):
that client has its share. So however a client mixes blocking routes, parallel writes and sessions
of its own, everyone else keeps the rest of the pool and of the worker threads.

Behind a reverse proxy the address is the proxy's unless the server is told to trust its
`X-Forwarded-For` (uvicorn `--proxy-headers`, gunicorn `forwarded_allow_ips`, werkzeug's `ProxyFix`):
then every client shares one address's part, which stays half the pool by default.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from .config import SessionConfig
from .errors import LockTimeout, TooManyRequests

Release = Callable[[], None]


def no_hold() -> None:
    """The release of a hold that was not counted."""
    return None


class FairShare:
    """Counts of long holds in flight, by session key and by client address (thread-safe)."""

    def __init__(self, config: SessionConfig) -> None:
        self.per_session = config.session_connections or max(1, config.pool_size // 4)
        self.per_address = config.address_connections or max(1, config.pool_size // 2)
        self._guard = threading.Lock()
        self._by_session: dict[str, int] = {}
        self._by_address: dict[str, int] = {}

    def hold(self, session_key: str | None, address: str | None) -> Release:
        """Count one long hold of *session_key* from *address* (either may be None: not counted by it);
        returns the function that ends it (safe to call twice). Raises `LockTimeout` or
        `TooManyRequests`, counting nothing, when the session's or the address's share is taken."""
        if session_key is None and address is None:
            return no_hold
        with self._guard:
            if session_key is not None and self._by_session.get(session_key, 0) >= self.per_session:
                raise LockTimeout(0)
            if address is not None and self._by_address.get(address, 0) >= self.per_address:
                raise TooManyRequests(address, self.per_address)
            if session_key is not None:
                self._by_session[session_key] = self._by_session.get(session_key, 0) + 1
            if address is not None:
                self._by_address[address] = self._by_address.get(address, 0) + 1
        ended = False

        def release() -> None:
            nonlocal ended
            with self._guard:
                if ended:
                    return
                ended = True
                _decrement(self._by_session, session_key)
                _decrement(self._by_address, address)

        return release

    def held(self, *, session_key: str | None = None, address: str | None = None) -> int:
        """How many long holds are in flight for *session_key* or *address* (for tests and metrics)."""
        with self._guard:
            if session_key is not None:
                return self._by_session.get(session_key, 0)
            return self._by_address.get(address or "", 0)


def _decrement(counts: dict[str, int], name: str | None) -> None:
    if name is None:
        return
    left = counts.get(name, 0) - 1
    if left > 0:
        counts[name] = left
    else:
        counts.pop(name, None)
