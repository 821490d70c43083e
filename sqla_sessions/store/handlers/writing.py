"""`Writing`: how a save becomes rows: compare-and-set on the loaded version, else a three-way merge
under the row's lock; and many concurrent saves in one statement each kind."""

from __future__ import annotations

import dataclasses
from abc import abstractmethod
from collections.abc import Callable
from typing import Any, TypeVar

from ...core.codec import CorruptPayload, PayloadCodec
from ...core.merge import apply_changes
from ...core.records import Record, SaveAction
from ...core.session import Session
from ...core.unit import Expiry, Saved, UnitOfWork, first_row, successor
from ...errors import SessionInterrupted
from .contract import Merged
from .rows import RowStore

C = TypeVar("C")


class Writing(RowStore[C]):
    """Session writes over the row primitives (`RowStore`)."""

    codec: PayloadCodec
    expiry: Expiry

    @abstractmethod
    def now(self) -> int:
        """The handler's clock in unix seconds."""

    def plan_save(
        self, session: Session, *, end_of_request: bool, record_activity: bool = True, job_id: str | None = None
    ) -> UnitOfWork | None:
        """The session's unit of work, or None when the save needs no I/O at all (the common read-only request).

        Encodes before touching the database: an unsupported value fails here, naming its key.
        """
        unit = session.unit_of_work(end_of_request=end_of_request, record_activity=record_activity, job_id=job_id)
        if unit.writes:
            return unit
        loaded = unit.loaded
        if loaded is None:
            return None
        if record_activity and self.expiry.activity_due(loaded, self.now()):
            return unit
        return None

    def write_on(self, conn: C, unit: UnitOfWork, *, held: bool = False) -> Saved:
        """Write *unit*: compare-and-set on the loaded version; after a lost race (or for a change of
        privilege), a three-way merge onto the current row under its lock.

        *held*: *conn* is a blocking request's, in the transaction holding the row's lock.
        Raises `SessionInterrupted` (nothing written) when the session is gone or the job already landed.
        """
        now = self.now()
        deleted = unit.destroy_key is not None and self._delete(conn, unit.destroy_key)
        loaded = unit.loaded
        if loaded is None:
            if unit.new_id_hash is None or unit.new_key is None:
                return Saved(SaveAction.DELETED if deleted else SaveAction.NOTHING, None, {}, False)
            record = first_row(unit, key=unit.new_key, now=now, expiry=self.expiry, dumps=self.codec.dumps)
            self._insert(conn, record)
            return Saved(SaveAction.INSERTED, record, dict(unit.changes.updates), True)
        if not unit.writes:
            return self._touch_if_due(conn, loaded, now)

        written: Merged | None = None
        action = SaveAction.UPDATED
        if unit.new_key is None:
            written = successor(
                loaded, unit.changes.base, unit, key=loaded.key, now=now, expiry=self.expiry, dumps=self.codec.dumps
            )
            if not self._update(conn, written[0], expected_version=loaded.version, now=now):
                written, action = None, SaveAction.MERGED
        if written is None:
            # Someone else saved since we loaded (or this is a change of privilege, which moves the row
            # to a new key): merge onto the current row under its lock.
            key = unit.new_key or loaded.key

            def build(current: Record) -> Merged:
                try:
                    current_raw = self.codec.loads(current.payload, current.key, current.user_id, current.version)
                except CorruptPayload as exc:
                    raise SessionInterrupted(f"the stored session became unreadable: {exc}") from None
                return successor(
                    current, current_raw, unit, key=key, now=now, expiry=self.expiry, dumps=self.codec.dumps
                )

            written = self._merge(conn, loaded.key, now, build, held=held)
            if written is None:
                if unit.new_key is None or not (unit.user_changed and unit.user_id is not None):
                    # Only a login (credentials checked in this request) may start afresh; a change of
                    # privilege without one must never bring back a session that was logged out or revoked.
                    gone = "the session was destroyed, expired or cut off by a login since it was loaded"
                    raise SessionInterrupted(f"{gone}; nothing was saved")
                # A login whose previous session ended meanwhile (the same form submitted twice, a
                # logout in another tab): it starts a session of its own, under its new id and key,
                # from what this request saw. Nothing that held the old session reaches it.
                raw = apply_changes(unit.changes.base, unit.changes)
                record = first_row(unit, key=unit.new_key, now=now, expiry=self.expiry, dumps=self.codec.dumps, raw=raw)
                self._insert(conn, record)
                return Saved(SaveAction.INSERTED, record, raw, True)
        record, raw = written
        return Saved(action, record, raw, record.expires_at != loaded.expires_at)

    @property
    def batches_writes(self) -> bool:
        """Whether concurrent saves are written with one statement (`write_many_on`); not here."""
        return False

    def batchable(self, unit: UnitOfWork) -> bool:
        """Whether `write_many_on` can write *unit* with others: a first write, changes to a loaded row
        under its own key, a touch (the saves of nearly every request). Logins, regenerations and
        touches that reseal the payload with a newer key are saved alone."""
        if unit.destroy_key is not None:
            return False
        loaded = unit.loaded
        if loaded is None:
            return unit.new_key is not None and unit.new_id_hash is not None
        return unit.new_key is None and (unit.writes or not self.codec.needs_reseal(loaded.payload))

    def write_many_on(self, conn: C, units: list[UnitOfWork]) -> list[Saved | Exception | None]:
        """Write the `batchable` units of several concurrent requests, without ever waiting for a row
        lock: the first writes with one INSERT for all (`_insert_many`), the changes with one
        compare-and-set UPDATE (`_update_many`), the touches with one more (`_touch_many`).

        Each statement commits by itself. One outcome per unit, in order: what was saved; an error
        that belongs to that request alone (a job already applied; the lost connection of its
        statement, whose outcome is then unknown: see `_each_told_its_own`); or None: not written
        here (a lost race, a row locked by another transaction, a second unit of a row already in
        the batch, a unit that is not batchable, a statement the database refused, a statement not
        sent after the connection was lost), and its request saves it alone with `write_on`
        (compare-and-set, then the merge under the lock), where its own error is raised.
        """
        outcomes: list[Saved | Exception | None] = [None] * len(units)
        now = self.now()
        inserts: dict[str, tuple[int, Record, UnitOfWork]] = {}
        changes: dict[str, tuple[int, Merged, Record]] = {}
        touches: dict[str, tuple[int, Record, Record]] = {}
        for index, unit in enumerate(units):
            if not self.batchable(unit):
                continue
            loaded = unit.loaded
            try:
                if loaded is None:
                    assert unit.new_key is not None
                    record = first_row(unit, key=unit.new_key, now=now, expiry=self.expiry, dumps=self.codec.dumps)
                    inserts[record.key] = (index, record, unit)
                elif loaded.key in changes or loaded.key in touches:
                    continue  # one write per row and statement: the others go alone, after it
                elif unit.writes:
                    written = successor(
                        loaded, unit.changes.base, unit, key=loaded.key, now=now, expiry=self.expiry,
                        dumps=self.codec.dumps,
                    )  # fmt: skip
                    changes[loaded.key] = (index, written, loaded)
                elif not self.expiry.activity_due(loaded, now):
                    outcomes[index] = Saved(SaveAction.NOTHING, None, {}, False)
                else:
                    expires_at = self.expiry.expires_at(loaded.created_at, now, loaded)
                    touched = dataclasses.replace(loaded, last_activity=now, expires_at=expires_at)
                    touches[loaded.key] = (index, touched, loaded)
            except Exception as exc:
                outcomes[index] = exc

        def insert() -> None:
            for key in self._insert_many(conn, [record for _, record, _ in inserts.values()]):
                index, record, unit = inserts[key]
                outcomes[index] = Saved(SaveAction.INSERTED, record, dict(unit.changes.updates), True)

        def change() -> None:
            for key in self._update_many(conn, [(w[0], loaded.version) for _, w, loaded in changes.values()], now):
                index, (record, raw), loaded = changes[key]
                outcomes[index] = Saved(SaveAction.UPDATED, record, raw, record.expires_at != loaded.expires_at)

        def touch() -> None:
            for key in self._touch_many(conn, [(t, loaded.version) for _, t, loaded in touches.values()], now):
                index, touched, _ = touches[key]
                outcomes[index] = Saved(SaveAction.TOUCHED, touched, {}, True)

        statements = [
            (insert, [index for index, _, _ in inserts.values()]),
            (change, [index for index, _, _ in changes.values()]),
            (touch, [index for index, _, _ in touches.values()]),
        ]
        _each_told_its_own(statements, outcomes)
        return outcomes

    def _touch_if_due(self, conn: C, record: Record, now: int) -> Saved:
        if not self.expiry.activity_due(record, now):
            return Saved(SaveAction.NOTHING, None, {}, False)
        expires_at = self.expiry.expires_at(record.created_at, now, record)
        if self.codec.needs_reseal(record.payload):
            return self._reseal(conn, record, now, expires_at)
        if not self._touch(conn, record.key, version=record.version, last_activity=now, expires_at=expires_at, now=now):
            if self._fetch(conn, record.key, now) is None:  # the rare path: tell "gone" from "written meanwhile"
                raise SessionInterrupted("the session was destroyed or expired since it was loaded")
            return Saved(SaveAction.NOTHING, None, {}, False)  # written meanwhile: that write is newer
        touched = dataclasses.replace(record, last_activity=now, expires_at=expires_at)
        return Saved(SaveAction.TOUCHED, touched, {}, True)

    def _reseal(self, conn: C, record: Record, now: int, expires_at: int) -> Saved:
        """A due touch of a row sealed with an older key (or layout): write it sealed with the newest,
        so rotating the old key out later logs nobody out who was active since."""
        raw = self.codec.loads(record.payload, record.key, record.user_id, record.version)
        version = record.version + 1
        payload = self.codec.dumps(raw, record.key, record.user_id, version)
        resealed = dataclasses.replace(
            record, payload=payload, version=version, last_activity=now, expires_at=expires_at
        )
        if not self._update(conn, resealed, expected_version=record.version, now=now):
            return Saved(SaveAction.NOTHING, None, {}, False)  # written meanwhile: that write resealed it
        return Saved(SaveAction.TOUCHED, resealed, {}, True)


def _each_told_its_own(statements: list[tuple[Callable[[], None], list[int]]], outcomes: list[Any]) -> None:
    """Run the statements of a batch in order, each committing by itself, and tell every request what
    became of its own save, whatever breaks between them.

    The `*_many` primitives raise only for a lost connection, when the statement's outcome is unknown
    (the server may have committed it before the reply was lost): its requests get that error, and
    their saves must not be written again (a compare-and-set retried against its own write would
    merge the save onto itself). The saves of the statements already run are committed and keep
    their outcomes; those of the statements not yet sent stay None: written nothing, they go alone,
    on a fresh connection, as any save the batch left.
    """
    for run, indexes in statements:
        if not indexes:
            continue  # nothing of this kind in the batch: no statement
        try:
            run()
        except Exception as exc:
            for index in indexes:
                if outcomes[index] is None:
                    outcomes[index] = exc
            return
