"""The definition the merge is held to: concurrent requests' edits, and what running them one after
the other gives.

A request's edit of a list is generated as an *intention* per base item (keep, remove, replace by a
new value, edit in place) and per gap (insert new values), from which both the list the request
ends up holding and the identity-addressed operations it performed follow. Two oracles read them:

- `serial`: the operations applied one request after the other, in commit order, each addressed by
  identity (insert before item e, remove e, replace e, edit e). It fails (returns None) where the
  operations do not commute: an item one request edits or replaces is gone, an anchor is gone.
- `by_rule`: the documented outcome for every history, commuting or not (`sqla_sessions.core.listmerge`):
  insertions never disappear, an edit of a removed item is the last committed write's.

Items are unique (values carry the writer and a counter), so every operation can be found in the result.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hypothesis import strategies as st

END = "END"


@dataclass
class ListEdit:
    """One request's edit of a list of unique items: fates per base index, insertions per gap."""

    fate: dict[int, tuple[str, Any]] = field(default_factory=dict)  # index -> ("remove"|"replace"|"edit", arg)
    gaps: dict[int, list[Any]] = field(default_factory=dict)  # gap -> new items (gap len(base): appended)

    def result(self, base: list[Any]) -> list[Any]:
        """The list this request holds before it saves."""
        out: list[Any] = []
        for g in range(len(base) + 1):
            out.extend(self.gaps.get(g, ()))
            if g == len(base):
                break
            kind, arg = self.fate.get(g, ("keep", None))
            if kind == "keep":
                out.append(base[g])
            elif kind == "replace":
                out.append(arg)
            elif kind == "edit":
                out.append({**base[g], **arg})
        return out


@st.composite
def list_edits(draw: st.DrawFn, base: list[Any], writer: str) -> ListEdit:
    """An edit of *base* whose intention the list it produces shows unambiguously: insertions only
    between items the request keeps (an insertion beside a removal reads as a replacement), items
    replaced only between kept ones, the last only as pop-then-push (a replacement of the last item
    and a removal then an append hold the same list), likewise a replacement in a run of removals
    that reaches the end."""
    edit = ListEdit()
    counter = iter(range(1000))
    n = len(base)
    for index, item in enumerate(base):
        options = ["keep", "keep", "remove", "replace"] + (["edit"] if isinstance(item, dict) else [])
        kind = draw(st.sampled_from(options))
        if kind == "remove":
            edit.fate[index] = ("remove", None)
        elif kind == "replace":
            edit.fate[index] = ("replace", f"{writer}-r{next(counter)}")
        elif kind == "edit":
            key = draw(st.sampled_from(["qty", "note", f"{writer}-key"]))
            edit.fate[index] = ("edit", {key: f"{writer}-e{next(counter)}"})
    # Of two identical neighbours, removing either holds the same list: the later one it is.
    for index in range(n - 1):
        if base[index] == base[index + 1]:
            first, second = edit.fate.get(index, ("keep",)), edit.fate.get(index + 1, ("keep",))
            if first[0] == "remove" and second[0] == "keep":
                edit.fate[index + 1] = edit.fate.pop(index)
    # A replacement beside a removal reads the same as the removal beside the replacement: replaced
    # items stand between kept ones (or end the list, below).
    for index in sorted(edit.fate):
        if edit.fate[index][0] == "replace":
            beside = [edit.fate.get(other, ("keep",))[0] for other in (index - 1, index + 1) if 0 <= other < n]
            if any(kind in ("remove", "replace") for kind in beside) and index + 1 < n:
                edit.fate[index] = ("remove", None)
    # Replacements in a run of removed items that reaches the end are pops, then pushes: the list
    # reads the same either way, and the merge reads it as appends (after the other side's).
    start = n
    while start > 0 and edit.fate.get(start - 1, ("keep",))[0] in ("remove", "replace"):
        start -= 1
    for index in range(start, n):
        kind, value = edit.fate[index]
        edit.fate[index] = ("remove", None)
        if kind == "replace":
            edit.gaps.setdefault(n, []).append(value)
    for gap in range(n + 1):
        before_kept = gap == 0 or edit.fate.get(gap - 1, ("keep",))[0] in ("keep", "edit")
        after_kept = gap == n or edit.fate.get(gap, ("keep",))[0] in ("keep", "edit")
        if before_kept and after_kept and draw(st.integers(0, 4)) == 0:
            edit.gaps.setdefault(gap, []).extend(f"{writer}-i{next(counter)}" for _ in range(draw(st.integers(1, 2))))
    return edit


def perform(lst: list[Any], base: list[Any], edit: ListEdit) -> None:
    """Carry *edit* out on *lst* (the request's copy of *base*) with the list operations an app uses,
    right to left so each index still names what it named in *base*."""
    n = len(base)
    lst.extend(edit.gaps.get(n, ()))  # append
    for index in range(n - 1, -1, -1):
        kind, arg = edit.fate.get(index, ("keep", None))
        if kind == "remove":
            del lst[index]
        elif kind == "replace":
            lst[index] = arg
        elif kind == "edit":
            lst[index].update(arg)  # a nested edit, in place
        for offset, item in enumerate(edit.gaps.get(index, ())):
            lst.insert(index + offset, item)


