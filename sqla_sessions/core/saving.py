"""What a save sends and takes back.

A save hands the store one `UnitOfWork` (`unit_of_work()`): the payload change set against the
payload as loaded (the base of the three-way merge, see `merge`), the identity changes (new id,
user, a change of privilege, a kept previous id, a deletion) and the client facts. The store writes
it and the session `adopt()`s what was stored.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import replace
from typing import TYPE_CHECKING

from ..errors import SessionInterrupted
from .ids import secret_hash, session_key_of
from .lifecycle import PERMANENT_KEY, SessionLifecycle
from .merge import NO_CHANGES, ChangeSet, apply_changes
from .records import IP_ADDRESS_LENGTH, USER_AGENT_LENGTH, SaveAction
from .serializer import decode_value
from .unit import Saved, UnitOfWork

if TYPE_CHECKING:
    from .session import Session

logger = logging.getLogger("sqla_sessions")


class SessionSaving(SessionLifecycle):
    """The unit of work a save freezes, the row it adopts afterwards, and the callbacks it runs."""

    __slots__ = ()

    @property
    def modified(self) -> bool:
        """True when saving would write something (data, user, id or deletion)."""
        return bool(
            self._changes()
            or self._id_changed
            or self._user_id != self._base_user_id
            or self._destroy_key is not None
            or self._lifetime is not None
        )

    @modified.setter
    def modified(self, value: bool) -> None:
        """Accepted for Flask code (`session.modified = True`); changes are found by comparing values."""

    # -- the unit of work: what stores use -----------------------------------------------------------

    def unit_of_work(
        self, *, end_of_request: bool, record_activity: bool = True, job_id: str | None = None
    ) -> UnitOfWork:
        """Freeze this request's changes for a save; `TypeError` names a key whose value cannot be stored.

        With *end_of_request*, flash data is aged first (once per request however often it is saved).
        """
        if end_of_request and not self._flash_aged:
            self._flash_aged = True
            self._age_flash()
        changes = self._changes()
        logging_in = self._user_id is not None and self._user_id != self._base_user_id
        if self._detached and not logging_in and (changes or self._user_id is not None or self._id_changed):
            raise SessionInterrupted("the session ended while this request ran (see reload()); nothing was saved")
        loaded = self._loaded
        if (
            changes is NO_CHANGES
            and loaded is not None
            and (self._id_changed or self._user_id != self._base_user_id or self._lifetime is not None)
        ):
            changes = ChangeSet(base=self._raw)  # an identity- or lifetime-only save still writes the loaded payload
        new_id_hash = new_key = None
        if loaded is None:
            # A new session gets a row only when it has something to hold (or its app asks for one).
            # Flask's `permanent` flag alone is not something to hold: an app setting it on every
            # request would otherwise store a row for every cookieless client (a crawler's requests).
            if changes.updates.keys() - {PERMANENT_KEY} or self._user_id is not None or self._ensure_stored:
                new_id_hash, new_key = secret_hash(self.id), session_key_of(self.id)
        elif self._id_changed and self._id is not None:
            new_id_hash = secret_hash(self._id)
            if session_key_of(self._id) != loaded.key:  # a change of privilege: the row moves
                new_key = session_key_of(self._id)
        ip, agent = self.ip_address, self.user_agent
        return UnitOfWork(
            changes=changes,
            loaded=loaded,
            new_id_hash=new_id_hash,
            user_id=self._user_id,
            user_changed=self._user_id != self._base_user_id,
            new_key=new_key,
            keep_previous_id=self._keep_previous_id,
            destroy_key=self._destroy_key,
            ip_address=ip[:IP_ADDRESS_LENGTH] if ip else None,
            user_agent=agent[:USER_AGENT_LENGTH] if agent else None,
            record_activity=record_activity,
            job_id=job_id,
            lifetime=self._lifetime,
        )

    def adopt(self, saved: Saved, unit: UnitOfWork) -> None:
        """Take in what a save of *unit* stored: the row becomes this session's new base."""
        self._destroy_key = None
        if saved.expiry_moved:
            self._expiry_moved = True
        record = saved.record
        if record is None:
            return
        self._loaded = record
        if saved.action is SaveAction.TOUCHED:
            return
        stored = saved.raw
        self._live = self._still_watched(stored, unit.changes.updates)
        self._raw = stored
        self._gone = set()
        self._deltas = {}
        self._assigned = set()
        self._base_user_id = self._user_id = record.user_id
        self._id_changed = False
        self._keep_previous_id = False
        if unit.lifetime is not None:
            self._lifetime_changed = True
        self._lifetime = None
        self._ensure_stored = False

    def adopt_late(self, saved: Saved, unit: UnitOfWork, epoch: int) -> None:
        """Take in a save whose caller stopped waiting for it (an `asave()` under a timeout): the app
        may have changed the session since the save froze its unit, so nothing it did since is undone.

        - Emptied since (logout, a login as another user): nothing of the unit is this session's; a
          destruction the app asked for follows the row to where the late save left it.
        - Otherwise the base becomes what this request wrote (the loaded payload with the unit's
          changes) and the row the late save wrote, one version behind: the next save's
          compare-and-set fails, and it merges only what changed since onto the stored row (whatever
          the late save merged in is the other side's there). The identity the unit stored (id, user,
          lifetime, a moved key) is taken in, unless the app changed it again since.
        """
        record = saved.record
        if saved.expiry_moved:
            self._expiry_moved = True
        if self._epoch != epoch:
            if record is not None and self._destroy_key is not None and unit.loaded is not None:
                if self._destroy_key == unit.loaded.key:
                    self._destroy_key = record.key  # the row moved (a login): destroy it where it is
            elif record is not None and unit.loaded is None and self._destroy_key is None:
                self._destroy_key = record.key  # the late save created the row the app meant to drop
            return
        if self._destroy_key is not None and self._destroy_key == unit.destroy_key:
            self._destroy_key = None
        if record is None:
            return
        changes = unit.changes
        written = {k: v for k, v in self._raw.items() if k not in changes.removals}
        written.update(changes.updates)
        self._raw = written
        self._gone -= changes.removals
        for key, delta in changes.deltas.items():
            if key not in self._deltas:
                continue  # assigned since: a plain assignment, no delta left to carry
            left = self._deltas[key] - delta
            if left:
                self._deltas[key] = left
            else:
                del self._deltas[key]
        self._loaded = replace(record, version=record.version - 1)
        self._base_user_id = record.user_id
        if unit.new_id_hash is not None and self._id is not None and secret_hash(self._id) == unit.new_id_hash:
            self._id_changed = False  # the id the unit stored is still this session's
            self._keep_previous_id = False
        if unit.lifetime is not None and self._lifetime == unit.lifetime:
            self._lifetime, self._lifetime_changed = None, True
        self._ensure_stored = False

    # -- a reload: this request's changes onto the stored session ---------------------------------------

    def _refresh(self, fresh: Session | None) -> None:
        if fresh is None:
            # Gone (logged out, revoked, expired, or cut off by a login): reads see a fresh, empty
            # session; a save is refused, as for any request that loaded it before (its cookie is left
            # alone: the browser may hold a newer one).
            logger.warning("reload: the session is gone (logged out, revoked, expired or cut off); starting afresh")
            self._reset()
            self._mint_id(new_key=True)
            self._detached = True
            return
        # This request's unsaved changes, three-way merged onto the fresh payload (as a save would), so
        # what another writer stored meanwhile is not later read as "removed by this request".
        changes = self._changes()
        merged = apply_changes(fresh._raw, changes) if changes else fresh._raw
        live = self._still_watched(merged, changes.updates)
        for key in changes.updates:
            if key in merged and key not in live:
                live[key] = decode_value(merged[key])  # a change of this request, in its merged form
        self._loaded = fresh._loaded
        self._raw = fresh._raw
        self._live = live
        self._gone = {k for k in changes.removals if k in self._raw}
        self._deltas = {k: d for k, d in self._deltas.items() if k in live}
        self._assigned &= live.keys() | self._gone
        if self._user_id == self._base_user_id:
            self._user_id = fresh._user_id
        self._base_user_id = fresh._base_user_id

    # -- after a save -----------------------------------------------------------------------------

    def on_saved(self, callback: Callable[[], None], label: str | None = None) -> None:
        """Run *callback* once this session has been saved (and committed); dropped if the save fails.

        Background jobs are enqueued this way, so a worker always sees what the request wrote.
        """
        self._saved_callbacks.append((callback, label or str(getattr(callback, "__qualname__", "callback"))))

    @property
    def has_saved_callbacks(self) -> bool:
        return bool(self._saved_callbacks)

    def run_saved_callbacks(self, error: BaseException | None) -> None:
        """Run (after a successful save) or drop (after a failed one) the pending `on_saved` callbacks."""
        callbacks, self._saved_callbacks = self._saved_callbacks, []
        for callback, label in callbacks:
            if error is not None:
                logger.warning("%s not run: the session was not saved (%s)", label, type(error).__name__)
                continue
            try:
                callback()
            except Exception:
                # The session is saved and the response stands; the callback (a job hand-over) failed.
                logger.exception("%s failed after the session was saved", label)
