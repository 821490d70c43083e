"""The three-way merge of a save onto the stored session: pure functions, no I/O.

A save that lost its compare-and-set (another request or a job wrote the row since this request
loaded it) is merged onto what is stored now. Each side is a *raw* payload (tagged JSON, see
`serializer`): `base` is what this request loaded, `mine` what it holds now, `theirs` what is
stored now. Per key:

- unchanged by me: theirs; unchanged by them (or both made the same change): mine;
- removed by me: removed (a removal is a change like any other, and it wins over their edit);
- changed by increment/decrement only: my net delta added to their number;
- dicts on both sides: merged key by key, recursively, with the same rules;
- lists on both sides: my edits replayed onto theirs — the items I removed are removed from theirs,
  the items I inserted are inserted at the same place relative to the base items around them
  (appends go after everything they appended); where both sides replaced the same base items,
  the edits truly overlap and my list wins;
- sets on both sides: their set, minus the items I removed, plus the items I added;
- anything else (strings, numbers assigned with `=`, dates, tuples, a change of type): mine, the
  last committed write.

`merge(base, mine, base)` is mine and `merge(base, base, theirs)` is theirs, so a save that did not
race gives exactly what the request holds.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from difflib import SequenceMatcher
from typing import Any, Final

from .serializer import SET_TAGS, TAGS, same_raw

__all__ = ["MISSING", "NO_CHANGES", "ChangeSet", "Number", "apply_changes", "merge_value"]


class _Missing:
    __slots__ = ()

    def __repr__(self) -> str:
        return "MISSING"


#: An absent key (on any side of a merge).
MISSING: Final[Any] = _Missing()

_DICT_TAG = "$dict"

Number = int | float


@dataclass(frozen=True, slots=True)
class ChangeSet:
    """What one save changes in the payload, as the session hands it to the store (never mutated)."""

    updates: Mapping[str, Any] = field(default_factory=dict)
    """Raw forms of the keys this request set or changed."""
    removals: frozenset[str] = frozenset()
    """Keys this request removed."""
    base: Mapping[str, Any] = field(default_factory=dict)
    """The raw payload as this request loaded it (the common ancestor of a three-way merge)."""
    deltas: Mapping[str, Number] = field(default_factory=dict)
    """Keys changed by `increment`/`decrement` only: the net amount to add to the stored number."""

    def __bool__(self) -> bool:
        return bool(self.updates or self.removals)


#: The change set of a save that changes no key.
NO_CHANGES: Final = ChangeSet()


def apply_changes(theirs: Mapping[str, Any], changes: ChangeSet) -> dict[str, Any]:
    """The payload to store: *changes* merged onto the stored payload *theirs*."""
    removals = changes.removals
    merged = {k: v for k, v in theirs.items() if k not in removals} if removals else dict(theirs)
    base, deltas = changes.base, changes.deltas
    for key, mine in changes.updates.items():
        current = theirs.get(key, MISSING)
        ancestor = base.get(key, MISSING)
        if same_raw(current, ancestor):
            merged[key] = mine  # they left this key alone: the common, uncontended case
            continue
        result = merge_value(ancestor, mine, current, deltas.get(key))
        if result is MISSING:
            merged.pop(key, None)
        else:
            merged[key] = result
    return merged


def merge_value(base: Any, mine: Any, theirs: Any, delta: Number | None = None) -> Any:
    """Three-way merge of one raw value (`MISSING` on any side means the key is absent there)."""
    if delta is not None and (theirs is MISSING or _is_number(theirs)):
        return (0 if theirs is MISSING else theirs) + delta
    if same_raw(mine, base):
        return theirs
    if same_raw(theirs, base) or same_raw(mine, theirs):
        return mine
    if mine is MISSING or theirs is MISSING:
        return mine  # I removed it (removal wins) or they removed what I changed (my write is the last)
    mine_dict, theirs_dict = _plain_dict(mine), _plain_dict(theirs)
    if mine_dict is not None and theirs_dict is not None:
        base_dict = _plain_dict(base)
        return _wrap_dict(_merge_dicts({} if base_dict is None else base_dict, mine_dict, theirs_dict))
    if type(mine) is list and type(theirs) is list:
        return _merge_lists(base if type(base) is list else [], mine, theirs)
    set_tag = _set_tag(mine)
    if set_tag is not None and _set_tag(theirs) == set_tag:
        base_items = base[set_tag] if _set_tag(base) == set_tag else []
        return {set_tag: _merge_sets(base_items, mine[set_tag], theirs[set_tag])}
    return mine


def _is_number(raw: Any) -> bool:
    kind = type(raw)
    return kind is int or kind is float


def _plain_dict(raw: Any) -> dict[str, Any] | None:
    """The mapping a raw dict stands for (unwrapping `$dict`), or None for tagged values and non-dicts."""
    if type(raw) is not dict:
        return None
    if len(raw) == 1:
        tag = next(iter(raw))
        if tag == _DICT_TAG:
            inner = raw[tag]
            return inner if type(inner) is dict else None
        if tag in TAGS:
            return None
    return raw


def _wrap_dict(merged: dict[str, Any]) -> dict[str, Any]:
    """Re-wrap a merged dict that now looks like a tag, as the serializer would have."""
    if len(merged) == 1 and next(iter(merged)) in TAGS:
        return {_DICT_TAG: merged}
    return merged


def _set_tag(raw: Any) -> str | None:
    if type(raw) is dict and len(raw) == 1:
        tag = next(iter(raw))
        if tag in SET_TAGS and type(raw[tag]) is list:
            return str(tag)
    return None


def _merge_dicts(base: dict[str, Any], mine: dict[str, Any], theirs: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key in (*theirs, *(k for k in mine if k not in theirs)):
        result = merge_value(base.get(key, MISSING), mine.get(key, MISSING), theirs.get(key, MISSING))
        if result is not MISSING:
            out[key] = result
    # A key both sides removed, or that I removed and they left alone, is absent from both loops' output.
    return out


def _identity(raw: Any) -> str:
    """A hashable, exact identity for a raw item (type-strict: 1, 1.0 and true differ)."""
    return json.dumps(raw, sort_keys=True, separators=(",", ":"), default=repr) + type(raw).__name__


def _merge_sets(base: list[Any], mine: list[Any], theirs: list[Any]) -> list[Any]:
    base_ids = {_identity(item) for item in base}
    mine_ids = {_identity(item): item for item in mine}
    removed = base_ids - mine_ids.keys()
    out = {ident: item for item in theirs if (ident := _identity(item)) not in removed}
    for ident, item in mine_ids.items():
        if ident not in base_ids:
            out.setdefault(ident, item)
    # Sorted like the serializer sorts set items, so equal sets keep equal raw forms.
    return sorted(out.values(), key=lambda item: json.dumps(item, sort_keys=True))


def _merge_lists(base: list[Any], mine: list[Any], theirs: list[Any]) -> list[Any]:
    """Replay my edits of *base* (removals, insertions) onto *theirs*."""
    base_ids = [_identity(item) for item in base]
    removed: set[int] = set()  # base positions I removed
    inserted: dict[int, list[Any]] = {}  # base position -> my items inserted before it (len(base): at the end)
    my_replaced: set[int] = set()
    mine_ops = SequenceMatcher(None, base_ids, [_identity(item) for item in mine], autojunk=False).get_opcodes()
    for tag, i1, i2, j1, j2 in mine_ops:
        if tag in ("delete", "replace"):
            removed.update(range(i1, i2))
        if tag in ("insert", "replace"):
            inserted.setdefault(i2, []).extend(mine[j1:j2])
        if tag == "replace":
            my_replaced.update(range(i1, i2))

    # Where each base item still is in theirs.
    theirs_ids = [_identity(item) for item in theirs]
    position: dict[int, int] = {}
    for tag, i1, i2, j1, _j2 in SequenceMatcher(None, base_ids, theirs_ids, autojunk=False).get_opcodes():
        if tag == "equal":
            position.update(zip(range(i1, i2), range(j1, j1 + (i2 - i1)), strict=True))
        elif tag == "replace" and my_replaced.intersection(range(i1, i2)):
            return mine  # both sides rewrote the same items: a true overlap, the last write wins

    # An insertion lands before the first base item at or after its anchor that theirs still holds.
    landing: dict[int, list[Any]] = {}
    for anchor in sorted(inserted):
        at = next((position[i] for i in range(anchor, len(base)) if i in position), len(theirs))
        landing.setdefault(at, []).extend(inserted[anchor])
    dropped = {position[i] for i in removed if i in position}
    out: list[Any] = []
    for index, item in enumerate(theirs):
        out.extend(landing.get(index, ()))
        if index not in dropped:
            out.append(item)
    out.extend(landing.get(len(theirs), ()))
    return out