def serial(base: list[Any], edits: list[ListEdit]) -> list[Any] | None:
    """The edits applied one after the other (commit order), each addressed by identity; None where
    a later edit's item or anchor is gone (the edits do not commute)."""
    current: list[tuple[Any, Any]] = [(index, item) for index, item in enumerate(base)]  # (identity, value)
    for number, edit in enumerate(edits):
        where_is = {identity: i for i, (identity, _) in enumerate(current)}
        inserts: list[tuple[int, list[Any]]] = []
        for index, (kind, arg) in edit.fate.items():
            where = where_is.get(index)
            if where is None and kind in ("remove", "edit"):
                # The item this request saw is gone, but an untouched identical twin is there: the
                # request could not tell them apart, and in a serial order it would have used the twin.
                where = _twin(current, base, index, edit)
            if where is None:
                if kind == "remove":
                    continue  # removed already: `if x in lst: lst.remove(x)`
                return None
            if kind == "remove" and current[where][1] != base[index]:
                # The item this request saw was edited since: with an untouched twin there, the request
                # removed "one of the identical items", and the twin is the one that still is one.
                twin = _twin(current, base, index, edit)
                where = where if twin is None else twin
            if kind == "remove":
                current[where] = (None, _GONE)
            elif kind == "replace":
                current[where] = ((number, index), arg)
            else:
                current[where] = (index, {**current[where][1], **arg})
        for gap, items in edit.gaps.items():
            where = len(current) if gap == len(base) else where_is.get(gap)
            if where is None:
                return None
            inserts.append((where, items))
        for where, items in sorted(inserts, key=lambda p: -p[0]):
            current[where:where] = [((number, "new"), item) for item in items]
        current = [(identity, item) for identity, item in current if item is not _GONE]
    return [item for _, item in current]


_GONE: Any = object()


def twin_readings(base: list[Any], edits: list[ListEdit]) -> list[list[ListEdit]]:
    """The histories that hold the same lists: a request that removed or edited one of two identical
    neighbours may as well have meant the other (at most 64 readings)."""
    readings: list[list[ListEdit]] = [[]]
    for edit in edits:
        variants = [edit]
        for k in range(len(base) - 1):
            if base[k] != base[k + 1] or (edit.fate.get(k) is None) == (edit.fate.get(k + 1) is None):
                continue
            swapped = []
            for variant in variants:
                fate = dict(variant.fate)
                a, b = fate.pop(k, None), fate.pop(k + 1, None)
                if a is not None:
                    fate[k + 1] = a
                if b is not None:
                    fate[k] = b
                swapped.append(ListEdit(fate, variant.gaps))
            variants += swapped
        readings = [[*reading, variant] for reading in readings for variant in variants][:64]
    return readings


def _twin(current: list[tuple[Any, Any]], base: list[Any], index: int, mine: ListEdit) -> int | None:
    """Where an untouched copy of base[index] stands in *current* (the nearest in the base), one the
    request (*mine*) does not itself edit or remove, or None."""
    twins = [
        (abs(identity - index), identity, where)
        for where, (identity, item) in enumerate(current)
        if isinstance(identity, int)
        and identity != index
        and identity not in mine.fate
        and base[identity] == base[index]
        and item == base[identity]
    ]
    return min(twins)[2] if twins else None


def by_rule(base: list[Any], edits: list[ListEdit]) -> list[Any]:
    """The documented merge of edits committed in this order (`sqla_sessions.core.listmerge`), for any history."""
    # Per base item, the last committed fate among remove/edit wins, edits compose, replacements and
    # insertions all stay. A removal that meets another removal or an edit of the same item takes an
    # untouched identical twin instead, if there is one (a list cannot tell identical items apart).
    n = len(base)
    fates = [dict(edit.fate) for edit in edits]
    touched = {index for fate in fates for index in fate}
    for number, fate in enumerate(fates):
        for index, (kind, arg) in sorted(fate.items()):
            if kind not in ("remove", "replace"):
                continue
            others = [f.get(index, ("keep",))[0] for k, f in enumerate(fates) if k != number]
            meets = any(o == "edit" for o in others) or any(
                f.get(index, ("keep",))[0] in ("remove", "replace") for f in fates[:number]
            )
            twins = [j for j in range(n) if j not in touched and base[j] == base[index]]
            if meets and twins:
                twin = min(twins, key=lambda j: (abs(j - index), j))
                touched.add(twin)
                del fate[index]
                fate[twin] = ("remove", None)
                if kind == "replace":
                    fate[index] = ("slot", arg)  # the new item stays where it was put
    out: list[Any] = []
    for g in range(n + 1):
        for edit in edits:
            out.extend(edit.gaps.get(g, ()))
        if g == n:
            break
        alive, value = True, base[g]
        for fate in fates:
            kind, arg = fate.get(g, ("keep", None))
            if kind in ("remove", "replace"):
                alive, value = False, base[g]  # a later edit is merged onto a row without the item
            elif kind == "edit":
                alive, value = True, {**value, **arg}
        for fate in fates:
            kind, arg = fate.get(g, ("keep", None))
            if kind in ("replace", "slot"):
                out.append(arg)
        if alive:
            out.append(value)
    return out
