"""`Session`: the per-request mapping, its change tracking, and Laravel's Store API.

Change tracking never relies on `__setitem__`. The raw (tagged-JSON) form of every key is kept as
loaded; a value handed out by a read is remembered, and at save time each remembered value is
encoded again and compared with its raw form. So `session["cart"].append(x)` is a change, setting a
key to the value it already had is not, and a session that was only read costs no write.

A save hands the store one `UnitOfWork` (`unit_of_work()`): the payload change set against the
payload as loaded (the base of the three-way merge, see `merge`), the identity changes (new id,
user, a change of privilege, a kept previous id, a deletion) and the client facts. The store writes it and the
session `adopt()`s what was stored.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import replace
from datetime import timedelta
from typing import TYPE_CHECKING, Any, Protocol, TypeVar, overload

from sqlalchemy.exc import DBAPIError

from .errors import (
    UNAVAILABLE_ERRORS,
    SessionInterrupted,
    StoreMisconfigured,
    StoreUnavailable,
    misconfiguration,
    unavailable,
)
from .ids import generate_session_key, new_session_id, secret_hash, session_key_of
from .merge import NO_CHANGES, ChangeSet, Number, apply_changes
from .records import Record, SaveAction
from .schema import IP_ADDRESS_LENGTH, USER_AGENT_LENGTH, USER_ID_LENGTH
from .serializer import decode_value, encode_entry, same_raw
from .store_api import FLASH_KEY as _FLASH
from .store_api import TOKEN_KEY as _TOKEN
from .store_api import StoreApi
from .unit import JOBS_KEY, Saved, UnitOfWork

#: Where Flask keeps `session.permanent` in the session itself (its cookie sessions and Flask-Session do too).
PERMANENT_KEY = "_permanent"

if TYPE_CHECKING:
    from .config import SessionConfig

T = TypeVar("T")
logger = logging.getLogger("sqla_sessions")
_MISSING: Any = object()


class SessionStore(Protocol):
    """Where a session saves and reloads: its handler, or the blocking request holding its lock."""

    @property
    def config(self) -> SessionConfig: ...

    def save(self, session: Session, *, end_of_request: bool = False, record_activity: bool = True) -> SaveAction:
        """Persist the session's changes (see `SessionHandler.save`)."""

    def load_by_key(self, key: str) -> Session | None:
        """The live session with this stable key, or None."""


class AsyncSessionStore(Protocol):
    """The async counterpart a web integration binds for `asave()` / `areload()`."""

    async def save(self, session: Session, *, end_of_request: bool = False) -> SaveAction:
        """Persist the session's changes without blocking the event loop."""

    async def load_by_key(self, key: str) -> Session | None:
        """The live session with this stable key, or None."""


