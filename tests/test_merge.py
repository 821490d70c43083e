"""The three-way merge, without a database: rules by example, then properties over any interleaving."""

from __future__ import annotations

import itertools
from datetime import date
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from sqla_sessions import MemoryHandler
from sqla_sessions.core.merge import MISSING, ChangeSet, apply_changes, merge_value
from sqla_sessions.core.serializer import encode_value

# -- the rules, by example -----------------------------------------------------------------------------


def merge(base: Any, mine: Any, theirs: Any, delta: float | None = None) -> Any:
    """Merge Python values through their raw forms, as the store does."""
    raw = [MISSING if v is MISSING else encode_value(v) for v in (base, mine, theirs)]
    return merge_value(*raw, delta)


def test_a_side_that_did_not_change_takes_the_other() -> None:
    assert merge([1], [1, 2], [1]) == [1, 2]
    assert merge([1], [1], [1, 3]) == [1, 3]
    assert merge("a", "b", "b") == "b"


def test_appends_of_both_sides_are_kept_theirs_first() -> None:
    assert merge([1], [1, 2], [1, 3]) == [1, 3, 2]
    assert merge(MISSING, [2], [3]) == [3, 2]  # both created the list with push()


def test_removals_are_replayed_and_insertions_keep_their_place() -> None:
    assert merge([1, 2, 3, 4], [1, 3, 4], [1, 2, 3, 4, 5]) == [1, 3, 4, 5]
    assert merge([1, 2, 3], [1, 9, 2, 3], [0, 1, 2, 3]) == [0, 1, 9, 2, 3]
    assert merge([1, 2, 3], [1, 3], [1, 3]) == [1, 3]  # both removed the same item
    assert merge([1, 2, 3], [1, 2, 3, 4], [1, 3]) == [1, 3, 4]


def test_an_item_replaced_is_a_removal_plus_an_insertion_that_never_disappears() -> None:
    assert merge([1, 2, 3], [1, 5, 3], [1, 7, 3]) == [1, 7, 5, 3]  # both replaced item 2: both new items stay
    assert merge([1, 2, 3], [1, 5, 3], [1, 7, 3, 4]) == [1, 7, 5, 3, 4]  # their append stays
    assert merge([1, 2], [2], [9, 2]) == [9, 2]  # I removed the item they replaced: their insertion stays
    assert merge(["a"], [], ["b"]) == ["b"]  # the first row, both commit orders
    assert merge(["a"], ["b"], []) == ["b"]
    assert merge(["x", "a"], ["x"], ["x", "b"]) == ["x", "b"]


def test_removing_the_last_item_then_pushing_is_pop_then_push() -> None:
    base = [0, 1, 2, 3, 4, 5]
    assert merge(base, [0, 1, 2, 3, 4, "a"], [*base, "b"]) == [0, 1, 2, 3, 4, "b", "a"]
    assert merge(base, [*base, "a"], [*base, "b"]) == [*base, "b", "a"]  # as two plain appends


def test_containers_edited_in_place_merge_and_the_last_write_wins_over_a_removal() -> None:
    base = [{"sku": 1, "qty": 1}, {"sku": 2, "qty": 1}]
    qty = [{"sku": 1, "qty": 2}, {"sku": 2, "qty": 1}]
    note = [{"sku": 1, "qty": 1, "note": "gift"}, {"sku": 2, "qty": 1}]
    assert merge(base, qty, note) == [{"sku": 1, "qty": 2, "note": "gift"}, {"sku": 2, "qty": 1}]
    assert merge(base, qty, base[1:]) == qty  # I edited what they removed: my write is the last
    assert merge(base, base[1:], qty) == base[1:]  # I removed what they edited: my removal is the last
    # An edit of one dict beside the removal of the next is read as such (not as one rewritten region).
    edited_and_removed = [{"sku": 1, "qty": 5}]
    assert merge(base, edited_and_removed, note) == [{"sku": 1, "qty": 5, "note": "gift"}]


def test_two_requests_that_each_removed_one_copy_removed_two() -> None:
    assert merge(["x", "x"], ["x"], ["x"]) == []
    assert merge(["x", "y", "x"], ["y", "x"], ["x", "y"]) == ["y"]
    assert merge(["x"], [], []) == []  # one item, removed by both: removed once


def test_pushes_of_the_same_value_by_both_sides_are_two_pushes() -> None:
    assert merge(["a"], ["a", "x"], ["a", "x"]) == ["a", "x", "x"]
    assert merge(MISSING, ["x"], ["x"]) == ["x", "x"]
    assert merge({"cart": []}, {"cart": ["x"]}, {"cart": ["x"]}) == {"cart": ["x", "x"]}


