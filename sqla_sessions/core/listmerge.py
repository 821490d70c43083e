"""The three-way merge of one list: each side's edits of the common base, replayed together.

A side's edits are read from a diff of its list against the base (`listdiff`): which base items it
kept, removed or edited inside, and which new items it inserted into which *gap* (gap g is just
before base item g; gap len(base) is the end). The merged list is built from the base, gap by gap:

    for each gap g: their insertions at g, then mine;
                    then what replaced base item g (theirs, then mine); then base item g, if it survives

so the result is what running their save and then mine gives, each edit applied to the item (or
the gap) it was made at — serial equivalence where the edits commute. Rules, per base item:

- kept by both: kept; removed by either: removed (both removing one item removes it once — unless
  the list holds other copies of that value, untouched or inserted by them: two requests that each
  removed one "x" of ["x", "x"] removed two, as `lst.remove("x")` one after the other would; and a
  removal that meets the other side's in-place edit of an item with untouched twins takes a twin);
- an item replaced by a different value (`lst[i] = v`, a removal then an insertion) is a removal
  of the old item plus an insertion where it was: the insertion survives whatever the other side
  did to the old item (removed it, or replaced it too: then both new items stay, theirs first);
- an item edited inside (a dict, list or set changed in place, same type) is an edit: edits of one
  item by both sides merge recursively (`merge_value`); an edit of an item the other side removed
  does not commute, and the last committed write wins (mine: kept with my edit, or removed);
- at the end of the list, an insertion that replaced the last item(s) reads as pop-then-push: it
  lands after everything they appended, as two plain appends would.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .listdiff import Budget, hunks
from .serializer import SET_TAGS, plain_dict

__all__ = ["merge_lists"]

#: Pairing edited containers inside one region of a diff costs its two lengths multiplied; past this,
#: the region's items are removals and insertions (a save that rewrote hundreds of dicts at once).
_PAIRING_LIMIT = 4_096

ValueMerge = Callable[[Any, Any, Any], Any]


@dataclass(slots=True)
class _Edits:
    """One side's edits of the base list."""

    removed: set[int] = field(default_factory=set)
    edited: dict[int, Any] = field(default_factory=dict)  # base index -> the item edited in place
    inserted: dict[int, list[Any]] = field(default_factory=dict)  # gap -> new items, in order
    in_place: dict[int, list[Any]] = field(default_factory=dict)  # base index -> new items where it was

    def insert(self, gap: int, items: list[Any]) -> None:
        if items:
            self.inserted.setdefault(gap, []).extend(items)

    def replace(self, index: int, items: list[Any]) -> None:
        if items:
            self.in_place.setdefault(index, []).extend(items)


def merge_lists(
    base: list[Any],
    mine: list[Any],
    theirs: list[Any],
    identity: Callable[[Any], str],
    budget: Budget,
    merge: ValueMerge,
) -> list[Any]:
    """My edits of *base* and theirs, replayed together (theirs first where both insert at one gap)."""
    base_ids = [identity(item) for item in base]
    my_edits = _edits(base, base_ids, mine, identity, budget)
    their_edits = _edits(base, base_ids, theirs, identity, budget)
    _separate_twins(base_ids, my_edits, their_edits, identity)
    out: list[Any] = []
    for index in range(len(base) + 1):
        out.extend(their_edits.inserted.get(index, ()))
        out.extend(my_edits.inserted.get(index, ()))
        if index == len(base):
            break
        out.extend(their_edits.in_place.get(index, ()))
        out.extend(my_edits.in_place.get(index, ()))
        mine_edit, their_edit = my_edits.edited.get(index), their_edits.edited.get(index)
        if mine_edit is not None:
            out.append(merge(base[index], mine_edit, their_edit) if their_edit is not None else mine_edit)
        elif index in my_edits.removed:
            continue  # my removal is the last write (over their edit too)
        elif their_edit is not None:
            out.append(their_edit)
        elif index not in their_edits.removed:
            out.append(base[index])
    return out


def _edits(
    base: list[Any], base_ids: list[str], other: list[Any], identity: Callable[[Any], str], budget: Budget
) -> _Edits:
    """What *other* did to *base*: removals, in-place edits of containers, insertions by gap."""
    edits = _Edits()
    other_ids = [identity(item) for item in other]
    for i1, i2, j1, j2 in hunks(base_ids, other_ids, budget):
        b, o = i1, j1
        for pb, po in (*_edited_pairs(base, other, i1, i2, j1, j2), (i2, j2)):
            _replaced(edits, base_ids, other, other_ids, b, pb, o, po, len(base))
            if pb < i2:
                edits.edited[pb] = other[po]
            b, o = pb + 1, po + 1
    return edits


def _replaced(
    edits: _Edits,
    base_ids: list[str],
    other: list[Any],
    other_ids: list[str],
    b: int,
    pb: int,
    o: int,
    po: int,
    end: int,
) -> None:
    """base[b:pb] became other[o:po] (no container edited in place there)."""
    if pb - b == po - o:  # item for item: each one that differs is replaced where it stands
        for i, j in zip(range(b, pb), range(o, po), strict=True):
            if base_ids[i] != other_ids[j]:
                edits.removed.add(i)
                if i + 1 == end:
                    edits.insert(end, [other[j]])  # the last item: pop, then push
                else:
                    edits.replace(i, [other[j]])
        return
    edits.removed.update(range(b, pb))
    if b == pb or pb == end:
        edits.insert(pb, other[o:po])  # a plain insertion, or a run popped off the end and pushed
    else:
        edits.replace(b, other[o:po])


