"""The fields of a `Session`, declared once, the store it saves through, and views of its identity."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

from .merge import Number
from .records import Record, SaveAction

if TYPE_CHECKING:
    from ..config import SessionConfig
    from .session import Session


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


class SessionState:
    """The fields every layer of `Session` works on, typed once here, and the views of its identity.

    `Session` holds them (its `__slots__`, set in its `__init__`); every layer reads and writes them
    as plain attributes, so splitting the class costs a call nothing (no accessor, no delegation).
    """

    __slots__ = ()

    _store: SessionStore | None
    _async_store: AsyncSessionStore | None
    _loaded: Record | None  # the row as loaded or last saved (None: no row yet)
    _id: str | None
    _raw: dict[str, Any]  # raw forms as loaded / last saved: never mutated in place
    _live: dict[str, Any]  # values set, or handed out and possibly mutated
    _gone: set[str]  # keys of _raw removed by this request
    _deltas: dict[str, Number]  # keys changed by increment/decrement only: their net delta
    _assigned: set[str]  # keys set or deleted since the base: an increment of them is no delta
    _user_id: str | None
    _base_user_id: str | None
    _id_changed: bool
    _keep_previous_id: bool  # regenerate(destroy=False): the id until now keeps working
    _destroy_key: str | None  # invalidate(): the row to delete at save
    _detached: bool  # reload() found the session gone: reads give a fresh one, saves are refused
    _expiry_moved: bool  # a save or touch of this request pushed expires_at forward (the cookie follows)
    _accessed: bool
    _flash_aged: bool
    _flash_old: frozenset[str]  # flash keys a previous request left to show in this one
    _flash_shown: set[str]  # those of them this request read
    _page_shown: bool  # this request rendered an HTML page (every flash value counts as shown)
    _lifetime: tuple[int | None, int | None] | None  # set_lifetime() in this request
    _lifetime_changed: bool  # a save of this request stored a new lifetime (the cookie follows)
    _ensure_stored: bool
    _permanent_changed: bool  # the app set `permanent` to another value in this request
    _generation: int  # changes of privilege and invalidations in this request
    _epoch: int  # times the session was emptied in this request (see adopt_late)
    _saved_callbacks: list[tuple[Callable[[], None], str]]
    pending_save: asyncio.Future[None] | None
    saved_at_response: bool
    ip_address: str | None
    user_agent: str | None

    def _require_store(self) -> SessionStore:
        if self._store is None:
            raise RuntimeError("this Session is not bound to a handler")
        return self._store

    # -- identity, and what this request changed of it -------------------------------------------------

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
    def new(self) -> bool:
        """Flask's name for `is_new`."""
        return self._loaded is None

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
    def epoch(self) -> int:
        """How often this session was emptied in this request (invalidate, logout, a login as someone
        else, a reload that found it gone): a save frozen in another epoch is not this session's."""
        return self._epoch

    @property
    def permanent_changed(self) -> bool:
        """True when the app made the session permanent, or no longer, in this request (a cookie is due)."""
        return self._permanent_changed

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
    def lifetime_changed(self) -> bool:
        """True when a save of this request stored a new lifetime (a cookie is due, persistent or not)."""
        return self._lifetime_changed