def test_edits_of_neighbouring_items_keep_the_order() -> None:
    assert merge(["i1", "i2"], ["i1*", "i2"], ["i1", "i2*"]) == ["i1*", "i2*"]
    assert merge(["a", "c"], ["a", "x", "c"], ["a", "y", "c"]) == ["a", "y", "x", "c"]


def test_edits_of_different_items_never_wipe_the_others() -> None:
    assert merge(["A1", "B1", "C1"], ["A1", "B3", "C1"], ["A2", "B2", "C2"]) == ["A2", "B2", "B3", "C2"]
    assert merge(["A1", "B1", "C1"], ["A1", "C1"], ["A2", "B2", "C2"]) == ["A2", "B2", "C2"]
    assert merge(["a", "b", "c"], ["a", "q", "b", "c"], ["x", "y", "z"]) == ["x", "q", "y", "z"]
    base = [f"item{n}" for n in range(300)]
    theirs = ["ITEM0", *base[1:299], "ITEM299"]
    mine = [*base[:150], "ITEM150", *base[151:]]
    assert merge(base, mine, theirs) == ["ITEM0", *base[1:150], "ITEM150", *base[151:299], "ITEM299"]
    todo = [{"t": "milk", "done": False}, {"t": "rent", "done": False}]
    all_done = [{"t": "milk", "done": True}, {"t": "rent", "done": True}]
    edited = [{"t": "milk", "done": False}, {"t": "rent (due 1st)", "done": False}]
    # Both edited the second item in place: the edits compose (their "done", my new title).
    assert merge(todo, edited, all_done) == [{"t": "milk", "done": True}, {"t": "rent (due 1st)", "done": True}]


def test_long_lists_past_the_exact_diff_budget_still_merge_edit_by_edit() -> None:
    base = [f"id{n}" for n in range(2000)]
    capped_push = [*base[1:], "new"]  # drop the oldest, append the newest
    removed = [item for item in base if item != "id1000"]
    edited = [("EDITED" if item == "id1000" else item) for item in base]
    assert merge(base, removed, capped_push) == [*base[1:1000], *base[1001:], "new"]
    assert merge(base, edited, capped_push) == [*base[1:1000], "EDITED", *base[1001:], "new"]
    assert merge(base, capped_push, removed) == [*base[1:1000], *base[1001:], "new"]


def test_a_long_repetitive_list_merges_in_linear_time() -> None:
    base = ["same"] * 20_000  # a quadratic diff would take minutes here, under the row lock
    merged = merge(base, [*base, "mine"], ["theirs", *base])
    assert merged == ["theirs", *base, "mine"]


def test_dicts_merge_by_key_recursively() -> None:
    base = {"prefs": {"a": 1, "b": 1}, "x": 0}
    mine = {"prefs": {"a": 2, "b": 1}, "x": 0}
    theirs = {"prefs": {"a": 1, "b": 1, "c": 3}, "x": 5}
    assert merge(base, mine, theirs) == {"prefs": {"a": 2, "b": 1, "c": 3}, "x": 5}
    assert merge({"a": 1, "b": 2}, {"a": 1}, {"a": 1, "b": 2, "c": 3}) == {"a": 1, "c": 3}  # my removal sticks


def test_a_dict_that_looks_like_a_tag_stays_a_dict() -> None:
    merged = merge({"x": 1}, {"$dt": "mine", "x": 1}, {"x": 1, "y": 2})
    assert merged == {"$dt": "mine", "x": 1, "y": 2}
    assert merge({}, {"$dt": "a"}, {}) == {"$dict": {"$dt": "a"}}  # raw form, wrapped as the serializer does


def test_sets_apply_my_additions_and_removals_to_theirs() -> None:
    merged = merge({1, 2, 3}, {1, 2, 4}, {1, 2, 3, 5})
    assert merged == encode_value({1, 2, 4, 5})


def test_increments_add_their_delta_and_assignments_win() -> None:
    assert merge(1, 2, 5, delta=1) == 6
    assert merge(MISSING, 1, 3, delta=1) == 4
    assert merge(1, 10, 5) == 10  # a plain assignment: the last committed write


def test_scalars_tagged_values_and_type_changes_take_mine() -> None:
    assert merge("a", "b", "c") == "b"
    assert merge(date(2026, 1, 1), date(2026, 1, 2), date(2026, 1, 3)) == encode_value(date(2026, 1, 2))
    assert merge([1], {"now": "dict"}, [1, 2]) == {"now": "dict"}
    assert merge(1, MISSING, 2) is MISSING  # I removed it: removal wins