def _kind(raw: Any) -> str | None:
    """'list', 'dict' or a set tag for a raw container that can be edited in place; None otherwise."""
    kind = type(raw)
    if kind is list:
        return "list"
    if plain_dict(raw) is not None:
        return "dict"
    tag = next(iter(raw)) if kind is dict and len(raw) == 1 else None
    return tag if tag in SET_TAGS and type(raw[tag]) is list else None  # a date, a tuple...: a value


def _likeness(old: Any, new: Any) -> int:
    """How much of *old* an edit left in *new* (entries or items in common); 0: not an edit of it."""
    kind = _kind(old)
    if kind is None or kind != _kind(new):
        return 0
    if kind == "list" or kind in SET_TAGS:
        old_items = old if kind == "list" else old[kind]
        new_items = new if kind == "list" else new[kind]
        common = Counter(map(repr, old_items)) & Counter(map(repr, new_items))
        return 1 + sum(common.values())  # an emptied or filled container is still an edit of it
    old_map, new_map = plain_dict(old) or {}, plain_dict(new) or {}
    return 1 + sum(1 for key, value in old_map.items() if key in new_map and new_map[key] == value)


def _edited_pairs(base: list[Any], other: list[Any], i1: int, i2: int, j1: int, j2: int) -> list[tuple[int, int]]:
    """The (base, other) index pairs of a differing region that are one container edited in place.

    The in-order pairing that keeps the most in common (a small dynamic programme), so "edit one dict,
    remove the next" or "replace one item, edit the next" is read as such; one for one past the limit.
    """
    if i1 == i2 or j1 == j2 or not any(_kind(base[i]) for i in range(i1, i2)):
        return []
    if (i2 - i1) * (j2 - j1) > _PAIRING_LIMIT:
        if i2 - i1 != j2 - j1:
            return []
        return [(i, j) for i, j in zip(range(i1, i2), range(j1, j2), strict=True) if _likeness(base[i], other[j])]
    rows, cols = i2 - i1, j2 - j1
    best = [[0] * (cols + 1) for _ in range(rows + 1)]
    for r in range(rows - 1, -1, -1):
        for c in range(cols - 1, -1, -1):
            paired = _likeness(base[i1 + r], other[j1 + c])
            best[r][c] = max(best[r + 1][c], best[r][c + 1], paired + best[r + 1][c + 1] if paired else 0)
    pairs: list[tuple[int, int]] = []
    r = c = 0
    while r < rows and c < cols:
        paired = _likeness(base[i1 + r], other[j1 + c])
        if paired and best[r][c] == paired + best[r + 1][c + 1]:
            pairs.append((i1 + r, j1 + c))
            r, c = r + 1, c + 1
        elif best[r][c] == best[r + 1][c]:
            r += 1
        else:
            c += 1
    return pairs


def _separate_twins(base_ids: list[str], mine: _Edits, theirs: _Edits, identity: Callable[[Any], str]) -> None:
    """Where the two sides' edits meet on one item of a value the list holds several copies of, read
    them as edits of different copies, as the list cannot tell which copy was meant:

    - both removed it: mine removes another copy instead (the nearest untouched one in the base,
      else one they inserted) — each request removed one, as `lst.remove(value)` twice would;
    - one removed it, the other edited it in place: the removal takes another untouched copy, so
      the edit and the removal both land (they commute when they are of different copies).
    """
    both = mine.removed & theirs.removed
    mine_over_edit = mine.removed & theirs.edited.keys()
    theirs_over_edit = theirs.removed & mine.edited.keys()
    if not (both or mine_over_edit or theirs_over_edit):
        return
    wanted = {base_ids[index] for index in (*both, *mine_over_edit, *theirs_over_edit)}
    touched = mine.removed | theirs.removed | mine.edited.keys() | theirs.edited.keys()
    untouched: dict[str, list[int]] = {}
    for index, ident in enumerate(base_ids):
        if ident in wanted and index not in touched:
            untouched.setdefault(ident, []).append(index)

    def move(side: _Edits, index: int) -> bool:
        copies = untouched.get(base_ids[index])
        if not copies:
            return False
        nearest = min(copies, key=lambda other: (abs(other - index), other))
        copies.remove(nearest)
        side.removed.discard(index)
        side.removed.add(nearest)
        return True

    for index in sorted(mine_over_edit):
        move(mine, index)
    for index in sorted(theirs_over_edit):
        move(theirs, index)
    groups = [*theirs.inserted.values(), *theirs.in_place.values()]
    theirs_copies: dict[str, list[tuple[int, int]]] = {}  # identity -> (group, position) of their insertions
    for number, items in enumerate(groups):
        for position, item in enumerate(items):
            if (ident := identity(item)) in wanted:
                theirs_copies.setdefault(ident, []).append((number, position))
    dropped: set[tuple[int, int]] = set()
    for index in sorted(both):
        ident = base_ids[index]
        if move(mine, index):
            continue
        if theirs_copies.get(ident):
            # (A value both moved: each removed it and inserted it elsewhere; it stays once, at mine.)
            dropped.add(theirs_copies[ident].pop(0))
    for number in {group for group, _ in dropped}:
        items = groups[number]
        items[:] = [item for position, item in enumerate(items) if (number, position) not in dropped]
