"""One save as a value: what the session hands the store, and the row the store computes from it.

`Session.unit_of_work()` freezes a request's changes into a `UnitOfWork` (payload change set,
identity changes, client facts). The store writes it with a compare-and-set on the loaded version,
or, after a lost race, merges it onto the current row under a lock; either way the row it writes is
`successor(current, unit, …)`. Everything here is pure: no I/O, no clock of its own.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

from ..config import SessionConfig
from ..errors import SessionInterrupted
from .merge import ChangeSet, apply_changes
from .records import Record, SaveAction
from .store_api import TOKEN_KEY

#: Reserved session key: ids of the latest background jobs whose changes landed (exactly-once effects).
JOBS_KEY = "_jobs"


class JobAlreadyApplied(SessionInterrupted):
    """A redelivered job whose changes are already stored: nothing is written again."""


class UnitOfWork(NamedTuple):
    """Everything one save writes, frozen when the save starts."""

    changes: ChangeSet
    loaded: Record | None
    """The row the session was loaded from (None: the session is not stored yet)."""
    new_id_hash: str | None
    """Hash of the secret of the id this request gave the session (a new session's, or after regenerate);
    None: unchanged."""
    user_id: str | None
    user_changed: bool
    new_key: str | None
    """The key of a row stored for the first time, or, at a change of privilege (login), the key the
    row moves to, so nothing holding the old one reaches it. It is the key the session id names, chosen
    when the unit is made, so a unit written again (after a lost lock) writes the same row."""
    keep_previous_id: bool
    """`regenerate(destroy=False)`: the id the row has until this save keeps reaching it."""
    destroy_key: str | None
    """`invalidate()`: the row to delete."""
    ip_address: str | None
    user_agent: str | None
    record_activity: bool = True
    job_id: str | None = None
    """A background job's id: the write is refused if the stored session already lists it."""
    lifetime: tuple[int | None, int | None] | None = None
    """`Session.set_lifetime()`: the session's own (idle, absolute) lifetime in seconds; None: unchanged."""

    @property
    def writes(self) -> bool:
        """Whether the save must write something beyond an activity touch."""
        return bool(
            self.changes
            or self.user_changed
            or self.new_key is not None
            or self.destroy_key is not None
            or (self.loaded is not None and self.new_id_hash is not None)
            or (self.loaded is not None and self.lifetime is not None)
        )


class Saved(NamedTuple):
    """What a save stored, for the session to adopt."""

    action: SaveAction
    record: Record | None
    """The row as written (None: nothing is stored for this session)."""
    raw: dict[str, Any]
    """The raw payload as written."""
    expiry_moved: bool
    """The save pushed `expires_at` forward (the cookie's expiry follows)."""


class Expiry:
    """The expiry policy: sliding idle lifetime, optional absolute cap, activity recorded at most every interval."""

    __slots__ = ("absolute", "interval", "lifetime")

    def __init__(self, config: SessionConfig) -> None:
        self.lifetime = config.lifetime_seconds
        self.absolute = config.absolute_lifetime_seconds
        self.interval = config.touch_interval

    def expires_at(self, created_at: int, now: int, own: Record | None = None) -> int:
        """When a session created at *created_at* and active *now* expires (by *own*'s lifetime, if it has one)."""
        idle, absolute = self.lifetime, self.absolute
        if own is not None:
            if own.idle_lifetime is not None:
                idle = own.idle_lifetime
            if own.absolute_lifetime is not None:
                absolute = own.absolute_lifetime
        expires = now + idle
        return expires if absolute is None else min(expires, created_at + absolute)

    def activity_due(self, record: Record, now: int) -> bool:
        """Whether *record*'s activity may be recorded again (at most once per touch_interval)."""
        return now - record.last_activity >= self.interval


def successor(
    current: Record,
    current_raw: Mapping[str, Any],
    unit: UnitOfWork,
    *,
    key: str,
    now: int,
    expiry: Expiry,
    dumps: Callable[[dict[str, Any], str, str | None, int], bytes],
) -> tuple[Record, dict[str, Any]]:
    """The row that replaces *current* once *unit* is merged onto it (its payload three-way merged).

    Raises `JobAlreadyApplied` when the unit is a job whose id the stored session already lists.
    """
    if unit.job_id is not None:
        done = current_raw.get(JOBS_KEY)
        if type(done) is list and unit.job_id in done:
            raise JobAlreadyApplied(f"job {unit.job_id} already landed")
    raw = apply_changes(current_raw, unit.changes)
    if key != current.key and TOKEN_KEY in raw and TOKEN_KEY not in unit.changes.updates:
        # A change of privilege renews the CSRF token it knows of; one another request created under
        # the old id meanwhile (perhaps an attacker holding a planted id) must not cross over.
        raw = {k: v for k, v in raw.items() if k != TOKEN_KEY}
    activity = unit.record_activity and expiry.activity_due(current, now)
    idle, absolute = (current.idle_lifetime, current.absolute_lifetime) if unit.lifetime is None else unit.lifetime
    record = Record(
        key=key,
        id_hash=unit.new_id_hash if unit.new_id_hash is not None else current.id_hash,
        # A new id keeps the row's id until now valid when asked to (the current row's, so two requests
        # regenerating at once both leave a working id), else ends every earlier id.
        previous_id_hash=current.previous_id_hash
        if unit.new_id_hash is None
        else (current.id_hash if unit.keep_previous_id else None),
        user_id=(user_id := unit.user_id if unit.user_changed else current.user_id),
        payload=dumps(raw, key, user_id, current.version + 1),  # PayloadTooLarge: nothing written
        version=current.version + 1,
        created_at=current.created_at,
        # Activity is recorded at most once per touch_interval, on writes as on reads: an UPDATE that
        # leaves last_activity and expires_at alone changes no indexed column, so PostgreSQL can
        # update the row in place (a HOT update: no new index entries, less WAL, less vacuum).
        last_activity=now if activity else current.last_activity,
        expires_at=current.expires_at,
        ip_address=unit.ip_address or current.ip_address,
        user_agent=unit.user_agent or current.user_agent,
        idle_lifetime=idle,
        absolute_lifetime=absolute,
    )
    if activity or unit.lifetime is not None:  # a new lifetime takes effect at once
        record.expires_at = expiry.expires_at(current.created_at, now, record)
    return record, raw


def first_row(
    unit: UnitOfWork,
    *,
    key: str,
    now: int,
    expiry: Expiry,
    dumps: Callable[..., bytes],
    raw: Mapping[str, Any] | None = None,
) -> Record:
    """The row of a session stored for the first time (holding *raw*, by default the unit's updates)."""
    assert unit.new_id_hash is not None
    payload = dumps(dict(unit.changes.updates if raw is None else raw), key, unit.user_id, 1)
    idle, absolute = (None, None) if unit.lifetime is None else unit.lifetime
    record = Record(
        key=key,
        id_hash=unit.new_id_hash,
        user_id=unit.user_id,
        payload=payload,
        version=1,
        created_at=now,
        last_activity=now,
        expires_at=now,
        ip_address=unit.ip_address,
        user_agent=unit.user_agent,
        idle_lifetime=idle,
        absolute_lifetime=absolute,
    )
    record.expires_at = expiry.expires_at(now, now, record)
    return record
