"""The three-way merge of a save onto the stored session: pure functions, no I/O.

A save that lost its compare-and-set (another request or a job wrote the row since this request
loaded it) is merged onto what is stored now. Each side is a *raw* payload (tagged JSON, see
`serializer`): `base` is what this request loaded, `mine` what it holds now, `theirs` what is
stored now. Per key:

- unchanged by me: theirs; unchanged by them (or both made the same change): mine;
- removed by me: removed (a removal is a change like any other, and it wins over their edit);
- changed by increment/decrement only: my net delta added to their number (a counter they removed
  restarts from 0: increments treat a missing number as 0);
- dicts on both sides: merged key by key, recursively, with the same rules;
- lists on both sides: my edits replayed onto theirs — the items I removed are removed from theirs,
  the items I inserted land before the base item that followed them (appends after everything
  they appended; two requests that each pushed the same value pushed two); where both sides
  rewrote the same base items, the edits truly overlap and mine replace theirs there (their other
  edits stay). The diff is linear past a budget (one hunk between the common prefix and suffix);
- sets on both sides: their set, minus the items I removed, plus the items I added;
- anything else (strings, numbers assigned with `=`, dates, tuples, a change of type): mine, the
  last committed write.

`merge(base, mine, base)` is mine and `merge(base, base, theirs)` is theirs, so a save that did not
race gives exactly what the request holds.
"""

from __future__ import annotations

import json
from bisect import bisect_left
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from difflib import SequenceMatcher
from typing import Any, Final

from .serializer import SET_TAGS, TAGS, same_raw

__all__ = ["MATCH_BUDGET", "MISSING", "NO_CHANGES", "Budget", "ChangeSet", "Number", "apply_changes", "merge_value"]


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
        return _merge_lists(base if type(base) is list else [], mine, theirs, budget)
    mine_dict, theirs_dict = _plain_dict(mine), _plain_dict(theirs)
    if mine_dict is not None and theirs_dict is not None:
        base_dict = _plain_dict(base)
        return _wrap_dict(_merge_dicts({} if base_dict is None else base_dict, mine_dict, theirs_dict, budget))
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


#: Item comparisons one merge may spend on exact list diffs (`difflib`, quadratic), all lists of a
#: save together. Past it, lists are diffed by unique anchors (patience diff, n log n), then by their
#: common prefix and suffix: a merge under the row lock stays short whatever the payload holds.
MATCH_BUDGET = 250_000

Hunk = tuple[int, int, int, int]  # base[i1:i2] became other[j1:j2]


class Budget:
    """What is left of `MATCH_BUDGET` for one merge."""

    __slots__ = ("left",)

    def __init__(self, left: int = MATCH_BUDGET) -> None:
        self.left = left


def _hunks(base: list[str], other: list[str], budget: Budget) -> list[Hunk]:
    """The regions where *other* differs from *base*, in order (identities compared).

    A replacement of as many items as it removes is split into one-item replacements, so edits of
    different items never look like one overlap.
    """
    out: list[Hunk] = []
    for i1, i2, j1, j2 in _diff(base, other, 0, len(base), 0, len(other), budget):
        if i2 - i1 == j2 - j1:
            pairs = zip(range(i1, i2), range(j1, j2), strict=True)
            out.extend((i, i + 1, j, j + 1) for i, j in pairs if base[i] != other[j])
        else:
            out.append((i1, i2, j1, j2))
    return out


def _diff(base: list[str], other: list[str], b1: int, b2: int, o1: int, o2: int, budget: Budget) -> list[Hunk]:
    """The differing regions of base[b1:b2] and other[o1:o2]."""
    while b1 < b2 and o1 < o2 and base[b1] == other[o1]:
        b1, o1 = b1 + 1, o1 + 1
    while b1 < b2 and o1 < o2 and base[b2 - 1] == other[o2 - 1]:
        b2, o2 = b2 - 1, o2 - 1
    if b1 == b2 and o1 == o2:
        return []
    if b1 == b2 or o1 == o2:
        return [(b1, b2, o1, o2)]  # a pure insertion or removal
    cost = (b2 - b1) * (o2 - o1)
    if cost <= budget.left:
        budget.left -= cost
        matcher = SequenceMatcher(None, base[b1:b2], other[o1:o2], autojunk=False)
        opcodes = matcher.get_opcodes()
        return [(b1 + i1, b1 + i2, o1 + j1, o1 + j2) for tag, i1, i2, j1, j2 in opcodes if tag != "equal"]
    anchors = _unique_anchors(base, other, b1, b2, o1, o2)
    if not anchors:
        return [(b1, b2, o1, o2)]  # nothing to anchor on (a list of repeated items): one region
    out: list[Hunk] = []
    for i, j in anchors:
        out.extend(_diff(base, other, b1, i, o1, j, budget))
        b1, o1 = i + 1, j + 1
    out.extend(_diff(base, other, b1, b2, o1, o2, budget))
    return out