class Session(StoreApi):
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
        self._async_store: AsyncSessionStore | None = None
        self._loaded: Record | None = None  # the row as loaded or last saved (None: no row yet)
        self._id: str | None = None
        self._raw: dict[str, Any] = {}  # raw forms as loaded / last saved: never mutated in place
        self._live: dict[str, Any] = {}  # values set, or handed out and possibly mutated
        self._gone: set[str] = set()  # keys of _raw removed by this request
        self._deltas: dict[str, Number] = {}  # keys changed by increment/decrement only: their net delta
        self._assigned: set[str] = set()  # keys set or deleted since the base: an increment of them is no delta
        self._user_id: str | None = None
        self._base_user_id: str | None = None
        self._id_changed = False
        self._keep_previous_id = False  # regenerate(destroy=False): the id until now keeps working
        self._destroy_key: str | None = None  # invalidate(): the row to delete at save
        self._detached = False  # reload() found the session gone: reads give a fresh one, saves are refused
        self._expiry_moved = False  # a save or touch of this request pushed expires_at forward (the cookie follows)
        self._accessed = False
        self._flash_aged = False
        self._flash_old: frozenset[str] = frozenset()  # flash keys a previous request left to show in this one
        self._flash_shown: set[str] = set()  # those of them this request read
        self._page_shown = False  # this request rendered an HTML page (every flash value counts as shown)
        self._lifetime: tuple[int | None, int | None] | None = None  # set_lifetime() in this request
        self._lifetime_changed = False  # a save of this request stored a new lifetime (the cookie follows)
        self._ensure_stored = False
        self._permanent_changed = False  # the app set `permanent` to another value in this request
        self._generation = 0  # changes of privilege and invalidations in this request
        self._epoch = 0  # times the session was emptied in this request (see adopt_late)
        self._saved_callbacks: list[tuple[Callable[[], None], str]] = []
        self.pending_save: asyncio.Future[None] | None = None
        """A save whose caller stopped waiting (cancelled, timed out) and that is still running: the
        next save waits for it and for what it stored to be taken in (`adopt_late`)."""
        self.saved_at_response = False
        """Set by the WSGI middleware once the response started (later changes are not saved)."""
        self.ip_address: str | None = None
        """Client address written with the next change (set by the middleware)."""
        self.user_agent: str | None = None
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
            session._flash_old = _flash_keys(raw[_FLASH])
        return session

    def bind(self, store: SessionStore, async_store: AsyncSessionStore | None = None) -> None:
        """Route `save()`/`reload()` (and `asave()`/`areload()`) through *store* (e.g. a blocking request's lock)."""
        self._store = store
        self._async_store = async_store

    # -- identity -------------------------------------------------------------------------------

    @property
    def id(self) -> str:
        """The session id: the cookie value. Only its hash is ever stored."""
        if self._id is None:
            if self._loaded is not None:
                raise RuntimeError("this session was loaded by its key (background job): its cookie id is unknown")
            self._id = new_session_id(generate_session_key())
        return self._id

    @property
    def key(self) -> str | None:
        """The server-side key background jobs address; None until the session is first stored.

        It is the first part of the session id, so the cookie names the row. It changes only at a
        change of privilege (`login()`, `change_privilege()`), which cuts off everything that addressed
        the session by its previous key.
        """
        return None if self._loaded is None else self._loaded.key

    @property
    def user_id(self) -> str | None:
        return self._user_id

    @property
    def is_new(self) -> bool:
        """True when no stored row backs this session (yet)."""
        return self._loaded is None

    @property
    def accessed(self) -> bool:
        """True once the data was read or written (a response then varies by cookie)."""
        return self._accessed

    @accessed.setter
    def accessed(self, value: bool) -> None:  # Flask's request context sets it on every `flask.session`
        self._accessed = bool(value)

    def mark_accessed(self) -> None:
        """Flag the session as read (Starlette's `request.session` calls this)."""
        self._accessed = True

    @property
    def id_changed(self) -> bool:
        """True when the id changed in this request (regenerate, login, invalidate): a cookie is due."""
        return self._id_changed

    @property
    def invalidated(self) -> bool:
        """True when invalidate()/logout() dropped the stored session in this request."""
        return self._destroy_key is not None

    @property
    def generation(self) -> int:
        """How many changes of privilege (login, `change_privilege`) or invalidations this request made.

        Work bound to the session before one of them (a job sent earlier in the request) must not
        reach the session after it: `sqla_sessions.dramatiq` drops such a job.
        """
        return self._generation

    @property
    def expiry_moved(self) -> bool:
        """True when a save or touch of this request pushed the expiry forward (the cookie follows)."""
        return self._expiry_moved

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

    @property
    def new(self) -> bool:
        """Flask's name for `is_new`."""
        return self._loaded is None

    @property
    def permanent(self) -> bool:
        """Flask's flag, False by default. True for a session with a lifetime of its own (remember-me:
        `login(..., remember=True)`, `set_lifetime(idle=...)`) or one the app made permanent
        (`session.permanent = True`, stored with the session under Flask's own key, `_permanent`).

        A permanent session's cookie outlives the browser even with `expire_on_close`; any other
        session's cookie is the config's (until its expiry, or the browser's close with
        `expire_on_close`). Flask-Login's `SESSION_PROTECTION = "strong"` logs a session that is not
        permanent out when its client (address, user agent) changes, and only marks a permanent one
        not fresh.
        """
        return self.lifetime[0] is not None or self._peek(PERMANENT_KEY) is True

    @permanent.setter
    def permanent(self, value: bool) -> None:
        """True: stored with the session (a flag alone does not create a row). False: the flag goes,
        and so does an idle lifetime of its own (the user is no longer remembered)."""
        if bool(value) != self.permanent:
            self._permanent_changed = True
        if value:
            if self._peek(PERMANENT_KEY) is not True:
                self[PERMANENT_KEY] = True
            return
        if PERMANENT_KEY in self:
            del self[PERMANENT_KEY]
        if self.lifetime[0] is not None:
            self.set_lifetime(None, self.lifetime[1])

    @property
    def permanent_changed(self) -> bool:
        """True when the app made the session permanent, or no longer, in this request (a cookie is due)."""
        return self._permanent_changed

    def _peek(self, key: str) -> Any:
        """The value of *key* (None if absent) without marking the session read."""
        if key in self._live:
            return self._live[key]
        return None if key in self._gone else decode_value(self._raw.get(key))

    @property
    def created_at(self) -> int | None:
        return None if self._loaded is None else self._loaded.created_at

    @property
    def last_activity(self) -> int | None:
        return None if self._loaded is None else self._loaded.last_activity

    @property
    def expires_at(self) -> int | None:
        return None if self._loaded is None else self._loaded.expires_at

    @property
    def lifetime(self) -> tuple[int | None, int | None]:
        """This session's own (idle, absolute) lifetime in seconds; None for either: the config's."""
        if self._lifetime is not None:
            return self._lifetime
        loaded = self._loaded
        return (None, None) if loaded is None else (loaded.idle_lifetime, loaded.absolute_lifetime)

    def set_lifetime(self, idle: int | timedelta | None = None, absolute: int | timedelta | None = None) -> None:
        """Give this session a lifetime of its own, stored on its row (both None: back to the config's).

        *idle* replaces the config's sliding `lifetime`, *absolute* its `absolute_lifetime` (a cap
        since creation); seconds or a `timedelta`. It takes effect at the next save, and the cookie
        follows. A lifetime of 0 or less ends the session at that save (Django's past `set_expiry`).
        """
        self._lifetime = (_seconds(idle, "idle"), _seconds(absolute, "absolute"))
        self._accessed = True

    @property
    def lifetime_changed(self) -> bool:
        """True when a save of this request stored a new lifetime (a cookie is due, persistent or not)."""
        return self._lifetime_changed

    def ensure_stored(self) -> None:
        """Store this session at its next save even if it holds nothing (Django's `create()`).

        Sessions are otherwise created lazily: a request that writes nothing leaves no row.
        """
        self._ensure_stored = True

    # -- mapping protocol ------------------------------------------------------------------------

    def __getitem__(self, key: str) -> Any:
        self._accessed = True
        if self._flash_old and key in self._flash_old:
            self._flash_shown.add(key)  # read: shown to the user, so it may go at the end of the request
        live = self._live
        if key in live:
            return live[key]
        if key in self._raw and key not in self._gone:
            raw = self._raw[key]
            if type(raw) is not list and type(raw) is not dict:
                return raw  # str, int, float, bool, None: immutable, nothing to watch
            value = live[key] = decode_value(raw)
            return value
        raise KeyError(key)

    def __setitem__(self, key: str, value: Any) -> None:
        if type(key) is not str:
            raise TypeError(f"session keys must be str, not {type(key).__name__}")
        self._accessed = True
        self._live[key] = value
        self._gone.discard(key)
        self._assigned.add(key)
        if self._deltas:
            self._deltas.pop(key, None)  # a plain assignment: the last write wins, not a delta

    def __delitem__(self, key: str) -> None:
        self._accessed = True
        found = self._live.pop(key, _MISSING) is not _MISSING
        self._assigned.add(key)
        if self._deltas:
            self._deltas.pop(key, None)
        if key in self._raw and key not in self._gone:
            self._gone.add(key)
            found = True
        if not found:
            raise KeyError(key)

    def __contains__(self, key: object) -> bool:
        self._accessed = True
        return key in self._live or (key in self._raw and key not in self._gone)

    def __iter__(self) -> Iterator[str]:
        self._accessed = True
        return iter(self._keys())

    def __len__(self) -> int:
        self._accessed = True
        return len(self._keys())

    def __repr__(self) -> str:
        state = "new" if self.is_new else f"key={self.key}"
        return f"<Session {state} keys={self._keys()!r}>"

    @overload
    def get(self, key: str, /) -> Any: ...
    @overload
    def get(self, key: str, /, default: T) -> Any | T: ...
    def get(self, key: str, /, default: Any = None) -> Any:
        """Return the value of *key*, or *default* (returned as is, callable or not: the `Mapping` contract)."""
        try:
            return self[key]
        except KeyError:
            return default

    def get_or_call(self, key: str, default: Callable[[], T]) -> Any | T:
        """Laravel's `get($key, fn)`: the value of *key*, or `default()` when it is absent (not stored)."""
        try:
            return self[key]
        except KeyError:
            return default()

    def increment(self, key: str, amount: int | float = 1) -> Any:
        """Add *amount* to a number (0 if missing) and return the result.

        Concurrent increments compose: a save that lost a race adds this request's net delta to the
        number stored now (a plain `session[key] = n` is a last-writer-wins assignment instead).
        """
        counts_as_delta = key not in self._assigned
        before = self._deltas.get(key, 0)
        value = super().increment(key, amount)  # assigns
        if counts_as_delta and type(amount) in (int, float) and type(value) in (int, float):
            self._assigned.discard(key)
            self._deltas[key] = before + amount
        return value

    def clear(self) -> None:
        """Remove every key; a logged-in session is logged out (invalidated), as Flask's `session.clear()` means."""
        if self._user_id is not None:
            self.invalidate()
            return
        for key in self._keys():
            if key != JOBS_KEY:  # bookkeeping of exactly-once jobs, not the app's data
                del self[key]
        self._accessed = True

    def flush(self) -> None:
        """Remove every key; a logged-in session is logged out (invalidated), as Django's `flush()` does."""
        self.clear()

    def _keys(self) -> list[str]:
        raw, gone, live = self._raw, self._gone, self._live
        keys = [k for k in raw if k not in gone] if gone else list(raw)
        keys.extend(k for k in live if k not in raw)
        return keys

    # -- lifecycle -------------------------------------------------------------------------------

    def regenerate(self, destroy: bool = True) -> None:
        """Give the session a new id (and a new CSRF token), keeping its data and its key.

        With *destroy* (the default) every earlier id stops working at save. With `destroy=False` the
        id the session had until now keeps reaching it, the same row and data (requests in flight
        with the old cookie, other tabs), until the next regeneration; unlike Laravel's
        `migrate(false)`, whose old id keeps a copy that drifts apart. Either way requests and jobs
        that hold the session by its key still reach it; for a change of privilege use
        `change_privilege()` (which `login()` calls), which ends every earlier id.
        """
        # Only the id the browser holds (this request's first change of id) may stay valid: after a
        # login, or a regenerate() meant to end it, an earlier id is never kept.
        self._keep_previous_id = not destroy and self._loaded is not None and not self._id_changed
        self._mint_id(new_key=False)
        self._id_changed = True
        self._renew_token()

    def _mint_id(self, *, new_key: bool) -> None:
        """A new id (a new secret) naming the row this session will be stored at.

        The cookie names the row, so the row moves when the key does: at a change of privilege.
        """
        if new_key:
            key = generate_session_key()
        elif self._id is not None:
            key = session_key_of(self._id)
        elif self._loaded is not None:
            key = self._loaded.key
        else:
            key = generate_session_key()
        self._id = new_session_id(key)

    def change_privilege(self) -> None:
        """Mark a change of privilege (sudo mode, a new role): regenerate, and cut off the previous session.

        At save the stored session moves to a new key. Whatever loaded it before (an in-flight
        request, a `reload()`, a job enqueued earlier) can no longer read or write it: their saves
        are refused with `SessionInterrupted`, their reloads give a fresh session, their jobs are
        dropped.
        """
        self._mint_id(new_key=True)
        self._id_changed = True
        self._keep_previous_id = False  # every earlier id ends with a change of privilege
        self._renew_token()
        self._generation += 1

    def _renew_token(self) -> None:
        """A new CSRF token, if the session has one: a session without one gets it on first use (`token()`)."""
        if _TOKEN in self._live or (_TOKEN in self._raw and _TOKEN not in self._gone):
            self.regenerate_token()

    def invalidate(self) -> None:
        """Drop every value and the stored session; the session continues as a new one with a new id."""
        if self._loaded is not None:
            self._destroy_key = self._loaded.key
        self._reset()
        self._mint_id(new_key=True)
        self._id_changed = True
        self._generation += 1

    def login(self, user_id: object, *, remember: bool = False) -> None:
        """Attach the session to a user: a change of privilege (new id, cut off from the previous one).

        Logging in as another user than the current one starts from an empty session. *remember*
        ("remember me"): the session lives `remember_lifetime` minutes idle (and at least as long
        despite an `absolute_lifetime`), its cookie outlives the browser; one row the user can see
        among their devices and revoke, not a separate token. A login without it ends a lifetime
        the session had of its own (the user did not ask to be remembered this time).
        """
        if user_id is None:
            raise ValueError("login() needs a user id")
        user = str(user_id)
        if not user or len(user) > USER_ID_LENGTH or "\x00" in user:
            raise ValueError(f"a user id is 1 to {USER_ID_LENGTH} characters without NUL, not {user[:40]!r}")
        if self._user_id is not None and self._user_id != user:
            self.invalidate()
        self._user_id = user
        self.change_privilege()
        if remember:
            config = self._require_store().config
            remembered = config.remember_lifetime * 60
            absolute = config.absolute_lifetime_seconds
            self.set_lifetime(remembered, None if absolute is None else max(absolute, remembered))
        elif self.lifetime != (None, None):
            self.set_lifetime()

    def logout(self) -> None:
        """Forget the user and everything in the session (invalidate)."""
        self.invalidate()

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

    def _reset(self) -> None:
        self._epoch += 1
        self._loaded = None
        self._raw, self._live, self._gone, self._deltas, self._assigned = {}, {}, set(), {}, set()
        self._user_id = self._base_user_id = None
        self._keep_previous_id = False
        self._accessed = True

    def _require_store(self) -> SessionStore:
        if self._store is None:
            raise RuntimeError("this Session is not bound to a handler")
        return self._store

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

    @property
    def epoch(self) -> int:
        """How often this session was emptied in this request (invalidate, logout, a login as someone
        else, a reload that found it gone): a save frozen in another epoch is not this session's."""
        return self._epoch

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

    def _still_watched(self, stored: Mapping[str, Any], written: Mapping[str, Any]) -> dict[str, Any]:
        """The handed-out values that stay watched once *stored* becomes the base.

        An app may hold `cart = session["cart"]` across a save or a reload: a value whose stored
        form is what this request had (*written*, else the old base) stays as it is; one that was
        merged is refilled in place with the stored form; anything else is re-read lazily.
        """
        live: dict[str, Any] = {}
        for key, value in self._live.items():
            if key not in stored:
                continue
            had = written[key] if key in written else self._raw.get(key, _MISSING)
            if same_raw(stored[key], had) or _refill(value, stored[key]):
                live[key] = value
        return live

    # -- flash data: aged only by requests that showed it -----------------------------------------------

    def now(self, key: str, value: Any) -> None:
        """Store *value* for this request only (it goes at the end of this request, shown or not)."""
        super().now(key, value)
        self._flash_shown.add(key)

    def mark_page_shown(self) -> None:
        """This request rendered a page (a non-XHR HTML response to a GET): the middlewares call it.

        Flash data counts as shown then; otherwise only the flashed values the request read do, so
        an XHR poll or an asset request between a redirect and its page does not eat the message.
        """
        self._page_shown = True

    def _age_flash(self) -> None:
        if _FLASH not in self._live and not _flash_pending(self._raw.get(_FLASH)):
            return  # nothing flashed in this request, nothing left to show from earlier ones
        store = self._store
        if self._page_shown or (store is not None and store.config.flash_aging == "request"):
            self.age_flash_data()
        else:
            self.age_flash_data(shown=self._flash_shown)

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

    def _changes(self) -> ChangeSet:
        """This request's payload changes against the loaded payload (encoding every watched value)."""
        raw = self._raw
        updates: dict[str, Any] = {}
        for key, value in self._live.items():
            encoded = encode_entry(key, value)
            if key not in raw or not same_raw(encoded, raw[key]):
                updates[key] = encoded
        if not updates and not self._gone:
            return NO_CHANGES
        deltas = {k: d for k, d in self._deltas.items() if k in updates} if self._deltas else {}
        return ChangeSet(updates, frozenset(self._gone), raw, deltas)


