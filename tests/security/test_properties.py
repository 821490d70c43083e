"""Property-based tests: round trips, parsers that never raise, and concurrent histories."""

from __future__ import annotations

import copy
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sqla_sessions import DatabaseHandler, MemoryHandler, SessionConfig, SessionInterrupted, upgrade
from sqla_sessions.core.codec import CorruptPayload, PayloadCodec
from sqla_sessions.core.ids import is_valid_session_id
from sqla_sessions.core.serializer import decode_value, dumps_payload, encode_value, loads_payload
from sqla_sessions.http.cookies import session_cookie_values, session_id_candidates
from sqla_sessions.store.handlers.base import BaseHandler

offsets = st.integers(-14 * 60, 14 * 60).map(lambda m: timezone(timedelta(minutes=m)))
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(),
    st.binary(max_size=64),
    st.datetimes(),
    st.datetimes(timezones=st.just(UTC) | offsets),
    st.dates(),
    st.times(),
    st.decimals(allow_nan=False, allow_infinity=False),
    st.uuids(),
)
hashables = st.one_of(st.integers(), st.text(max_size=8), st.uuids(), st.dates())
values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.lists(inner, max_size=4).map(tuple),
        st.dictionaries(st.text(max_size=8), inner, max_size=4),
        st.sets(hashables, max_size=4),
        st.frozensets(hashables, max_size=4),
    ),
    max_leaves=12,
)


def same_types(a: Any, b: Any) -> bool:
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same_types(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return len(a) == len(b) and all(same_types(x, y) for x, y in zip(a, b, strict=True))
    return True


@settings(max_examples=300, deadline=None)
@given(values)
def test_every_supported_value_round_trips_with_its_type(value: Any) -> None:
    raw = loads_payload(dumps_payload({"k": encode_value(value)}))["k"]
    back = decode_value(raw)
    assert back == value or (isinstance(value, Decimal) and back.compare_total(value) == 0)
    assert same_types(back, value)


@settings(max_examples=500, deadline=None)
@given(st.lists(st.text(), max_size=4), st.text(max_size=20))
def test_the_cookie_parser_never_raises(headers: list[str], name: str) -> None:
    found = session_cookie_values(headers, name or "session")
    candidates = session_id_candidates(found)
    chosen = candidates[0] if candidates else None
    assert chosen is None or chosen in found
    if any(is_valid_session_id(v) for v in found):
        assert is_valid_session_id(chosen)


KEY = "MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY"


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=512), st.booleans())
def test_the_payload_decoder_only_ever_reports_corruption(data: bytes, encrypted: bool) -> None:
    codec = PayloadCodec(SessionConfig(encryption_keys=(KEY,) if encrypted else ()))
    try:
        result = codec.loads(data, "0" * 32)
    except CorruptPayload:
        return
    assert isinstance(result, dict)


# -- concurrent histories ---------------------------------------------------------------------------

CLIENTS = 3
KEYS = ["a", "b", "c"]
step = st.tuples(
    st.sampled_from(["load", "set", "remove", "append", "save", "regenerate", "invalidate"]),
    st.integers(0, CLIENTS - 1),
    st.sampled_from(KEYS),
    st.integers(0, 9),
)
edit = st.tuples(
    st.sampled_from(["set", "remove", "append", "append", "append"]), st.sampled_from(KEYS), st.integers(0, 9)
)


@st.composite
def everyone_loads_then_everyone_saves(draw: st.DrawFn) -> list[tuple[str, int, str, int]]:
    """The shape that makes saves merge: every client loads the same version, edits, then all save."""
    clients = list(range(CLIENTS))
    history = [("load", c, "a", 0) for c in clients]
    for c in clients:
        history += [(op, c, k, v) for op, k, v in draw(st.lists(edit, max_size=4))]
    return history + [("save", c, "a", 0) for c in draw(st.permutations(clients))]


# Half the histories are interleaved at random, half merge on every save but the first.
steps = st.one_of(st.lists(step, min_size=1, max_size=30), everyone_loads_then_everyone_saves())