def _unique_anchors(base: list[str], other: list[str], b1: int, b2: int, o1: int, o2: int) -> list[tuple[int, int]]:
    """Items that occur once on each side, matched in order (the longest increasing run): patience diff."""
    seen_base = Counter(base[b1:b2])
    seen_other = Counter(other[o1:o2])
    where = {other[j]: j for j in range(o1, o2) if seen_other[other[j]] == 1}
    pairs = [(i, where[base[i]]) for i in range(b1, b2) if seen_base[base[i]] == 1 and base[i] in where]
    # Longest increasing subsequence of the other-side positions (patience sorting).
    tails: list[int] = []  # index into pairs of the smallest tail of each run length
    tail_values: list[int] = []  # their other-side positions, increasing
    previous: list[int] = [-1] * len(pairs)
    for n, (_, j) in enumerate(pairs):
        length = bisect_left(tail_values, j)
        if length > 0:
            previous[n] = tails[length - 1]
        if length == len(tails):
            tails.append(n)
            tail_values.append(j)
        else:
            tails[length] = n
            tail_values[length] = j
    run: list[tuple[int, int]] = []
    n = tails[-1] if tails else -1
    while n >= 0:
        run.append(pairs[n])
        n = previous[n]
    return run[::-1]


def _merge_lists(base: list[Any], mine: list[Any], theirs: list[Any], budget: Budget) -> list[Any]:
    """Replay my edits of *base* (removals, insertions, one-item replacements) onto *theirs*."""
    base_ids = [_identity(item) for item in base]
    my_hunks = _hunks(base_ids, [_identity(item) for item in mine], budget)
    their_hunks = _hunks(base_ids, [_identity(item) for item in theirs], budget)

    # Where base item i is in theirs: its position if they kept it (or replaced it one for one), else
    # the start of what they put in its place; len(theirs) past the end. Monotone in i.
    position: list[int] = []
    kept: set[int] = set()  # base items they kept as they were
    replaced: set[int] = set()  # base items they replaced one for one (an edit of that item)
    i = j = 0
    for k1, k2, l1, l2 in (*their_hunks, (len(base), len(base), len(theirs), len(theirs))):
        while i < k1:
            position.append(j)
            kept.add(i)
            i, j = i + 1, j + 1
        if k2 - k1 == 1 and l2 - l1 == 1:
            position.append(l1)
            replaced.add(k1)
        else:
            position.extend([l1] * (k2 - k1))
        i, j = k2, l2
    position.append(len(theirs))

    dropped: set[int] = set()  # positions in theirs that my edits remove
    landing: dict[int, list[Any]] = {}  # position in theirs -> my items inserted before it
    for i1, i2, j1, j2 in my_hunks:
        for index in range(i1, i2):
            if index in kept or index in replaced:
                # I removed or rewrote this item: gone from theirs too (if they edited it as well,
                # the edits truly overlap, and mine is the last write).
                dropped.add(position[index])
        if j1 < j2:
            if i2 - i1 == 1 and j2 - j1 == 1:
                landing.setdefault(position[i1], []).append(mine[j1])  # my edit of an item: in its place
            else:
                landing.setdefault(position[i2], []).extend(mine[j1:j2])  # before the next base item
    out: list[Any] = []
    for index, item in enumerate(theirs):
        out.extend(landing.get(index, ()))
        if index not in dropped:
            out.append(item)
    out.extend(landing.get(len(theirs), ()))
    return out
