"""The Session object: mapping behaviour and Laravel's Store API (on MemoryHandler, no database)."""

from __future__ import annotations

from collections.abc import MutableMapping

import pytest

import sqla_sessions
from sqla_sessions import MemoryHandler, SaveAction, Session
from sqla_sessions.core.ids import is_valid_session_id


@pytest.fixture
def handler() -> MemoryHandler:
    return MemoryHandler()


@pytest.fixture
def session(handler: MemoryHandler) -> Session:
    return handler.load(None)


def test_is_a_mutable_mapping(session: Session) -> None:
    assert isinstance(session, MutableMapping)
    session["a"] = 1
    session.update(b=2)
    assert dict(session) == {"a": 1, "b": 2} and len(session) == 2 and "a" in session
    assert session.setdefault("c", 3) == 3 and session.pop("a") == 1
    del session["b"]
    assert list(session) == ["c"]
    with pytest.raises(KeyError):
        del session["missing"]
    with pytest.raises(TypeError):
        session[1] = "x"  # type: ignore[index]
    session.clear()
    assert len(session) == 0


def test_get_put_pull_has_exists_missing(session: Session) -> None:
    session.put("a", 1)
    session.put({"b": None, "c": [1]})
    assert session.get("a") == 1 and session.get("zz", 5) == 5
    # The Mapping contract: a callable default is returned, not called (`session.get("cart", list)`).
    assert session.get("cart", list) is list
    assert session.get_or_call("zz", lambda: 6) == 6 and "zz" not in session  # Laravel's closure default
    assert session.has("a") and not session.has("b") and not session.has("a", "b")
    assert session.has_any("b", "a") and not session.has_any("b", "zz")
    assert session.exists("a", "b") and not session.exists("zz")
    assert session.missing("zz") and not session.missing("b")
    assert session.pull("a") == 1 and "a" not in session and session.pull("a", "gone") == "gone"


def test_forget_flush_only_all_except_all(session: Session) -> None:
    session.put({"a": 1, "b": 2, "c": 3})
    assert session.only("a", "c", "zz") == {"a": 1, "c": 3}
    assert session.all_except("a") == {"b": 2, "c": 3}
    session.forget("a", "zz")
    assert session.all() == {"b": 2, "c": 3}
    session.flush()
    assert session.all() == {}


def test_push_increment_decrement_remember(session: Session) -> None:
    session.push("list", 1)
    session.push("list", 2)
    assert session["list"] == [1, 2]
    session["text"] = "x"
    with pytest.raises(TypeError):
        session.push("text", 1)
    assert session.increment("n") == 1 and session.increment("n", 5) == 6 and session.decrement("n", 2) == 4
    calls: list[int] = []
    assert session.remember("r", lambda: calls.append(1) or "computed") == "computed"
    assert session.remember("r", lambda: calls.append(1) or "again") == "computed"
    assert calls == [1]


def test_token_is_lazy_stable_and_regenerable(session: Session) -> None:
    assert "_token" not in session
    token = session.token()
    assert len(token) >= 40 and session.token() == token
    assert session.regenerate_token() != token


def test_previous_url(session: Session) -> None:
    assert session.previous_url is None
    session.previous_url = "https://example.com/a?b=1"
    assert session.previous_url == "https://example.com/a?b=1"
    session.previous_url = None
    assert "_previous_url" not in session


def test_new_session_has_a_valid_id_but_no_key(session: Session) -> None:
    assert session.is_new and session.key is None and is_valid_session_id(session.id)
    assert session.id == session.id  # stable once minted


def test_modified_and_accessed_flags(handler: MemoryHandler) -> None:
    session = handler.load(None)
    assert not session.accessed and not session.modified
    session["a"] = {"b": [1]}
    session.save()
    loaded = handler.load(session.id)
    assert not loaded.accessed
    loaded["a"]["b"].append(2)
    assert loaded.accessed and loaded.modified


def test_saving_an_untouched_loaded_session_does_nothing(handler: MemoryHandler) -> None:
    session = handler.load(None)
    session["a"] = 1
    session.save()
    assert handler.load(session.id).save() is SaveAction.NOTHING


def test_flash_ages_once_per_request_even_if_saved_twice(handler: MemoryHandler) -> None:
    session = handler.load(None)
    session.flash("msg", "hello")
    session.save()
    session.save()
    assert handler.load(session.id)["msg"] == "hello"


def test_unbound_session_refuses_to_save() -> None:
    with pytest.raises(RuntimeError):
        Session().save()


def test_login_requires_a_user() -> None:
    with pytest.raises(ValueError):
        Session().login(None)


def test_exported_members() -> None:
    assert sorted(sqla_sessions.__all__) == sqla_sessions.__all__
    assert set(sqla_sessions.__all__) == {
        "ConfigurationError",
        "DatabaseHandler",
        "LockTimeout",
        "MemoryHandler",
        "PayloadTooLarge",
        "SaveAction",
        "Session",
        "SessionConfig",
        "SessionError",
        "SessionHandler",
        "SessionInfo",
        "SessionInterrupted",
        "StoreMisconfigured",
        "StoreUnavailable",
        "TooManyRequests",
        "__version__",
        "downgrade",
        "upgrade",
    }
    for name in sqla_sessions.__all__:
        assert getattr(sqla_sessions, name) is not None


def test_error_tree() -> None:
    from sqla_sessions import errors

    for cls in (
        errors.ConfigurationError,
        errors.PayloadTooLarge,
        errors.LockTimeout,
        errors.SessionInterrupted,
        errors.StoreUnavailable,
    ):
        assert issubclass(cls, errors.SessionError)
    assert issubclass(errors.ConfigurationError, ValueError)


def test_memory_handler_satisfies_the_protocol(handler: MemoryHandler) -> None:
    assert isinstance(handler, sqla_sessions.SessionHandler)