def replay(handler: BaseHandler[Any], history: list[tuple[str, int, str, int]]) -> None:
    """Run an interleaved history of clients on one session and check it against a serial model.

    The model is the stored dict after applying each *committed* client's operations in commit order:
    an assignment or removal of a key (the last committed one wins), or appends to the list it loaded
    (replayed onto the stored list: two clients' appends both land). A save after the session was
    invalidated must raise SessionInterrupted and change nothing.
    """
    seed = handler.load(None)
    seed.put({k: [0] for k in KEYS})
    seed.save()
    key, session_id = seed.key, seed.id
    model: dict[str, Any] | None = {k: [0] for k in KEYS}
    clients: dict[int, Any] = {}
    changes: dict[int, dict[str, Any]] = {}  # client -> key -> new value, _GONE, or Appended
    snapshots: dict[int, dict[str, Any]] = {}  # client -> what it loaded
    for op, client, k, v in history:
        if op == "load" or client not in clients:
            loaded = handler.load_by_key(key or "")
            if loaded is None:
                continue
            clients[client], changes[client] = loaded, {}
            snapshots[client] = copy.deepcopy(loaded.all())
            continue
        session = clients[client]
        if op == "set":
            session[k] = v
            changes[client][k] = v
        elif op == "remove":
            session.pop(k, None)
            changes[client][k] = _GONE
        elif op == "append":
            current = session.get(k)
            if isinstance(current, list):
                current.append(v)  # a nested mutation, no assignment
                done = changes[client].get(k)
                if isinstance(done, Appended):
                    done.items.append(v)
                elif done is None:
                    changes[client][k] = Appended(list(snapshots[client][k]), [v])
                else:
                    changes[client][k] = list(current)  # appended to a list it assigned: that list
        elif op == "regenerate":
            session.regenerate()
            if "_token" in session:  # a token is renewed; a session without one gets it on first use
                changes[client]["_token"] = session["_token"]
        elif op == "invalidate":
            session.invalidate()
            session.save()  # deletes the row; the client continues as a new session of its own
            model = None
            del clients[client]
        elif op == "save":
            loaded_view = snapshots[client]
            effective = {
                name: value
                for name, value in changes[client].items()
                if not (value is _GONE and name not in loaded_view)
                and (isinstance(value, Appended) or loaded_view.get(name, _GONE) != value)
            }
            changes[client] = effective
            try:
                session.save(end_of_request=False)
            except SessionInterrupted:
                assert model is None  # only a destroyed session refuses a save
            else:
                # A save with nothing to write succeeds whatever happened meanwhile (it writes nothing).
                assert model is not None or not changes[client]
                if model is None:
                    del clients[client]
                    continue
                for name, value in changes[client].items():
                    if value is _GONE:
                        model.pop(name, None)
                    elif isinstance(value, Appended):
                        # Appends land on the stored list; if another client made it something else
                        # (a change of type does not commute), this client's list is the last write.
                        stored_list = model.get(name)
                        model[name] = [*(stored_list if isinstance(stored_list, list) else value.loaded), *value.items]
                    else:
                        model[name] = value
            del clients[client]
    stored = handler.load_by_key(key or "")
    if model is None:
        assert stored is None
    else:
        assert stored is not None and stored.all() == model
    del session_id


_GONE = object()


@dataclass
class Appended:
    """A client's appends to the list it loaded (*loaded*), not an assignment."""

    loaded: list[Any]
    items: list[int]


@settings(max_examples=300, deadline=None)
@given(steps)
def test_histories_on_memory_equal_the_serial_application_of_committed_changes(
    history: list[tuple[str, int, str, int]],
) -> None:
    replay(MemoryHandler(), history)


@pytest.fixture(scope="module")
def sqlite_handler(tmp_path_factory: pytest.TempPathFactory) -> DatabaseHandler:
    url = f"sqlite:///{Path(tmp_path_factory.mktemp('props')) / 'p.db'}"
    upgrade(url)
    return DatabaseHandler(url)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(steps)
def test_histories_on_sqlite_equal_the_serial_application_of_committed_changes(
    sqlite_handler: DatabaseHandler, history: list[tuple[str, int, str, int]]
) -> None:
    replay(sqlite_handler, history)


def test_uuid_strategy_sanity() -> None:
    assert decode_value(encode_value(uuid.UUID(int=1))) == uuid.UUID(int=1)
    assert decode_value(encode_value(datetime(2026, 1, 1, tzinfo=UTC))).tzinfo is not None
