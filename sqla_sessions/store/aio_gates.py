"""Per process, per session: the one async blocking request that may hold a connection, and the
sessions such a request holds locked here.

One blocking request per session waits for (or holds) the database lock; the others queue at the
session's gate, holding no thread and no connection, and past `MAX_QUEUED_PER_SESSION` are answered
at once (`LockTimeout`: 423). While one holds the lock, the session's saves in this process wait
here too, holding nothing. `AsyncSessionStore.open_blocking` and its saves use this; sync servers
have the same gate in `locking`.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable

from ..errors import LockTimeout

#: Blocking requests of one session that may queue in one process behind the one that waits for or
#: holds its lock; more are answered `lock_timeout_status` (423) at once.
MAX_QUEUED_PER_SESSION = 8


class _Gate:
    """The blocking requests of one session in this process: one at a time past the gate, for at most
    `block_lock_seconds` (as the database lock: a holder past it no longer keeps the others waiting)."""

    __slots__ = ("changed", "owner", "since", "users")

    def __init__(self) -> None:
        self.changed = asyncio.Condition()
        self.owner: object | None = None
        self.since = 0.0
        self.users = 0


class AsyncSessionGates:
    """The gates of the sessions that blocking requests of this process use, and the locks they hold."""

    def __init__(self) -> None:
        self._gates: dict[str, _Gate] = {}  # blocking requests of a session id in this process
        # Session keys whose lock a blocking request here holds: when it took it, and its end.
        self.locked_here: dict[str, list[tuple[float, asyncio.Future[None]]]] = {}

    async def enter(self, session_id: str, wait: float, hold: float) -> Callable[[], None]:
        """Pass the gate of *session_id*, waiting at most *wait* for a holder of at most *hold*
        seconds (`LockTimeout` past it, or at once with a full queue); returns the way out."""
        gate = self._gates.setdefault(session_id, _Gate())  # the id's: a known key alone queues behind nobody
        if gate.users > MAX_QUEUED_PER_SESSION:  # the one past the gate, and a full queue
            raise LockTimeout(1)
        gate.users += 1
        token = object()
        deadline = time.monotonic() + wait
        try:
            async with gate.changed:
                while gate.owner is not None and time.monotonic() - gate.since < hold:
                    if time.monotonic() >= deadline:
                        raise LockTimeout(wait)
                    remaining = min(deadline, gate.since + hold) - time.monotonic()
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(gate.changed.wait(), max(remaining, 0.001))
                gate.owner, gate.since = token, time.monotonic()
        except BaseException:
            self._leave(session_id, gate, token)
            raise
        return lambda: self._leave(session_id, gate, token)

    def _leave(self, session_id: str, gate: _Gate, token: object) -> None:
        if gate.owner is token:
            gate.owner = None
            asyncio.ensure_future(self._notify(gate))  # wake the next waiter (this may run outside the loop's task)
        gate.users -= 1
        if gate.users == 0 and self._gates.get(session_id) is gate:
            del self._gates[session_id]

    @staticmethod
    async def _notify(gate: _Gate) -> None:
        async with gate.changed:
            gate.changed.notify()

    def lock_here(self, key: str) -> asyncio.Future[None]:
        """A blocking request here holds the lock of session *key* from now on: until the future returned
        is given to `unlock_here`, the session's saves here wait for it (`until_unlocked_here`)."""
        unlocked = asyncio.get_running_loop().create_future()
        self.locked_here.setdefault(key, []).append((time.monotonic(), unlocked))
        return unlocked

    def unlock_here(self, key: str, unlocked: asyncio.Future[None]) -> None:
        holds = [entry for entry in self.locked_here.get(key, []) if entry[1] is not unlocked]
        if holds:
            self.locked_here[key] = holds
        else:
            self.locked_here.pop(key, None)
        if not unlocked.done():
            unlocked.get_loop().call_soon_threadsafe(_settle, unlocked)

    async def until_unlocked_here(self, key: str, wait: float, hold: float) -> None:
        """Wait (holding nothing) while a blocking request of this process holds the session's lock, for
        at most *wait* (`LockTimeout`) and no longer than its hold's bound, *hold*: in the database the
        save would only wait for the row's lock, holding a thread and a connection."""
        deadline = time.monotonic() + wait
        while holds := self.locked_here.get(key):
            since, unlocked = holds[0]
            now = time.monotonic()
            lapses = since + hold
            if lapses <= now:
                return  # past its bound the database takes the lock back: the save need not wait
            if now >= deadline:
                raise LockTimeout(wait)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(unlocked), min(deadline, lapses) - now)


def _settle(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)
