"""Laravel's session Store API in Python names, written once over the mapping protocol."""

from __future__ import annotations

import secrets
from collections.abc import Callable, Iterable, Mapping, MutableMapping
from typing import Any

FLASH_KEY = _FLASH = "_flash"
TOKEN_KEY = _TOKEN = "_token"
_PREVIOUS_URL = "_previous_url"
_MISSING: Any = object()


class StoreApi(MutableMapping[str, Any]):
    """Helpers every session gets; `Session` supplies the mapping protocol underneath."""

    __slots__ = ()

    def put(self, key: str | Mapping[str, Any], value: Any = None) -> None:
        """Set one key, or every key of a mapping."""
        if isinstance(key, Mapping):
            for k, v in key.items():
                self[k] = v
        else:
            self[key] = value

    def pull(self, key: str, default: Any = None) -> Any:
        """Return the value of *key* and remove it."""
        return self.pop(key, default)

    def has(self, *keys: str) -> bool:
        """True if every key is present and not None."""
        return all(self.get(k) is not None for k in keys)

    def has_any(self, *keys: str) -> bool:
        """True if any key is present and not None."""
        return any(self.get(k) is not None for k in keys)

    def exists(self, *keys: str) -> bool:
        """True if every key is present, even with a None value."""
        return all(k in self for k in keys)

    def missing(self, *keys: str) -> bool:
        """The opposite of `exists`."""
        return not self.exists(*keys)

    def forget(self, *keys: str) -> None:
        """Remove the given keys (absent ones are ignored)."""
        for k in keys:
            self.pop(k, None)

    def flush(self) -> None:
        """Remove every key (the stored session stays; use `invalidate()` to drop it)."""
        for k in list(self):
            del self[k]

    def push(self, key: str, value: Any) -> None:
        """Append *value* to the list stored under *key* (created if missing)."""
        current = self.get(key)
        if current is None:
            self[key] = [value]
        elif isinstance(current, list):
            current.append(value)
        else:
            raise TypeError(f"session key {key!r} holds {type(current).__name__}, not a list")

    def increment(self, key: str, amount: int | float = 1) -> Any:
        """Add *amount* to a number (0 if missing) and return the result."""
        value = self.get(key, 0) + amount
        self[key] = value
        return value

    def decrement(self, key: str, amount: int | float = 1) -> Any:
        """Subtract *amount* from a number (0 if missing) and return the result."""
        return self.increment(key, -amount)

    def remember(self, key: str, callback: Callable[[], Any]) -> Any:
        """Return the value of *key*; if it is missing or None, store and return `callback()`."""
        value = self.get(key)
        if value is None:
            value = self[key] = callback()
        return value

    def only(self, *keys: str) -> dict[str, Any]:
        """Return the given keys that are present."""
        return {k: self[k] for k in keys if k in self}

    def all_except(self, *keys: str) -> dict[str, Any]:
        """Return every key except the given ones."""
        excluded = set(keys)
        return {k: self[k] for k in list(self) if k not in excluded}

    def all(self) -> dict[str, Any]:
        """Return a dict of everything in the session."""
        return {k: self[k] for k in list(self)}

    # -- flash data: survives exactly one following request --------------------------------------

    def flash(self, key: str, value: Any = True) -> None:
        """Store *value* for this request and the next one only."""
        self[key] = value
        new, old = self._flash_lists()
        self._set_flash(_add(new, [key]), [k for k in old if k != key])

    def now(self, key: str, value: Any) -> None:
        """Store *value* for this request only."""
        self[key] = value
        new, old = self._flash_lists()
        self._set_flash(new, _add(old, [key]))

    def reflash(self) -> None:
        """Keep every flashed value for one more request."""
        new, old = self._flash_lists()
        self._set_flash(_add(new, old), [])

    def keep(self, *keys: str) -> None:
        """Keep the given flashed values for one more request."""
        new, old = self._flash_lists()
        self._set_flash(_add(new, keys), [k for k in old if k not in keys])

    def age_flash_data(self, shown: Iterable[str] | None = None) -> None:
        """End-of-request ageing: forget the old flash keys; this request's flash keys become old.

        *shown*: forget only these of the old keys (the values this request showed); the others
        stay old, for the next request that shows them.
        """
        if _FLASH not in self:
            return
        new, old = self._flash_lists()
        seen = set(old) if shown is None else set(shown)
        self.forget(*(k for k in old if k in seen))
        self._set_flash([], _add([k for k in old if k not in seen and k not in new], new))

    def _flash_lists(self) -> tuple[list[str], list[str]]:
        state = self.get(_FLASH)
        if not isinstance(state, dict):
            return [], []
        new, old = state.get("new", []), state.get("old", [])
        return (list(new) if isinstance(new, list) else []), (list(old) if isinstance(old, list) else [])

    def _set_flash(self, new: list[str], old: list[str]) -> None:
        # Emptied, the state stays (empty lists) rather than going: a removal would beat another
        # request's concurrent flash() in the merge, and leave its value behind for good.
        if new or old or _FLASH in self:
            self[_FLASH] = {"new": new, "old": old}

    # -- CSRF token and previous URL --------------------------------------------------------------

    def token(self) -> str:
        """Return the session's CSRF token, creating it on first use."""
        token = self.get(_TOKEN)
        if not isinstance(token, str):
            token = self.regenerate_token()
        return token

    def regenerate_token(self) -> str:
        """Replace the CSRF token and return the new one."""
        token = self[_TOKEN] = secrets.token_urlsafe(30)
        return token

    @property
    def previous_url(self) -> str | None:
        """The last GET page URL the middleware recorded (Laravel's `previousUrl()`)."""
        value = self.get(_PREVIOUS_URL)
        return value if isinstance(value, str) else None

    @previous_url.setter
    def previous_url(self, url: str | None) -> None:
        if url is None:
            self.pop(_PREVIOUS_URL, None)
        else:
            self[_PREVIOUS_URL] = url


def _add(items: list[str], extra: Iterable[str]) -> list[str]:
    out = list(items)
    out.extend(k for k in extra if k not in out)
    return out
