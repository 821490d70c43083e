"""Change tracking: the session as a mapping over its payload as loaded, and the changes a save sends.

Change tracking never relies on `__setitem__`. The raw (tagged-JSON) form of every key is kept as
loaded; a value handed out by a read is remembered, and at save time each remembered value is
encoded again and compared with its raw form. So `session["cart"].append(x)` is a change, setting a
key to the value it already had is not, and a session that was only read costs no write.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any, TypeVar, overload

from .merge import NO_CHANGES, ChangeSet
from .serializer import decode_value, encode_entry, same_raw
from .state import SessionState
from .store_api import StoreApi

T = TypeVar("T")
_MISSING: Any = object()


class TrackedMapping(StoreApi, SessionState):
    """A `MutableMapping[str, Any]` that knows what this request read and wrote, under Laravel's Store API."""

    __slots__ = ()

    # -- mapping protocol ------------------------------------------------------------------------

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

    def _keys(self) -> list[str]:
        raw, gone, live = self._raw, self._gone, self._live
        keys = [k for k in raw if k not in gone] if gone else list(raw)
        keys.extend(k for k in live if k not in raw)
        return keys

    def _peek(self, key: str) -> Any:
        """The value of *key* (None if absent) without marking the session read."""
        if key in self._live:
            return self._live[key]
        return None if key in self._gone else decode_value(self._raw.get(key))

    # -- the changes a save sends --------------------------------------------------------------------

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
