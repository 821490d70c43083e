"""Fair share of the pool: no one session, and no one client address, holds more than its part of it.

Most store calls hold a pooled connection for a millisecond or two, and nothing bounds them here:
they cannot crowd anyone out. Two kinds of call hold one for as long as someone else decides:

- a blocking request holds its connection (and its session's row lock) while the app runs;
- a save that goes alone (a lost race, a row another request holds; on MariaDB and SQLite every
  save) may wait for its row's lock, up to `write_wait_seconds`, holding a connection and a thread.

So, per process:

- a client address holds at most `address_connections` blocking requests at once (half the pool by
  default); the next is answered 429 (`TooManyRequests`) at once;
- a session holds at most `session_connections` connections at once (a quarter of the pool); a save
  past it waits its turn *before* it takes a connection (sync: in its own request's thread; async:
  on the event loop, `SessionSlots`, holding no thread either), and so does a save of a session
  whose blocking request holds it here (in the database it would only wait for the row's lock);
  waits end within `write_wait_seconds` (423), and past 64 waiting saves of a session, or an
  address's share of waiting threads, a save is refused at once (423, 429).

However a client mixes blocking routes, parallel writes and sessions of its own, everyone else keeps
the rest of the pool and of the worker threads.

Behind a reverse proxy the address is the proxy's unless the server is told to trust its
`X-Forwarded-For` (uvicorn `--proxy-headers`, gunicorn `forwarded_allow_ips`, werkzeug's `ProxyFix`):
then every client shares one address's part, which stays half the pool by default.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from ..config import SessionConfig
from ..errors import LockTimeout, TooManyRequests

Release = Callable[[], None]

#: Saves of one session that may wait for its share in a process; more are refused at once (423).
MAX_WAITING_PER_SESSION = 64


def no_hold() -> None:
    """The release of a hold that was not counted."""
    return None


class FairShare:
    """Long holds of the pool in flight in this process, by session key and by client address (thread-safe).

    Two kinds: `hold_blocking` (a blocking request, from its lock attempt to its commit) and
    `hold_save` (a save that goes alone and may wait for its row). A save of a session whose
    blocking request holds it here waits for that request to end before it takes a connection: it
    would only wait for the row's lock in the database, holding one.
    """

    def __init__(self, config: SessionConfig) -> None:
        self.per_session = config.session_connections or max(1, config.pool_size // 4)
        self.per_address = config.address_connections or max(1, config.pool_size // 2)
        self._hold_bound = config.block_lock_seconds  # as the database bounds a blocking request's hold
        self._changed = threading.Condition(threading.Lock())
        self._by_session: dict[str, int] = {}
        self._blocking: dict[str, list[float]] = {}  # when blocking requests took each session they hold
        self._by_address: dict[str, int] = {}  # blocking requests, by client address
        self._waiting: dict[str, int] = {}  # saves waiting, by session
        self._waiting_from: dict[str, int] = {}  # saves waiting, by client address

    def hold_blocking(self, session_key: str, address: str | None, *, wait: float) -> Release:
        """Count a blocking request's hold against *address*: `TooManyRequests` at once past its share.
        When the session's saves hold the session's share, wait up to *wait* for one to end
        (`LockTimeout`), the waiting thread parked on the address's share too.

        (The hold itself is not one of the session's: its saves wait for it by `locked_here`, and a
        hold that outlives `block_lock_seconds` must stop holding them up.)"""
        with self._changed:
            self._check_address(address)
            if self._by_session.get(session_key, 0) >= self.per_session:
                with self._parked_here(address):
                    self._wait_until(lambda: self._by_session.get(session_key, 0) < self.per_session, wait)
                self._check_address(address)  # others of the address may have come in meanwhile
            if address is not None:
                _increment(self._by_address, address)

        def release() -> None:
            if address is not None:
                _decrement(self._by_address, address)

        return self._release_once(release)

    def _check_address(self, address: str | None) -> None:
        if address is not None and self._by_address.get(address, 0) >= self.per_address:
            raise TooManyRequests(address, self.per_address)

    def _park(self, address: str) -> None:
        # Called with the guard held: a thread about to wait counts on its address's share of them.
        if self._waiting_from.get(address, 0) >= self.per_address:
            raise TooManyRequests(address, self.per_address)
        _increment(self._waiting_from, address)

    @contextlib.contextmanager
    def _parked_here(self, address: str | None) -> Iterator[None]:
        # Called with the guard held, around a wait on it.
        if address is None:
            yield
            return
        self._park(address)
        try:
            yield
        finally:
            _decrement(self._waiting_from, address)

    def park(self, address: str | None) -> Release:
        """Count a thread of *address* that is about to wait elsewhere (a blocking request's gate):
        `TooManyRequests` at once when the address has its share of threads waiting already."""
        if address is None:
            return no_hold
        with self._changed:
            self._park(address)
        return self._release_once(lambda: _decrement(self._waiting_from, address))

    def locked_here(self, session_key: str) -> Release:
        """Note that a blocking request of this process holds the session's lock (its secret checked:
        a known key alone must not hold anyone up), until the returned function is called."""
        since = time.monotonic()
        with self._changed:
            self._blocking.setdefault(session_key, []).append(since)

        def release() -> None:
            holds = self._blocking.get(session_key, [])
            if since in holds:
                holds.remove(since)
            if not holds:
                self._blocking.pop(session_key, None)

        return self._release_once(release)

    def hold_save(self, session_key: str, address: str | None, *, wait: float) -> Release:
        """Count a save that goes alone. It waits (holding no connection) up to *wait* seconds while a
        blocking request holds the session here, or the session holds its share, then `LockTimeout`.
        Past `MAX_WAITING_PER_SESSION` waiting saves of the session, `LockTimeout` at once; past the
        address's share of waiting threads, `TooManyRequests` at once."""
        with self._changed:

            def free() -> bool:
                return not self._blocked(session_key) and self._by_session.get(session_key, 0) < self.per_session

            if not free():
                if self._waiting.get(session_key, 0) >= MAX_WAITING_PER_SESSION:
                    raise LockTimeout(0)
                with self._parked_here(address):
                    _increment(self._waiting, session_key)
                    try:
                        self._wait_until(free, wait, lambda: self._blocked_until(session_key))
                    finally:
                        _decrement(self._waiting, session_key)
            _increment(self._by_session, session_key)
        return self._release_once(lambda: _decrement(self._by_session, session_key))

    def _blocked(self, session_key: str) -> bool:
        """Whether a blocking request holds the session here, for less than `block_lock_seconds` (past
        it the database takes its lock back, and the save need not wait for it any more)."""
        return self._blocked_until(session_key) > time.monotonic()

    def _blocked_until(self, session_key: str) -> float:
        holds = self._blocking.get(session_key)
        return min(holds) + self._hold_bound if holds else 0.0

    def _wait_until(
        self, condition: Callable[[], bool], wait: float, lapses: Callable[[], float] | None = None
    ) -> None:
        """Wait (with the guard held) until *condition*, up to *wait* seconds; *lapses*: when what is
        waited for ends by itself (a blocking hold past its bound), which no release announces."""
        if condition():
            return
        if wait <= 0:
            raise LockTimeout(0)
        deadline = time.monotonic() + wait
        while not condition():
            now = time.monotonic()
            if now >= deadline:
                raise LockTimeout(wait)
            lapse = 0.0 if lapses is None else lapses()
            wake = min(deadline, lapse) if lapse > now else deadline
            self._changed.wait(wake - now)

    def _release_once(self, release: Callable[[], None]) -> Release:
        ended = False

        def release_once() -> None:
            nonlocal ended
            with self._changed:
                if ended:
                    return
                ended = True
                release()
                self._changed.notify_all()

        return release_once

    def held(self, *, session_key: str | None = None, address: str | None = None) -> int:
        """How many long holds are in flight for *session_key* or *address* (for tests and metrics)."""
        with self._changed:
            if session_key is not None:
                return self._by_session.get(session_key, 0)
            return self._by_address.get(address or "", 0)


def _increment(counts: dict[str, int], name: str) -> None:
    counts[name] = counts.get(name, 0) + 1


def _decrement(counts: dict[str, int], name: str) -> None:
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

    def take(self, session_key: str) -> Release | None:
        """A slot of the session's, if one is free now (its end), else None: `enter` waits for one."""
        entry = self._slots.get(session_key)
        if entry is None:
            entry = self._slots[session_key] = [1, []]
        elif entry[0] < self._share.per_session:
            entry[0] += 1
        else:
            return None
        return self._leave(session_key, entry)

    async def enter(self, session_key: str, wait: float) -> Release:
        """A slot of the session's: at once if one is free, else the first to end, waited for on the
        loop up to *wait* seconds (`LockTimeout`)."""
        leave = self.take(session_key)
        if leave is not None:
            return leave
        entry = self._slots[session_key]
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
        return self._leave(session_key, entry)  # the slot handed over by `_pass_on`

    def _leave(self, session_key: str, entry: list[Any]) -> Release:
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
