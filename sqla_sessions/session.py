"""`Session`: the per-request mapping, its change tracking, and Laravel's Store API.

Change tracking never relies on `__setitem__`. The raw (tagged-JSON) form of every key is kept as
loaded; a value handed out by a read is remembered, and at save time each remembered value is
encoded again and compared with its raw form. So `session["cart"].append(x)` is a change, setting a
key to the value it already had is not, and a session that was only read costs no write.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Any, TypeVar, overload

from .ids import generate_session_id, hash_session_id
from .serializer import decode_value, encode_entry
from .store_api import StoreApi

if TYPE_CHECKING:
    from .handlers.base import SessionHandler
    from .records import Record, SaveAction

T = TypeVar("T")
logger = logging.getLogger("sqla_sessions")
_MISSING: Any = object()


class Session(StoreApi):
    """One request's view of a stored session: a `MutableMapping[str, Any]` plus Laravel's Store API."""

    __slots__ = (
        "_accessed",
        "_after_save_hooks",
        "_base_user_id",
        "_destroy_key",
        "_expiry_moved",
        "_flash_aged",
        "_forked_id_hash",
        "_gone",
        "_handler",
        "_id",
        "_id_changed",
        "_live",
        "_raw",
        "_record",
        "_saved_at_response",
        "_user_id",
        "ip_address",
        "user_agent",
    )

    def __init__(self, handler: SessionHandler | None = None) -> None:
        """Create a new, empty session; handlers create loaded ones with `_from_record`."""
        self._handler = handler
        self._record: Record | None = None  # the row as loaded (None: no row yet)
        self._id: str | None = None
        self._raw: dict[str, Any] = {}  # raw forms as loaded / last saved: never mutated in place
        self._live: dict[str, Any] = {}  # values set, or handed out and possibly mutated
        self._gone: set[str] = set()  # keys of _raw removed by this request
        self._user_id: str | None = None
        self._base_user_id: str | None = None
        self._id_changed = False
        self._forked_id_hash: str | None = None  # regenerate(destroy=False): the old id keeps a copy
        self._destroy_key: str | None = None  # invalidate(): the row to delete at save
        self._expiry_moved = False  # a save or touch of this request pushed expires_at forward (the cookie follows)
        self._accessed = False
        self._flash_aged = False
        self._saved_at_response = False  # set by the WSGI middleware, to warn about later changes
        self._after_save_hooks: list[tuple[Callable[[], None], str]] = []
        self.ip_address: str | None = None
        """Client address written with the next change (set by the middleware)."""
        self.user_agent: str | None = None
        """Client user agent written with the next change (set by the middleware)."""

    @classmethod
    def _from_record(
        cls, handler: SessionHandler, session_id: str | None, record: Record, raw: dict[str, Any]
    ) -> Session:
        session = cls(handler)
        session._id = session_id
        session._record = record
        session._raw = raw
        session._user_id = session._base_user_id = record.user_id
        return session

    # -- identity -------------------------------------------------------------------------------

    @property
    def id(self) -> str:
        """The session id: the cookie value. Only its hash is ever stored."""
        if self._id is None:
            if self._record is not None:
                raise RuntimeError("this session was loaded by its key (background job): its cookie id is unknown")
            self._id = generate_session_id()
        return self._id

    @property
    def key(self) -> str | None:
        """The stable server-side key background jobs address; None until the session is first stored."""
        return None if self._record is None else self._record.key

    @property
    def user_id(self) -> str | None:
        return self._user_id

    @property
    def is_new(self) -> bool:
        """True when no stored row backs this session (yet)."""
        return self._record is None

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
    def modified(self) -> bool:
        """True when saving would write something (data, user, id or deletion)."""
        return self._has_changes(*self._collect_changes())

    @modified.setter
    def modified(self, value: bool) -> None:
        """Accepted for Flask code (`session.modified = True`); changes are found by comparing values."""

    @property
    def new(self) -> bool:
        """Flask's name for `is_new`."""
        return self._record is None

    @property
    def permanent(self) -> bool:
        """Flask's flag: the cookie outlives the browser unless the config says `expire_on_close`."""
        handler = self._handler
        return not (handler is not None and handler.config.expire_on_close)

    @permanent.setter
    def permanent(self, value: bool) -> None:
        """Accepted for Flask code; the cookie lifetime comes from the config."""

    @property
    def created_at(self) -> int | None:
        return None if self._record is None else self._record.created_at

    @property
    def last_activity(self) -> int | None:
        return None if self._record is None else self._record.last_activity

    @property
    def expires_at(self) -> int | None:
        return None if self._record is None else self._record.expires_at

    # -- mapping protocol ------------------------------------------------------------------------

    def __getitem__(self, key: str) -> Any:
        self._accessed = True
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

    def __delitem__(self, key: str) -> None:
        self._accessed = True
        found = self._live.pop(key, _MISSING) is not _MISSING
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
        """Return the value of *key*, or *default* (called if it is callable, as in Laravel)."""
        try:
            return self[key]
        except KeyError:
            return default() if callable(default) else default

    def _keys(self) -> list[str]:
        raw, gone, live = self._raw, self._gone, self._live
        keys = [k for k in raw if k not in gone] if gone else list(raw)
        keys.extend(k for k in live if k not in raw)
        return keys

    # -- lifecycle -------------------------------------------------------------------------------

    def regenerate(self, destroy: bool = True) -> None:
        """Give the session a new id (and a new CSRF token), keeping its data and its stable key.

        With *destroy* (the default) the old id stops working at save. With `destroy=False` the old
        id keeps a copy of the session as it was stored, as Laravel's `migrate(false)` does.
        """
        if not destroy and self._record is not None and self._forked_id_hash is None and self._id is not None:
            self._forked_id_hash = hash_session_id(self._id)
        self._id = generate_session_id()
        self._id_changed = True
        self.regenerate_token()

    def invalidate(self) -> None:
        """Drop every value and the stored session; the session continues as a new one with a new id."""
        if self._record is not None:
            self._destroy_key = self._record.key
        self._record = None
        self._raw, self._live, self._gone = {}, {}, set()
        self._user_id = self._base_user_id = None
        self._forked_id_hash = None
        self._id = generate_session_id()
        self._id_changed = True
        self._accessed = True

    def login(self, user_id: object) -> None:
        """Attach the session to a user and regenerate its id (session fixation defence)."""
        if user_id is None:
            raise ValueError("login() needs a user id")
        self._user_id = str(user_id)
        self.regenerate()

    def logout(self) -> None:
        """Forget the user and everything in the session (invalidate)."""
        self.invalidate()

    def save(self, *, end_of_request: bool = True) -> SaveAction:
        """Persist this request's changes through the handler.

        By default this is the end of the request: flash data is aged first (once per request). To
        flush mid-request (e.g. before dispatching jobs you will wait for), pass `end_of_request=False`.
        """
        return self._require_handler().save(self, end_of_request=end_of_request)

    def reload(self) -> None:
        """Re-read the stored session, keeping this request's unsaved changes on top.

        Raises `SessionInterrupted` if the stored session is gone.
        """
        handler = self._require_handler()
        if self._record is None:
            return
        fresh = handler.load_by_key(self._record.key)
        if fresh is None:
            from .errors import SessionInterrupted

            raise SessionInterrupted("the session was destroyed since it was loaded")
        updates, removals = self._collect_changes()
        self._record = fresh._record
        self._raw = fresh._raw
        self._live = {k: v for k, v in self._live.items() if k in updates}
        self._gone = {k for k in removals if k in self._raw}
        if self._user_id == self._base_user_id:
            self._user_id = fresh._user_id
        self._base_user_id = fresh._base_user_id

    def _require_handler(self) -> SessionHandler:
        if self._handler is None:
            raise RuntimeError("this Session is not bound to a handler")
        return self._handler

    # -- what the handlers use ---------------------------------------------------------------------

    def _collect_changes(self) -> tuple[dict[str, Any], frozenset[str]]:
        """Return (raw forms of changed or added keys, removed keys); `TypeError` names a bad key."""
        raw = self._raw
        updates: dict[str, Any] = {}
        for key, value in self._live.items():
            encoded = encode_entry(key, value)
            if key not in raw or not _same(encoded, raw[key]):
                updates[key] = encoded
        return updates, frozenset(self._gone)

    def _has_changes(self, updates: Mapping[str, Any], removals: frozenset[str]) -> bool:
        """Whether a save must write: changed keys, a new user or a new id (invalidate() sets one too)."""
        return bool(updates or removals or self._id_changed or self._user_id != self._base_user_id)

    def _rebase(self, record: Record, raw: dict[str, Any], written: Mapping[str, Any]) -> None:
        """Adopt what was stored: *raw* becomes the new snapshot; keys not written are re-read lazily.

        Values this request did not change are dropped from `_live`, so a key another writer changed
        meanwhile is seen as theirs, not as a change of ours on the next save.
        """
        self._record = record
        self._raw = raw
        self._live = {k: v for k, v in self._live.items() if k in written}
        self._gone = set()
        self._base_user_id = self._user_id = record.user_id
        self._id_changed = False
        self._forked_id_hash = None
        self._destroy_key = None

    def _after_save(self, hook: Callable[[], None], label: str) -> None:
        """Run *hook* once this session has been saved successfully (jobs enqueued after the save)."""
        self._after_save_hooks.append((hook, label))

    def _run_after_save(self, error: BaseException | None) -> None:
        """Run (after a successful save) or drop (after a failed one) the pending hooks."""
        hooks, self._after_save_hooks = self._after_save_hooks, []
        for hook, label in hooks:
            if error is not None:
                logger.warning("%s not sent: the session was not saved (%s)", label, type(error).__name__)
                continue
            try:
                hook()
            except Exception:
                # The session is saved and the response stands; the job could not be handed over.
                logger.exception("%s could not be enqueued after the session was saved", label)

    def _end_request(self) -> None:
        """Age flash data, once per request however often the session is saved."""
        if not self._flash_aged:
            self._flash_aged = True
            self.age_flash_data()


def _same(a: Any, b: Any) -> bool:
    """Strict equality of raw forms: `1`, `1.0` and `True` differ (they would come back as other types)."""
    kind = type(a)
    if kind is not type(b):
        return False
    if kind is dict:
        return len(a) == len(b) and all(k in b and _same(v, b[k]) for k, v in a.items())
    if kind is list:
        return len(a) == len(b) and all(map(_same, a, b))
    return bool(a == b)
