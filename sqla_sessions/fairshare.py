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

import asyncio
import threading
import time
from collections.abc import Callable
from typing import Any

from .config import SessionConfig
from .errors import LockTimeout, TooManyRequests

Release = Callable[[], None]

#: Saves of one session that may wait for its share in a process; more are refused at once (423).
MAX_WAITING_PER_SESSION = 64


def no_hold() -> None:
    """The release of a hold that was not counted."""
    return None


class FairShare:
    """Counts of long holds in flight, by session key and by client address (thread-safe)."""

    def __init__(self, config: SessionConfig) -> None:
        self.per_session = config.session_connections or max(1, config.pool_size // 4)
        self.per_address = config.address_connections or max(1, config.pool_size // 2)
        self._changed = threading.Condition(threading.Lock())
        self._by_session: dict[str, int] = {}
        self._waiting: dict[str, int] = {}
        self._by_address: dict[str, int] = {}

    def hold(self, session_key: str | None, address: str | None, *, wait: float = 0.0) -> Release:
        """Count one long hold of *session_key* from *address* (either may be None: not counted by it);
        returns the function that ends it (safe to call twice).

        When the session holds its share already, wait up to *wait* seconds for one of its holds to
        end (a thread that waits here holds no connection), then `LockTimeout`; past
        `MAX_WAITING_PER_SESSION` waiters, at once. An address past its share: `TooManyRequests` at once.
        """
        if session_key is None and address is None:
            return no_hold
        with self._changed:
            if address is not None and self._by_address.get(address, 0) >= self.per_address:
                raise TooManyRequests(address, self.per_address)
            if session_key is not None and self._by_session.get(session_key, 0) >= self.per_session:
                self._wait_for_a_slot(session_key, wait)
                if address is not None and self._by_address.get(address, 0) >= self.per_address:
                    raise TooManyRequests(address, self.per_address)
            if session_key is not None:
                self._by_session[session_key] = self._by_session.get(session_key, 0) + 1
            if address is not None:
                self._by_address[address] = self._by_address.get(address, 0) + 1
        ended = False

        def release() -> None:
            nonlocal ended
            with self._changed:
                if ended:
                    return
                ended = True
                _decrement(self._by_session, session_key)
                _decrement(self._by_address, address)
                if session_key is not None and self._waiting.get(session_key):
                    self._changed.notify_all()

        return release

    def _wait_for_a_slot(self, session_key: str, wait: float) -> None:
        # Called with the guard held, while the session holds its share.
        if wait <= 0 or self._waiting.get(session_key, 0) >= MAX_WAITING_PER_SESSION:
            raise LockTimeout(0)
        deadline = time.monotonic() + wait
        self._waiting[session_key] = self._waiting.get(session_key, 0) + 1
        try:
            while self._by_session.get(session_key, 0) >= self.per_session:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise LockTimeout(wait)
                self._changed.wait(remaining)
        finally:
            _decrement(self._waiting, session_key)

    def held(self, *, session_key: str | None = None, address: str | None = None) -> int:
        """How many long holds are in flight for *session_key* or *address* (for tests and metrics)."""
        with self._changed:
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


class SessionSlots:
    """The async store's side of a session's share: at most `FairShare.per_session` saves of one
    session run at once (each may take a worker thread and a connection); the others wait on the
    event loop, holding neither, up to *wait* seconds (`LockTimeout` past it, or at once past
    `MAX_WAITING_PER_SESSION`). A burst of one browser's writes is served in turn, not refused."""

    def __init__(self, share: FairShare) -> None:
        self._share = share
        self._slots: dict[str, list[Any]] = {}  # key -> [in flight, waiters (futures)]

    async def enter(self, session_key: str, wait: float) -> Release:
        entry = self._slots.setdefault(session_key, [0, []])
        if entry[0] >= self._share.per_session:
            waiters: list[asyncio.Future[None]] = entry[1]
            if len(waiters) >= MAX_WAITING_PER_SESSION:
                raise LockTimeout(0)
            turn: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            waiters.append(turn)
            try:
                await asyncio.wait_for(asyncio.shield(turn), wait)
            except BaseException as exc:  # out of time, or the request was cancelled
                if turn in waiters:
                    waiters.remove(turn)
                    turn.cancel()
                else:
                    self._pass_on(session_key, entry)  # handed a slot just now: it goes to the next
                if isinstance(exc, TimeoutError):
                    raise LockTimeout(wait) from None
                raise
        else:
            entry[0] += 1
        ended = False

        def leave() -> None:
            nonlocal ended
            if not ended:
                ended = True
                self._pass_on(session_key, entry)

        return leave

    def _pass_on(self, session_key: str, entry: list[Any]) -> None:
        """A slot ends: hand it to the first waiter (it stays counted), or give it back."""
        waiters: list[asyncio.Future[None]] = entry[1]
        while waiters:
            turn = waiters.pop(0)
            if not turn.done():
                turn.set_result(None)
                return
        entry[0] -= 1
        if entry[0] <= 0 and self._slots.get(session_key) is entry:
            del self._slots[session_key]
