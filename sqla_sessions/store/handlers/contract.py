"""What a handler is, as its callers see it: the `SessionHandler` protocol, how blocking requests lock."""

from __future__ import annotations

import enum
from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

from ...config import SessionConfig
from ...core.records import Record, SaveAction, SessionInfo
from ...core.session import Session

#: What `_merge` hands back: the row it wrote and the raw payload it stored.
Merged = tuple[Record, dict[str, Any]]


class LockStrategy(enum.Enum):
    """How a blocking request excludes the others of its session."""

    ROW = "row"
    """The database holds a row lock for the request (waits in the database, hand-off at commit)."""
    LEASE = "lease"
    """A lease on the row, polled for (SQLite, memory: no row locks there)."""


class LockState(enum.Enum):
    """The outcome of one attempt to lock a session for a blocking request."""

    LOCKED = "locked"
    BUSY = "busy"
    """Leased by another request: poll again (leases only; a row lock waits in the database)."""
    MISSING = "missing"
    """No live session under that id: nothing to lock."""


@runtime_checkable
class SessionHandler(Protocol):
    """The contract every handler (database, memory) fulfils."""

    config: SessionConfig

    def now(self) -> int:
        """The handler's clock in unix seconds."""

    def load(self, session_id: str | None) -> Session:
        """Return the live session for a cookie id, or a new empty one (never raises for bad input)."""

    def load_by_key(self, key: str) -> Session | None:
        """Return the live session with this stable key, or None (used by background jobs)."""

    def save(
        self,
        session: Session,
        *,
        end_of_request: bool = False,
        record_activity: bool = True,
        job_id: str | None = None,
    ) -> SaveAction:
        """Persist the session's changes, merged onto the current row.

        *record_activity* False (background jobs) leaves `last_activity` and the expiry as they are.
        *job_id*: the write is refused (`SessionInterrupted`) if the stored session lists this job.
        """

    def destroy(self, key: str) -> bool:
        """Delete the session with this stable key; True if a row was deleted."""

    def gc(
        self,
        batch_size: int | None = None,
        *,
        on_batch: Callable[[int], None] | None = None,
        max_batches: int | None = None,
        pause: float | None = None,
    ) -> int:
        """Delete expired sessions in bounded batches (at most *max_batches*, *pause* seconds apart:
        by default `gc_pause`); return how many were deleted."""

    def list_sessions(self, user_id: object) -> list[SessionInfo]:
        """Return a user's live sessions, most recently active first."""

    def revoke(self, key: str) -> bool:
        """Log one session out (delete it by stable key)."""

    def revoke_user(self, user_id: object, *, except_key: str | None = None) -> int:
        """Log a user out everywhere, optionally keeping one session; return how many were deleted."""
