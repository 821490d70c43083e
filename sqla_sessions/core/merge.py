"""The three-way merge of a save onto the stored session: pure functions, no I/O.

The definition is serial equivalence: where two requests' operations commute, the merged payload
equals running them one after the other (in commit order where the order shows); where they do not,
the last committed write wins. A save that lost its compare-and-set (another request or a job wrote
the row since this request loaded it) is merged onto what is stored now. Each side is a *raw*
payload (tagged JSON, see `serializer`): `base` is what this request loaded, `mine` what it holds
now, `theirs` what is stored now. Per key:

- unchanged by me: theirs; unchanged by them: mine;
- removed by me: removed (a removal is a change like any other, and the last write);
- changed by increment/decrement only: my net delta added to their number (a counter they removed
  restarts from 0: increments treat a missing number as 0);
- dicts on both sides: merged key by key, recursively, with the same rules (set/delete at any depth);
- lists on both sides: each side's edits replayed together (`listmerge`): appends and insertions
  of both (theirs first at one place), removals of both, items edited in place merged recursively;
  an insertion never disappears because the other side removed or replaced its neighbour or the
  item it replaced; an edit of an item the other side removed is the last write's;
- sets on both sides: their set, minus the items I removed, plus the items I added;
- anything else (strings, numbers assigned with `=`, dates, tuples, a change of type): mine, the
  last committed write.

The README's "What merges" table lists what each concurrent pair of operations stores.
`merge(base, mine, base)` is mine and `merge(base, base, theirs)` is theirs, so a save that did not
race gives exactly what the request holds.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from .listdiff import MATCH_BUDGET, Budget
from .listmerge import merge_lists
from .serializer import DICT_TAG, SET_TAGS, TAGS, plain_dict, same_raw

__all__ = ["MATCH_BUDGET", "MISSING", "NO_CHANGES", "Budget", "ChangeSet", "Number", "apply_changes", "merge_value"]


class _Missing:
    __slots__ = ()

    def __repr__(self) -> str:
        return "MISSING"


#: An absent key (on any side of a merge).
MISSING: Final[Any] = _Missing()

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
    budget = Budget()  # one for the whole save: a merge under the row lock stays short
    for key, mine in changes.updates.items():
        current = theirs.get(key, MISSING)
        ancestor = base.get(key, MISSING)
        if same_raw(current, ancestor):
            merged[key] = mine  # they left this key alone: the common, uncontended case
            continue
        result = merge_value(ancestor, mine, current, deltas.get(key), budget)
        if result is MISSING:
            merged.pop(key, None)
        else:
            merged[key] = result
    return merged


def merge_value(base: Any, mine: Any, theirs: Any, delta: Number | None = None, budget: Budget | None = None) -> Any:
    """Three-way merge of one raw value (`MISSING` on any side means the key is absent there)."""
    budget = budget or Budget()
    if delta is not None and (theirs is MISSING or _is_number(theirs)):
        return (0 if theirs is MISSING else theirs) + delta
    if same_raw(mine, base):
        return theirs
    if same_raw(theirs, base):
        return mine
    if mine is MISSING or theirs is MISSING:
        return mine  # I removed it (removal wins) or they removed what I changed (my write is the last)
    # No "both made the same change" shortcut: two requests that each pushed "x" pushed two of them,
    # also inside a dict. Lists and dicts merge by their edits; anything else is mine either way.
    if type(mine) is list and type(theirs) is list:
        return merge_lists(base if type(base) is list else [], mine, theirs, _identity, budget, _merge_items(budget))
    mine_dict, theirs_dict = plain_dict(mine), plain_dict(theirs)
    if mine_dict is not None and theirs_dict is not None:
        base_dict = plain_dict(base)
        return _wrap_dict(_merge_dicts({} if base_dict is None else base_dict, mine_dict, theirs_dict, budget))
    set_tag = _set_tag(mine)
    if set_tag is not None and _set_tag(theirs) == set_tag:
        base_items = base[set_tag] if _set_tag(base) == set_tag else []
        return {set_tag: _merge_sets(base_items, mine[set_tag], theirs[set_tag])}
    return mine


def _is_number(raw: Any) -> bool:
    kind = type(raw)
    return kind is int or kind is float


def _merge_items(budget: Budget) -> Callable[[Any, Any, Any], Any]:
    """How a list merge merges one item both sides edited in place."""
    return lambda base, mine, theirs: merge_value(base, mine, theirs, None, budget)


def _wrap_dict(merged: dict[str, Any]) -> dict[str, Any]:
    """Re-wrap a merged dict that now looks like a tag, as the serializer would have."""
    if len(merged) == 1 and next(iter(merged)) in TAGS:
        return {DICT_TAG: merged}
    return merged


def _set_tag(raw: Any) -> str | None:
    if type(raw) is dict and len(raw) == 1:
        tag = next(iter(raw))
        if tag in SET_TAGS and type(raw[tag]) is list:
            return str(tag)
    return None


def _merge_dicts(base: dict[str, Any], mine: dict[str, Any], theirs: dict[str, Any], budget: Budget) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key in (*theirs, *(k for k in mine if k not in theirs)):
        result = merge_value(base.get(key, MISSING), mine.get(key, MISSING), theirs.get(key, MISSING), None, budget)
        if result is not MISSING:
            out[key] = result
    # A key both sides removed, or that I removed and they left alone, is absent from both loops' output.
    return out


def _identity(raw: Any) -> str:
    """A hashable, exact identity for a raw item (type-strict: 1, 1.0 and true differ)."""
    kind = type(raw)
    if kind is str:
        return "s" + str(raw)
    if kind is int:
        return "i" + str(raw)
    if kind is bool or raw is None or kind is float:
        return "o" + repr(raw)
    return "j" + json.dumps(raw, sort_keys=True, separators=(",", ":"), default=repr)


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