def _flash_keys(state: Any) -> frozenset[str]:
    """The keys a stored flash state (`{"new": [...], "old": [...]}`, raw) leaves for this request to show."""
    if type(state) is not dict:
        return frozenset()
    old = state.get("old")
    return frozenset(k for k in old if type(k) is str) if type(old) is list else frozenset()


def _flash_pending(state: Any) -> bool:
    """Whether a stored flash state (raw) still names keys to age."""
    return type(state) is dict and any(type(state.get(part)) is list and state[part] for part in ("new", "old"))


def _seconds(value: int | timedelta | None, name: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, timedelta):
        return int(value.total_seconds())
    if type(value) is not int:
        raise TypeError(f"set_lifetime({name}=...) takes seconds (int) or a timedelta, not {type(value).__name__}")
    return value


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


def _refill(value: Any, raw: Any) -> bool:
    """Make the list, dict or set *value* hold the decoded *raw* in place; False if the types differ."""
    return _refill_with(value, decode_value(raw))


def _refill_with(value: Any, fresh: Any) -> bool:
    """In place, recursively: containers the app may hold inside *value* stay the same objects where
    the new value still has a container of that type at the same key (dicts) or index (lists)."""
    kind = type(value)
    if kind is not type(fresh) or kind not in (list, dict, set):
        return False
    if kind is dict:
        for key in [k for k in value if k not in fresh]:
            del value[key]
        for key, item in fresh.items():
            if key not in value or not _refill_with(value[key], item):
                value[key] = item
    elif kind is list:
        same_shape = len(value) == len(fresh)
        for index, item in enumerate(fresh):
            if not (same_shape and _refill_with(value[index], item)):
                if same_shape:
                    value[index] = item
        if not same_shape:
            value[:] = fresh
    else:
        value.clear()
        value.update(fresh)
    return True
