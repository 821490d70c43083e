"""`Session`: the per-request mapping, its change tracking, and Laravel's Store API.

A session is read and written as a dict. A save hands its store one `UnitOfWork` (what this request
changed against the payload as loaded, and the identity changes) and the session `adopt()`s what was
stored.

`Session` is built in layers, each a class over the one before and each in its own module, so a
reader holds one concern at a time while a call still costs one attribute lookup (no delegation):

- `state.SessionState`: the fields and their types, the store protocols, read-only views of the identity.
- `tracking.TrackedMapping`: the mapping protocol, what was read and written, the payload changes.
- `store_api.StoreApi`: Laravel's Store API over the mapping protocol.
- `lifecycle.SessionLifecycle`: login and logout, regenerate and invalidate, lifetimes, flash ageing.
- `saving.SessionSaving`: the unit of work, adopting what was stored, the `on_saved` callbacks.
- `Session` (here): the fields' slots and first values, loading from a row, and `save()` / `reload()`
  through the store it is bound to.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from sqlalchemy.exc import DBAPIError

from ..errors import (
    UNAVAILABLE_ERRORS,
    StoreMisconfigured,
    StoreUnavailable,
    misconfiguration,
    unavailable,
)
from .lifecycle import PERMANENT_KEY, flash_keys
from .records import Record, SaveAction
from .saving import SessionSaving
from .state import AsyncSessionStore, SessionStore
from .store_api import FLASH_KEY as _FLASH

__all__ = ["PERMANENT_KEY", "AsyncSessionStore", "Session", "SessionStore"]


class Session(SessionSaving):
    """One request's view of a stored session: a `MutableMapping[str, Any]` plus Laravel's Store API."""

    __slots__ = (
        "_accessed",
        "_assigned",
        "_async_store",
        "_base_user_id",
        "_deltas",
        "_destroy_key",
        "_detached",
        "_ensure_stored",
        "_expiry_moved",
        "_flash_aged",
        "_flash_old",
        "_flash_shown",
        "_keep_previous_id",
        "_epoch",
        "_generation",
        "_lifetime",
        "_lifetime_changed",
        "_gone",
        "_id",
        "_id_changed",
        "_live",
        "_loaded",
        "_page_shown",
        "_permanent_changed",
        "_raw",
        "_saved_callbacks",
        "_store",
        "_user_id",
        "ip_address",
        "pending_save",
        "saved_at_response",
        "user_agent",
    )

    def __init__(self, store: SessionStore | None = None) -> None:
        """Create a new, empty session; stores create loaded ones with `from_record`."""
        self._store = store
        self._async_store = None
        self._loaded = None
        self._id = None
        self._raw = {}
        self._live = {}
        self._gone = set()
        self._deltas = {}
        self._assigned = set()
        self._user_id = None
        self._base_user_id = None
        self._id_changed = False
        self._keep_previous_id = False
        self._destroy_key = None
        self._detached = False
        self._expiry_moved = False
        self._accessed = False
        self._flash_aged = False
        self._flash_old = frozenset()
        self._flash_shown = set()
        self._page_shown = False
        self._lifetime = None
        self._lifetime_changed = False
        self._ensure_stored = False
        self._permanent_changed = False
        self._generation = 0
        self._epoch = 0
        self._saved_callbacks = []
        self.pending_save = None
        """A save whose caller stopped waiting (cancelled, timed out) and that is still running: the
        next save waits for it and for what it stored to be taken in (`adopt_late`)."""
        self.saved_at_response = False
        """Set by the WSGI middleware once the response started (later changes are not saved)."""
        self.ip_address = None
        """Client address written with the next change (set by the middleware)."""
        self.user_agent = None
        """Client user agent written with the next change (set by the middleware)."""

    @classmethod
    def from_record(cls, store: SessionStore, session_id: str | None, record: Record, raw: dict[str, Any]) -> Session:
        """A session loaded from a stored row (*session_id* None: loaded by key, e.g. in a job)."""
        session = cls(store)
        session._id = session_id
        session._loaded = record
        session._raw = raw
        session._user_id = session._base_user_id = record.user_id
        if _FLASH in raw:
            session._flash_old = flash_keys(raw[_FLASH])
        return session

    def bind(self, store: SessionStore, async_store: AsyncSessionStore | None = None) -> None:
        """Route `save()`/`reload()` (and `asave()`/`areload()`) through *store* (e.g. a blocking request's lock)."""
        self._store = store
        self._async_store = async_store

    def save(self, *, end_of_request: bool = True) -> SaveAction:
        """Persist this request's changes (through the blocking request's lock, when it holds one).

        By default this is the end of the request: flash data is aged first (once per request). To
        flush mid-request (e.g. before dispatching jobs you will wait for), pass `end_of_request=False`.
        """
        store = self._require_store()
        with _unavailable_as_store_error():
            return store.save(self, end_of_request=end_of_request)

    async def asave(self, *, end_of_request: bool = True) -> SaveAction:
        """`save()` for async views: never blocks the event loop."""
        with _unavailable_as_store_error():
            if self._async_store is not None:
                return await self._async_store.save(self, end_of_request=end_of_request)
            store = self._require_store()
            return await asyncio.to_thread(lambda: store.save(self, end_of_request=end_of_request))

    def reload(self) -> None:
        """Re-read the stored session, keeping this request's unsaved changes on top.

        If the stored session is gone (logged out, revoked, expired, or cut off by a login), this
        becomes a fresh, empty session, as a request presenting a dead cookie gets.
        """
        store = self._require_store()
        if self._loaded is not None:
            with _unavailable_as_store_error():
                fresh = store.load_by_key(self._loaded.key)
            self._refresh(fresh)

    async def areload(self) -> None:
        """`reload()` for async views: never blocks the event loop."""
        if self._loaded is None:
            return
        key = self._loaded.key
        with _unavailable_as_store_error():
            if self._async_store is not None:
                fresh = await self._async_store.load_by_key(key)
            else:
                store = self._require_store()
                fresh = await asyncio.to_thread(store.load_by_key, key)
        self._refresh(fresh)


@contextmanager
def _unavailable_as_store_error() -> Iterator[None]:
    """A store the app's own save or reload cannot reach is a `StoreUnavailable` (the middlewares
    answer 503), not a SQLAlchemy error the app would turn into a 500."""
    try:
        yield
    except (*UNAVAILABLE_ERRORS, DBAPIError) as exc:
        what = misconfiguration(exc)
        if what is not None:
            raise StoreMisconfigured(f"the session store is misconfigured: {what}") from exc
        if unavailable(exc):
            raise StoreUnavailable(f"the session store is unreachable: {type(exc).__name__}") from exc
        raise