def test_apply_changes_removes_sets_and_merges_per_key() -> None:
    theirs = {"list": [1, 2], "n": 5, "other": "theirs", "gone": 1}
    changes = ChangeSet(
        updates={"list": [1, 3], "n": 2, "new": True},
        removals=frozenset({"gone"}),
        base={"list": [1], "n": 1, "gone": 1},
        deltas={"n": 1},
    )
    assert apply_changes(theirs, changes) == {"list": [1, 2, 3], "n": 6, "other": "theirs", "new": True}


# -- properties ------------------------------------------------------------------------------------------

json_scalars = st.one_of(st.none(), st.booleans(), st.integers(-(2**40), 2**40), st.text(max_size=5))
values = st.recursive(
    st.one_of(json_scalars, st.sets(st.integers(0, 9), max_size=4), st.tuples(st.integers())),
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=3), inner, max_size=4)),
    max_leaves=12,
)


@given(values, values)
def test_merging_onto_an_unchanged_side_gives_the_changed_one(base: Any, other: Any) -> None:
    raw_base, raw_other = encode_value(base), encode_value(other)
    assert merge_value(raw_base, raw_other, raw_base) == raw_other
    assert merge_value(raw_base, raw_base, raw_other) == raw_other


BASE_ITEMS = list(range(6))


@st.composite
def histories(draw: st.DrawFn) -> list[dict[str, Any]]:
    """2-5 writers' edits that commute: own appends, removals of base items, increments, own nested keys."""
    writers = draw(st.integers(2, 5))
    removable = draw(st.permutations(BASE_ITEMS))
    out = []
    for w in range(writers):
        out.append(
            {
                "append": [f"w{w}-{i}" for i in range(draw(st.integers(0, 3)))],
                "remove": removable[w::writers][: draw(st.integers(0, 2))],
                "increment": draw(st.integers(-3, 3)),
                "pref": draw(st.one_of(st.none(), st.integers(0, 9))),
                "tag_add": draw(st.sets(st.sampled_from([f"t{w}a", f"t{w}b"]))),
                "tag_remove": draw(st.sets(st.sampled_from(["base1", "base2"]))),
            }
        )
    return out


def _apply(session: Any, w: int, edits: dict[str, Any]) -> None:
    for item in edits["append"]:
        session.push("cart", item)
    for item in edits["remove"]:
        session["cart"].remove(item)
    if edits["increment"]:
        session.increment("n", edits["increment"])
    if edits["pref"] is not None:
        session["prefs"][f"w{w}"] = edits["pref"]
    session["tags"].update(edits["tag_add"])
    session["tags"].difference_update(edits["tag_remove"])


def _canonical(payload: dict[str, Any]) -> dict[str, Any]:
    return {**payload, "cart": sorted(payload["cart"], key=str)}


@settings(max_examples=60, deadline=None)
@given(histories(), st.randoms(use_true_random=False))
def test_every_interleaving_of_commuting_edits_gives_the_same_payload(edits: list[dict[str, Any]], rng: Any) -> None:
    orders = list(itertools.permutations(range(len(edits))))
    results = []
    for order in rng.sample(orders, min(4, len(orders))):
        handler = MemoryHandler()
        seed = handler.load(None)
        seed.put({"cart": list(BASE_ITEMS), "n": 10, "prefs": {"base": 0}, "tags": {"base1", "base2", "keep"}})
        seed.save()
        sessions = [handler.load(seed.id) for _ in edits]  # everyone loads the same version ...
        for w, session in enumerate(sessions):
            _apply(session, w, edits[w])
        for w in order:  # ... and saves in this order: the first by compare-and-set, the rest merge
            sessions[w].save()
        payload = handler.load(seed.id).all()
        payload.pop("_token", None)
        results.append(payload)
        for w, e in enumerate(edits):  # each writer's own appends keep their relative order
            mine = [item for item in payload["cart"] if isinstance(item, str) and item.startswith(f"w{w}-")]
            assert mine == e["append"]

    removed = {item for e in edits for item in e["remove"]}
    expected = {
        "cart": sorted([i for i in BASE_ITEMS if i not in removed] + [a for e in edits for a in e["append"]], key=str),
        "n": 10 + sum(e["increment"] for e in edits),
        "prefs": {"base": 0, **{f"w{w}": e["pref"] for w, e in enumerate(edits) if e["pref"] is not None}},
        "tags": ({"base1", "base2", "keep"} - {t for e in edits for t in e["tag_remove"]})
        | {t for e in edits for t in e["tag_add"]},
    }
    for payload in results:
        assert _canonical(payload) == expected
