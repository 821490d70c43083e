"""Tagged JSON: plain JSON plus the Python types sessions commonly hold, and nothing that can run code.

A value is turned into a JSON-ready structure ("raw") before it is stored. Types JSON lacks become a
one-key object whose key is a tag, e.g. `{"$dt": "2026-01-02T03:04:05+00:00"}`; a user dict that
happens to look like a tag is wrapped in `{"$dict": …}`, so every value round-trips to the same type.
Raw structures are also what change detection compares: a key is modified when its raw form differs
from the raw form it was loaded with.
"""

from __future__ import annotations

import base64
import binascii
import enum
import json
import math
import uuid
from collections.abc import Callable
from datetime import date, datetime, time
from decimal import Decimal, InvalidOperation
from typing import Any

__all__ = [
    "DICT_TAG",
    "SET_TAGS",
    "TAGS",
    "decode_payload",
    "decode_value",
    "dumps_payload",
    "encode_value",
    "loads_payload",
    "plain_dict",
    "same_raw",
]

_DICT = "$dict"
#: The wrapper of a user dict that would otherwise read as a tag (`{"$dict": {"$dt": "not a date"}}`).
DICT_TAG = _DICT


#: How deeply values may nest. Comparing and merging recurse too; a bound far below Python's
#: recursion limit keeps every later read, comparison and merge of a stored value safe.
MAX_DEPTH = 64
#: Ints longer than this cannot be written as JSON text (Python's 4,300-digit conversion limit).
MAX_INT_BITS = 14_000


def _encode_set(value: set[Any] | frozenset[Any], depth: int) -> list[Any]:
    # Set iteration order depends on hashing (randomised per process for str), so sort the encoded
    # items: equal sets must give equal raw forms, or every load would look like a change.
    items = [encode_value(item, depth + 1) for item in value]
    return sorted(items, key=lambda item: json.dumps(item, sort_keys=True))


_ENCODERS: dict[type, tuple[str, Callable[[Any, int], Any]]] = {
    datetime: ("$dt", lambda v, _: v.isoformat()),
    date: ("$d", lambda v, _: v.isoformat()),
    time: ("$tm", lambda v, _: v.isoformat()),
    Decimal: ("$dec", lambda v, _: str(v)),
    uuid.UUID: ("$u", lambda v, _: str(v)),
    bytes: ("$b", lambda b, _: base64.b64encode(b).decode("ascii")),
    tuple: ("$t", lambda t, depth: [encode_value(item, depth + 1) for item in t]),
    set: ("$s", _encode_set),
    frozenset: ("$fs", _encode_set),
}

_DECODERS: dict[str, Callable[[Any], Any]] = {
    "$dt": lambda s: datetime.fromisoformat(_str(s)),
    "$d": lambda s: date.fromisoformat(_str(s)),
    "$tm": lambda s: time.fromisoformat(_str(s)),
    "$dec": lambda s: Decimal(_str(s)),
    "$u": lambda s: uuid.UUID(_str(s)),
    "$b": lambda s: base64.b64decode(_str(s), validate=True),
    "$t": lambda items: tuple(decode_value(item) for item in _list(items)),
    "$s": lambda items: {decode_value(item) for item in _list(items)},
    "$fs": lambda items: frozenset(decode_value(item) for item in _list(items)),
    "$m": lambda text: _markup(text),
    _DICT: lambda d: {k: decode_value(v) for k, v in _dict(d).items()},
}


#: Every tag a one-key object may carry (a user dict that looks like one is wrapped in `$dict`).
TAGS = frozenset(_DECODERS)
#: The tags of set types, whose items are stored sorted.
SET_TAGS = frozenset(("$s", "$fs"))


def plain_dict(raw: Any) -> dict[str, Any] | None:
    """The mapping a raw dict stands for (unwrapping `$dict`), or None for tagged values and non-dicts."""
    if type(raw) is not dict:
        return None
    if len(raw) == 1:
        tag = next(iter(raw))
        if tag == _DICT:
            inner = raw[tag]
            return inner if type(inner) is dict else None
        if tag in TAGS:
            return None
    return raw


def same_raw(a: Any, b: Any) -> bool:
    """Strict equality of raw forms: `1`, `1.0` and `True` differ (they would come back as other types)."""
    if a is b:
        return True  # the same structure (a base compared with itself on the uncontended path)
    kind = type(a)
    if kind is not type(b):
        return False
    if kind is dict:
        return len(a) == len(b) and all(k in b and same_raw(v, b[k]) for k, v in a.items())
    if kind is list:
        return len(a) == len(b) and all(map(same_raw, a, b))
    return bool(a == b)


class UnsupportedValue(TypeError):
    """A value of a type the serializer refuses (carries the offending type for the message)."""


