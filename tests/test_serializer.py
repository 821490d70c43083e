"""Tagged JSON: every supported type round-trips to the same type; everything else is refused."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, date, datetime, time, timedelta, timezone
from decimal import Decimal
from typing import Any

import pytest

from sqla_sessions.core.serializer import decode_value, dumps_payload, encode_entry, encode_value, loads_payload

SAMPLES: list[Any] = [
    None,
    True,
    0,
    -(2**70),
    1.5,
    "",
    "ünïcödé ✓ \x00",
    [1, "a", None],
    {"nested": {"deep": [1, 2, {"x": 1}]}},
    datetime(2026, 1, 2, 3, 4, 5, 678901),
    datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC),
    datetime(2026, 1, 2, 3, 4, 5, tzinfo=timezone(timedelta(hours=-5, minutes=-30))),
    date(1999, 12, 31),
    time(23, 59, 59, 1),
    time(1, 2, tzinfo=UTC),
    Decimal("12345678901234567890.000000001"),
    Decimal("-0"),
    uuid.UUID("12345678-1234-5678-1234-567812345678"),
    b"\x00\xff binary",
    (1, "two", (3.0,)),
    {1, 2, 3},
    {"a", "b"},
    frozenset({(1, 2), "x"}),
    {"$dt": "looks like a tag"},
    {"$dict": {"a": 1}},
    [{"$s": [1]}],
    (),
    set(),
]


@pytest.mark.parametrize("value", SAMPLES, ids=lambda v: type(v).__name__)
def test_round_trip_keeps_value_and_type(value: Any) -> None:
    raw = json.loads(json.dumps(encode_value(value)))  # through real JSON text
    back = decode_value(raw)
    assert back == value
    assert type(back) is type(value)
    if isinstance(value, datetime):
        assert back.utcoffset() == value.utcoffset()


def test_nested_types_keep_their_types() -> None:
    value = {"when": [datetime(2026, 1, 1, tzinfo=UTC)], "ids": (uuid.uuid4(),), "amount": {"v": Decimal("1.10")}}
    back = decode_value(encode_value(value))
    assert back == value
    assert type(back["ids"]) is tuple and type(back["amount"]["v"]) is Decimal


def test_equal_sets_encode_identically_whatever_their_history() -> None:
    first = {f"item{i}" for i in range(50)}
    second = set(sorted(first, reverse=True))
    assert encode_value(first) == encode_value(second)


@pytest.mark.parametrize(
    "value",
    [object(), float("nan"), float("inf"), {1: "int key"}, bytearray(b"x"), timedelta(1), [lambda: 1], {"a": {2}}],
    ids=["object", "nan", "inf", "int-key", "bytearray", "timedelta", "lambda", "set-of-unhashable-ok"],
)
def test_unsupported_values_raise_type_error_naming_the_key(value: Any) -> None:
    if isinstance(value, dict) and value == {"a": {2}}:
        assert decode_value(encode_value(value)) == value  # a set inside a dict is fine
        return
    with pytest.raises(TypeError, match="'cart'"):
        encode_entry("cart", value)


def test_cyclic_values_are_refused() -> None:
    cyclic: list[Any] = []
    cyclic.append(cyclic)
    with pytest.raises(TypeError, match="'loop'"):
        encode_entry("loop", cyclic)


def test_subclasses_are_refused_rather_than_silently_changing_type() -> None:
    class Name(str):
        pass

    with pytest.raises(TypeError):
        encode_value(Name("x"))


@pytest.mark.parametrize("data", [b"", b"[]", b'"x"', b"{", b"\xff\xfe", b"null", b"[" * 100_000 + b"]" * 100_000])
def test_loads_payload_rejects_anything_but_an_object(data: bytes) -> None:
    with pytest.raises(ValueError):
        loads_payload(data)


@pytest.mark.parametrize(
    "raw",
    [{"$dt": "not a date"}, {"$dec": "abc"}, {"$u": "nope"}, {"$b": "!!"}, {"$t": "notalist"}, {"$s": [[1]]}],
)
def test_corrupt_tagged_values_raise_value_error(raw: Any) -> None:
    with pytest.raises(ValueError):
        decode_value(raw)


def test_dumps_is_compact_utf8() -> None:
    assert dumps_payload({"a": "é", "b": [1, 2]}) == '{"a":"é","b":[1,2]}'.encode()


def test_values_nested_too_deeply_are_refused_naming_the_key() -> None:
    from sqla_sessions.core.serializer import MAX_DEPTH, encode_entry

    nested: dict[str, object] = {}
    for _ in range(MAX_DEPTH + 1):
        nested = {"prev": nested}
    with pytest.raises(TypeError, match="'nav'.*nested more than"):
        encode_entry("nav", nested)
    shallow: dict[str, object] = {}
    for _ in range(MAX_DEPTH - 1):
        shallow = {"prev": shallow}
    assert encode_entry("nav", shallow)


def test_an_int_too_long_for_json_is_refused_naming_the_key_and_never_breaks_a_read() -> None:
    from sqla_sessions.core.serializer import encode_entry, loads_payload

    with pytest.raises(TypeError, match="'big'.*4,000 digits"):
        encode_entry("big", 10**5000)
    assert encode_entry("ok", 10**4000) == 10**4000
    with pytest.raises(ValueError):  # a stored one (written by hand) reads as a corrupt payload
        loads_payload(b'{"a": ' + b"9" * 5000 + b"}")


def test_markup_round_trips_and_enum_members_are_stored_as_their_value() -> None:
    """What Flask apps put in sessions: `flash(Markup(...))`, and StrEnum/IntEnum members."""
    import enum

    from markupsafe import Markup

    class Colour(enum.StrEnum):
        RED = "red"

    class Level(enum.IntEnum):
        HIGH = 3

    class Shape(enum.Enum):
        SQUARE = (1, 1)

    stored = decode_value(encode_value([Markup("<b>saved</b>"), Colour.RED, Level.HIGH, Shape.SQUARE]))
    assert stored == [Markup("<b>saved</b>"), "red", 3, (1, 1)]
    assert type(stored[0]) is Markup and type(stored[1]) is str and type(stored[2]) is int
    assert decode_value(encode_value({"$m": "not markup"})) == {"$m": "not markup"}  # a user dict stays one


def test_flask_flash_with_markup_is_stored_and_shown(tmp_path: Any) -> None:
    import flask
    from markupsafe import Markup

    from sqla_sessions import SessionConfig
    from sqla_sessions.flask import init_app

    app = flask.Flask(__name__)
    init_app(app, SessionConfig(database_url=f"sqlite:///{tmp_path / 's.db'}", lottery=(0, 1)))
    from sqla_sessions import upgrade

    upgrade(f"sqlite:///{tmp_path / 's.db'}")

    @app.post("/save")
    def save() -> str:
        flask.flash(Markup("<b>Saved</b>"), "success")
        return "ok"

    @app.get("/show")
    def show() -> str:
        messages = flask.get_flashed_messages(with_categories=True)
        return f"{messages[0][0]}:{type(messages[0][1]).__name__}:{messages[0][1]}"

    client = app.test_client()
    assert client.post("/save").status_code == 200
    assert client.get("/show").text == "success:Markup:<b>Saved</b>"
