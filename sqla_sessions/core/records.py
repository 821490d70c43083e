"""Plain value types passed between the session, the handlers and callers."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from datetime import UTC, datetime

#: The longest user id, user agent and client address a row holds (the columns' lengths: the core
#: keeps what it stores within them).
USER_ID_LENGTH = 255
USER_AGENT_LENGTH = 512
IP_ADDRESS_LENGTH = 45


@dataclass(slots=True)
class Record:
    """One stored session row, as the handlers read and write it."""

    key: str
    id_hash: str
    user_id: str | None
    payload: bytes
    version: int
    created_at: int
    last_activity: int
    expires_at: int
    ip_address: str | None = None
    user_agent: str | None = None
    previous_id_hash: str | None = None
    """After `regenerate(destroy=False)`: the hash of the secret of the id the session had before, which
    keeps reaching it (in-flight requests, other tabs) until the next regeneration."""
    idle_lifetime: int | None = None
    """This session's own idle lifetime in seconds (`Session.set_lifetime`, remember-me); None: the config's."""
    absolute_lifetime: int | None = None
    """This session's own cap in seconds since creation; None: the config's."""


class SaveAction(enum.Enum):
    """What a save did, so a middleware knows which cookie to send."""

    NOTHING = "nothing"
    """Nothing changed and no touch was due: no statement ran."""
    TOUCHED = "touched"
    """Only `last_activity` was refreshed (sliding expiry)."""
    INSERTED = "inserted"
    """A new row was created (lazy creation)."""
    UPDATED = "updated"
    """Changes were written with one compare-and-set statement."""
    MERGED = "merged"
    """Another writer got there first; changes were merged onto the current row under a lock."""
    DELETED = "deleted"
    """The session was invalidated and nothing new was written."""


@dataclass(frozen=True, slots=True)
class SessionInfo:
    """A live session of a user, for "your devices" pages."""

    key: str
    user_id: str | None
    ip_address: str | None
    user_agent: str | None
    created_at: datetime
    last_activity: datetime
    expires_at: datetime

    @classmethod
    def from_record(cls, record: Record) -> SessionInfo:
        return cls(
            key=record.key,
            user_id=record.user_id,
            ip_address=record.ip_address,
            user_agent=record.user_agent,
            created_at=_utc(record.created_at),
            last_activity=_utc(record.last_activity),
            expires_at=_utc(record.expires_at),
        )


def _utc(epoch: int) -> datetime:
    return datetime.fromtimestamp(epoch, UTC)


@dataclass(frozen=True, slots=True)
class StoreStats:
    """What `sqla-sessions stats` shows."""

    live: int
    expired: int
    users: int
    """Distinct users with a live session."""
    table_bytes: int | None
    """Size on disk of the table and its indexes, where the database tells (None elsewhere)."""