def encode_value(value: Any, depth: int = 0) -> Any:
    """Return the raw (JSON-ready) form of *value*; raise `TypeError` for anything unsupported."""
    kind = type(value)
    if kind is str or kind is bool or value is None:
        return value
    if kind is int:
        if value.bit_length() > MAX_INT_BITS:
            raise UnsupportedValue("int of more than 4,000 digits (Python refuses to print it as JSON)")
        return value
    if depth >= MAX_DEPTH:
        raise UnsupportedValue(f"value nested more than {MAX_DEPTH} levels deep")
    if kind is float:
        if not math.isfinite(value):
            raise UnsupportedValue(f"non-finite float {value!r} (JSON has no NaN or Infinity)")
        return value
    if kind is list:
        return [encode_value(item, depth + 1) for item in value]
    if kind is dict:
        out: dict[str, Any] = {}
        for k, v in value.items():
            if type(k) is not str:
                raise UnsupportedValue(f"dict key {k!r} of type {type(k).__name__} (only str keys round-trip)")
            out[k] = encode_value(v, depth + 1)
        if len(out) == 1 and next(iter(out)) in _DECODERS:
            return {_DICT: out}
        return out
    encoder = _ENCODERS.get(kind)
    if encoder is None:
        return _encode_subclass(value, kind, depth)
    tag, convert = encoder
    return {tag: convert(value, depth)}


def _encode_subclass(value: Any, kind: type, depth: int) -> Any:
    """Two kinds of subclass are stored: markupsafe's `Markup` (Flask's flash messages) keeps its type,
    and an enum member (`StrEnum`, `IntEnum`, …) is stored as its value (it reads back as the value,
    not the member). Any other subclass is refused rather than silently read back as its base type."""
    if isinstance(value, enum.Enum):
        return encode_value(value.value, depth + 1)
    if isinstance(value, str) and kind.__module__ == "markupsafe" and kind.__name__ == "Markup":
        return {"$m": str(value)}
    raise UnsupportedValue(f"value of type {kind.__module__}.{kind.__qualname__}")


def _markup(text: Any) -> Any:
    try:
        from markupsafe import Markup
    except ImportError:  # stored by an app that had it; read here as the plain string it wraps
        return _str(text)
    return Markup(_str(text))


def decode_value(raw: Any) -> Any:
    """Return the Python value for a raw structure (a fresh object: mutating it never touches *raw*)."""
    if isinstance(raw, list):
        return [decode_value(item) for item in raw]
    if isinstance(raw, dict):
        if len(raw) == 1:
            tag, inner = next(iter(raw.items()))
            decoder = _DECODERS.get(tag)
            if decoder is not None:
                try:
                    return decoder(inner)
                except (ValueError, TypeError, InvalidOperation, binascii.Error) as exc:
                    raise ValueError(f"corrupt {tag} value: {exc}") from None
        return {k: decode_value(v) for k, v in raw.items()}
    return raw


def encode_payload(data: dict[str, Any]) -> dict[str, Any]:
    """Encode every entry of a session's data; a `TypeError` names the offending key."""
    return {key: encode_entry(key, value) for key, value in data.items()}


def encode_entry(key: str, value: Any) -> Any:
    """Encode one session entry, naming *key* in the `TypeError` if its value is unsupported."""
    try:
        return encode_value(value)
    except UnsupportedValue as exc:
        raise TypeError(f"session key {key!r} cannot be stored: {exc}") from None
    except RecursionError:
        raise TypeError(f"session key {key!r} cannot be stored: value is nested too deeply or is cyclic") from None


def decode_payload(raw: dict[str, Any]) -> dict[str, Any]:
    """Decode every entry of a raw payload."""
    return {key: decode_value(value) for key, value in raw.items()}


def dumps_payload(raw: dict[str, Any]) -> bytes:
    """Serialise a raw payload to compact UTF-8 JSON bytes."""
    return json.dumps(raw, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode("utf-8")


def loads_payload(data: bytes) -> dict[str, Any]:
    """Parse stored JSON bytes into a raw payload; raise `ValueError` if it is not a JSON object."""
    try:
        raw = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise ValueError(f"payload is not valid JSON: {exc}") from None
    if not isinstance(raw, dict):
        raise ValueError(f"payload is a JSON {type(raw).__name__}, not an object")
    return raw


def _str(value: Any) -> str:
    if not isinstance(value, str):
        raise TypeError(f"expected a string, got {type(value).__name__}")
    return value


def _list(value: Any) -> list[Any]:
    if not isinstance(value, list):
        raise TypeError(f"expected a list, got {type(value).__name__}")
    return value


def _dict(value: Any) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise TypeError(f"expected an object, got {type(value).__name__}")
    return value
