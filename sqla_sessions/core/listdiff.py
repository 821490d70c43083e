"""Where one list differs from another: the regions ("hunks") a merge replays, found in bounded time.

Items are compared by identity strings (`merge._identity`). The diff is exact — a shortest edit
script, Myers' O((N+M)·D) algorithm, so a request that made a few edits to a long list costs a few
passes over it, repeated items or not — within a budget of comparison steps shared by every list of
one save. Past the budget, a region is split at the items that occur once on each side (patience
diff) and each piece tried again; a piece with nothing unique is aligned greedily, item by item, in
linear time. Either way the result is a valid alignment (every item outside a hunk is matched to an
equal one), so a merge under the row lock stays short whatever the payload holds.
"""

from __future__ import annotations

from bisect import bisect_left
from collections import Counter

__all__ = ["MATCH_BUDGET", "Budget", "Hunk", "hunks"]

#: Comparison steps one save may spend on exact list diffs, all lists together. A step is about
#: 0.6 µs: the whole budget is about 0.15 s under the row lock.
MATCH_BUDGET = 250_000

#: A second budget, for lists that come after the first one is spent: each may still take a few
#: passes over its items (enough for a few edits), so a large list cannot push a small one of the
#: same save onto the approximate path. With both spent, every diff is linear.
LIST_FLOOR = 250_000

#: How far the greedy alignment looks ahead for an item's next occurrence.
_GREEDY_WINDOW = 64

Hunk = tuple[int, int, int, int]  # base[i1:i2] became other[j1:j2]


class Budget:
    """What is left of `MATCH_BUDGET` (and of `LIST_FLOOR`) for one merge."""

    __slots__ = ("left", "reserve")

    def __init__(self, left: int | None = None) -> None:
        self.left = MATCH_BUDGET if left is None else left
        self.reserve = LIST_FLOOR


def hunks(base: list[str], other: list[str], budget: Budget) -> list[Hunk]:
    """The regions where *other* differs from *base*, in order."""
    few_edits = 2 * (len(base) + len(other)) + 64
    from_reserve = budget.left < few_edits
    granted = min(few_edits, budget.reserve) if from_reserve else budget.left
    allowance = Budget(granted)
    found = _diff(base, other, 0, len(base), 0, len(other), allowance)
    if from_reserve:
        budget.reserve -= granted - allowance.left
    else:
        budget.left = allowance.left
    return found


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
    matches = _myers(base, other, b1, b2, o1, o2, budget)
    if matches is None:
        anchors = _unique_anchors(base, other, b1, b2, o1, o2)
        if anchors:
            out: list[Hunk] = []
            for i, j in anchors:
                out.extend(_diff(base, other, b1, i, o1, j, budget))
                b1, o1 = i + 1, j + 1
            out.extend(_diff(base, other, b1, b2, o1, o2, budget))
            return out
        matches = _greedy(base, other, b1, b2, o1, o2)
    return _between(matches, b1, b2, o1, o2)


def _between(matches: list[tuple[int, int]], b1: int, b2: int, o1: int, o2: int) -> list[Hunk]:
    """The regions between matched pairs (in order) of base[b1:b2] and other[o1:o2]."""
    out: list[Hunk] = []
    i, j = b1, o1
    for mi, mj in (*matches, (b2, o2)):
        if mi > i or mj > j:
            out.append((i, mi, j, mj))
        i, j = mi + 1, mj + 1
    return out


def _myers(
    base: list[str], other: list[str], b1: int, b2: int, o1: int, o2: int, budget: Budget
) -> list[tuple[int, int]] | None:
    """The matched pairs of a shortest edit script (Myers 1986), or None past the budget."""
    n, m = b2 - b1, o2 - o1
    offset = n + m + 1
    frontier = [0] * (2 * offset + 1)  # furthest x reached on each diagonal k = x - y
    trace: list[list[int]] = []
    steps = 0
    for d in range(n + m + 1):
        trace.append(frontier[offset - d - 1 : offset + d + 2])
        for k in range(-d, d + 1, 2):
            if k == -d or (k != d and frontier[offset + k - 1] < frontier[offset + k + 1]):
                x = frontier[offset + k + 1]  # a step down: an insertion
            else:
                x = frontier[offset + k - 1] + 1  # a step right: a removal
            y = x - k
            start = x
            while x < n and y < m and base[b1 + x] == other[o1 + y]:
                x, y = x + 1, y + 1
            steps += 1 + x - start
            frontier[offset + k] = x
            if x >= n and y >= m:
                budget.left -= steps
                return _backtrack(trace, n, m, b1, o1)
        steps += d
        if steps > budget.left:
            budget.left = 0
            return None
    raise AssertionError("unreachable: d = n + m always reaches the end")


def _backtrack(trace: list[list[int]], n: int, m: int, b1: int, o1: int) -> list[tuple[int, int]]:
    matches: list[tuple[int, int]] = []
    x, y = n, m
    for d in range(len(trace) - 1, 0, -1):
        row = trace[d]  # the frontier before step d, diagonals -d-1 .. d+1
        k = x - y

        def at(diagonal: int, row: list[int] = row, d: int = d) -> int:
            return row[diagonal + d + 1]

        previous_k = k + 1 if k == -d or (k != d and at(k - 1) < at(k + 1)) else k - 1
        previous_x = at(previous_k)
        previous_y = previous_x - previous_k
        while x > previous_x and y > previous_y:
            x, y = x - 1, y - 1
            matches.append((b1 + x, o1 + y))
        x, y = previous_x, previous_y
    while x > 0 and y > 0:  # the snake of step 0
        x, y = x - 1, y - 1
        matches.append((b1 + x, o1 + y))
    matches.reverse()
    return matches


def _greedy(base: list[str], other: list[str], b1: int, b2: int, o1: int, o2: int) -> list[tuple[int, int]]:
    """A linear alignment: each item of *other* matched to the next equal base item close ahead."""
    where: dict[str, list[int]] = {}
    for i in range(b1, b2):
        where.setdefault(base[i], []).append(i)
    matches: list[tuple[int, int]] = []
    i = b1
    for j in range(o1, o2):
        positions = where.get(other[j])
        if not positions:
            continue
        n = bisect_left(positions, i)
        if n < len(positions) and positions[n] - i <= _GREEDY_WINDOW:
            matches.append((positions[n], j))
            i = positions[n] + 1
    return matches


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
