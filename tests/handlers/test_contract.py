"""The handler contract, run on every handler: memory, SQLite file, PostgreSQL, MariaDB."""

from __future__ import annotations

import hashlib
import logging
import time
from typing import Any

import pytest
import sqlalchemy as sa

from sqla_sessions import DatabaseHandler, PayloadTooLarge, SaveAction, SessionConfig, SessionInterrupted
from sqla_sessions.store.handlers.base import BaseHandler
from tests.conftest import FakeClock, HandlerFactory, stored_rows

Handler = BaseHandler[Any]


def new_stored(handler: Handler, **data: Any) -> str:
    """Given a stored session holding *data*, return its id."""
    session = handler.load(None)
    session.put(data or {"seed": 1})
    assert session.save() is SaveAction.INSERTED
    return session.id


# -- ids and lazy creation -------------------------------------------------------------------------


def test_new_session_that_writes_nothing_stores_nothing(handler: Handler) -> None:
    session = handler.load(None)
    _ = session.get("anything")
    assert session.save() is SaveAction.NOTHING
    assert session.is_new
    assert stored_rows(handler) == 0


def test_first_write_creates_one_row_and_reloads(handler: Handler) -> None:
    session = handler.load(None)
    session["cart"] = ["apple"]
    assert session.save() is SaveAction.INSERTED
    assert not session.is_new and session.key is not None
    assert stored_rows(handler) == 1

    again = handler.load(session.id)
    assert again.key == session.key
    assert again["cart"] == ["apple"]


def test_the_id_names_the_row_and_only_a_sha256_of_its_secret_is_stored(handler: Handler) -> None:
    if not isinstance(handler, DatabaseHandler):
        pytest.skip("inspects the SQL table")
    session_id = new_stored(handler, secret="x")
    key, secret = session_id.split(".")
    with handler.engine.connect() as conn:
        rows = conn.execute(sa.select(handler.table)).mappings().all()
    assert len(rows) == 1
    assert rows[0]["key"] == key == handler.load(session_id).key
    assert rows[0]["id_hash"] == hashlib.sha256(secret.encode()).hexdigest()
    assert all(secret not in str(value) for value in rows[0].values())


def test_a_known_key_with_a_wrong_secret_reaches_nothing(handler: Handler) -> None:
    session_id = new_stored(handler, secret="x")
    key, secret = session_id.split(".")
    for forged in (f"{key}.{'A' * 40}", f"{key}.{secret[:-1]}{'B' if secret[-1] != 'B' else 'C'}"):
        session = handler.load(forged)
        assert session.is_new and "secret" not in session
        session["planted"] = 1
        session.save()
        assert session.key != key  # never adopted: a new row of its own
    assert handler.load(session_id).all() == {"secret": "x"}


@pytest.mark.parametrize(
    "cookie",
    [
        "short",
        "x" * 41,
        "a" * 39 + "!",
        "../../etc/passwd",
        "é" * 40,
        " " * 40,
        "\x00" * 40,
        "A" * 40,  # the shape of ids before split tokens (0.1)
        "0" * 32 + "." + "a" * 39,
        "0" * 31 + "G." + "a" * 40,
        "0" * 32 + ":" + "a" * 40,
        "0" * 32 + "." + "a" * 40 + "\n",
    ],
)
def test_malformed_id_gives_a_fresh_session_and_a_warning(
    handler: Handler, cookie: str, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="sqla_sessions"):
        session = handler.load(cookie)
    assert session.is_new and len(session) == 0
    assert session.id != cookie
    assert "malformed" in caplog.text
    assert cookie not in caplog.text


def test_unknown_well_formed_id_is_never_adopted(handler: Handler, caplog: pytest.LogCaptureFixture) -> None:
    planted = "a" * 32 + "." + "A" * 40
    with caplog.at_level(logging.WARNING, logger="sqla_sessions"):
        session = handler.load(planted)
    session["x"] = 1
    session.save()
    assert session.id != planted and session.key != planted[:32]  # neither half is adopted
    assert handler.load(planted).is_new
    assert planted not in caplog.text


# -- per-key merge ----------------------------------------------------------------------------------


def test_concurrent_saves_of_disjoint_keys_both_survive(handler: Handler) -> None:
    session_id = new_stored(handler, base=0)
    first, second = handler.load(session_id), handler.load(session_id)
    first["from_first"] = 1
    second["from_second"] = 2
    assert first.save() is SaveAction.UPDATED
    assert second.save() is SaveAction.MERGED
    assert handler.load(session_id).all() == {"base": 0, "from_first": 1, "from_second": 2}


def test_removed_keys_stay_removed_and_last_write_wins_per_key(handler: Handler) -> None:
    session_id = new_stored(handler, drop=1, shared="old", keep=True)
    first, second = handler.load(session_id), handler.load(session_id)
    del first["drop"]
    first["shared"] = "first"
    second["shared"] = "second"
    second["extra"] = [1]
    first.save()
    second.save()
    assert handler.load(session_id).all() == {"shared": "second", "keep": True, "extra": [1]}


def test_a_merge_does_not_resurrect_a_key_another_writer_removed(handler: Handler) -> None:
    session_id = new_stored(handler, gone="x", mine=0)
    remover, writer = handler.load(session_id), handler.load(session_id)
    assert writer["gone"] == "x"  # read, not changed
    del remover["gone"]
    remover.save()
    writer["mine"] = 1
    assert writer.save() is SaveAction.MERGED
    assert handler.load(session_id).all() == {"mine": 1}


def test_saving_twice_in_one_request_keeps_tracking(handler: Handler) -> None:
    session_id = new_stored(handler, items=[])
    session = handler.load(session_id)
    items = session["items"]
    items.append(1)
    assert session.save() is SaveAction.UPDATED
    items.append(2)  # the same object, mutated after the first save
    assert session.save() is SaveAction.UPDATED
    assert handler.load(session_id)["items"] == [1, 2]


def test_nested_mutation_is_a_change_and_reading_is_not(handler: Handler) -> None:
    session_id = new_stored(handler, cart={"items": [{"sku": "a", "qty": 1}]})
    reader = handler.load(session_id)
    assert reader["cart"]["items"][0]["qty"] == 1
    assert not reader.modified
    writer = handler.load(session_id)
    writer["cart"]["items"][0]["qty"] += 1
    assert writer.modified
    writer.save()
    assert handler.load(session_id)["cart"] == {"items": [{"sku": "a", "qty": 2}]}


def test_setting_an_equal_value_is_not_a_change_but_a_type_change_is(handler: Handler) -> None:
    session_id = new_stored(handler, n=1, flag=True)
    session = handler.load(session_id)
    session["n"] = 1
    assert not session.modified
    session["flag"] = 1  # True == 1 in Python, but it would come back as another type
    assert session.modified


# -- destroyed, expired, touched ----------------------------------------------------------------------


def test_save_after_destroy_raises_and_does_not_recreate(handler: Handler) -> None:
    session_id = new_stored(handler, a=1)
    late = handler.load(session_id)
    late["b"] = 2
    assert handler.revoke(late.key or "")
    with pytest.raises(SessionInterrupted):
        late.save()
    assert stored_rows(handler) == 0
    assert handler.load(session_id).is_new


def test_save_after_expiry_raises_and_does_not_extend(handler: Handler, clock: FakeClock) -> None:
    session_id = new_stored(handler, a=1)
    late = handler.load(session_id)
    late["b"] = 2
    clock.advance(handler.config.lifetime_seconds + 1)
    with pytest.raises(SessionInterrupted):
        late.save()
    clock.advance(-2)  # just inside the lifetime again: the row must hold the old data only
    assert handler.load(session_id).all() == {"a": 1}


def test_idle_expiry_slides_with_activity(make_handler: HandlerFactory, clock: FakeClock) -> None:
    handler = make_handler(lifetime=10, touch_interval=60)
    session_id = new_stored(handler)
    for _ in range(3):
        clock.advance(9 * 60)
        session = handler.load(session_id)
        assert not session.is_new
        assert session.save() is SaveAction.TOUCHED
    clock.advance(10 * 60)
    assert handler.load(session_id).is_new


def test_absolute_lifetime_caps_sliding_expiry(make_handler: HandlerFactory, clock: FakeClock) -> None:
    handler = make_handler(lifetime=10, absolute_lifetime=25)
    session_id = new_stored(handler)
    clock.advance(9 * 60)
    handler.load(session_id).save()
    clock.advance(9 * 60)
    session = handler.load(session_id)
    session["x"] = 1
    session.save()
    assert session.expires_at == session.created_at + 25 * 60  # type: ignore[operator]
    clock.advance(8 * 60)  # 26 minutes after creation, 8 after the last activity
    assert handler.load(session_id).is_new


def test_a_session_of_its_own_lifetime_slides_by_it_on_touches_and_merges(
    make_handler: HandlerFactory, clock: FakeClock
) -> None:
    handler = make_handler(lifetime=10, touch_interval=60)
    session_id = new_stored(handler)
    session = handler.load(session_id)
    session.set_lifetime(idle=3600)
    assert session.save() is SaveAction.UPDATED
    assert session.expires_at == clock() // 1 + 3600 and session.lifetime == (3600, None)
    other = handler.load(session_id)  # a writer that knows nothing of the lifetime
    clock.advance(50 * 60)  # past the config's 10 minutes
    other = handler.load(session_id)
    assert not other.is_new and other.lifetime == (3600, None)
    assert other.save() is SaveAction.TOUCHED  # the touch slides by the session's own hour
    assert other.expires_at == int(clock()) + 3600
    stale = handler.load(session_id)
    racing = handler.load(session_id)
    racing["x"] = 1
    racing.save()
    stale["y"] = 2
    assert stale.save() is SaveAction.MERGED  # a merged write keeps the lifetime
    clock.advance(59 * 60)
    back = handler.load(session_id)
    assert back.all() == {"seed": 1, "x": 1, "y": 2} and back.lifetime == (3600, None)
    back.set_lifetime()  # back to the config's
    back.save()
    clock.advance(11 * 60)
    assert handler.load(session_id).is_new


def test_a_stale_touch_never_undoes_a_new_lifetime(make_handler: HandlerFactory, clock: FakeClock) -> None:
    handler = make_handler(lifetime=10, touch_interval=60)
    session_id = new_stored(handler)
    clock.advance(61)
    stale = handler.load(session_id)  # a read-only request whose touch is due, loaded before the change
    remembered = handler.load(session_id)
    remembered.set_lifetime(idle=3600)
    remembered.save()
    assert stale.save() is SaveAction.NOTHING  # its expiry came from the old lifetime: not written
    assert handler.load(session_id).expires_at == int(clock()) + 3600


def test_a_lifetime_in_the_past_ends_the_session_at_save(handler: Handler) -> None:
    session_id = new_stored(handler)
    session = handler.load(session_id)
    session.set_lifetime(idle=-10)
    session.save()
    assert handler.load(session_id).is_new
    with pytest.raises(TypeError):
        session.set_lifetime(idle=1.5)  # type: ignore[arg-type]


def test_login_remember_me_gets_the_remember_lifetime(make_handler: HandlerFactory, clock: FakeClock) -> None:
    handler = make_handler(lifetime=10, absolute_lifetime=60, remember_lifetime=60 * 24 * 30)
    session = handler.load(None)
    session["cart"] = ["apple"]
    session.login("ada", remember=True)
    session.save()
    month = 30 * 24 * 3600
    assert session.lifetime == (month, month) and session.expires_at == int(clock()) + month
    clock.advance(20 * 24 * 3600)
    again = handler.load(session.id)
    assert again.user_id == "ada" and again["cart"] == ["apple"]
    assert [info.key for info in handler.list_sessions("ada")] == [again.key]  # one row, revocable
    plain = handler.load(None)
    plain.login("bob")
    plain.save()
    assert plain.lifetime == (None, None) and plain.expires_at == int(clock()) + 10 * 60


def test_unchanged_session_is_touched_at_most_every_touch_interval(
    make_handler: HandlerFactory, clock: FakeClock
) -> None:
    handler = make_handler(touch_interval=60)
    session_id = new_stored(handler)
    clock.advance(30)
    assert handler.load(session_id).save() is SaveAction.NOTHING
    clock.advance(31)
    touched = handler.load(session_id)
    assert touched.save() is SaveAction.TOUCHED
    assert touched.last_activity == int(clock.now)
    assert handler.load(session_id).save() is SaveAction.NOTHING


def test_writes_record_activity_at_most_every_touch_interval(make_handler: HandlerFactory, clock: FakeClock) -> None:
    """Like touches: a write inside the interval leaves last_activity/expires_at (indexed) as they are."""
    handler = make_handler(touch_interval=60, lifetime=10)
    session_id = new_stored(handler, n=0)
    created = int(clock.now)
    clock.advance(30)
    session = handler.load(session_id)
    session["n"] = 1
    assert session.save() is SaveAction.UPDATED
    again = handler.load(session_id)
    assert (again["n"], again.last_activity, again.expires_at) == (1, created, created + 10 * 60)
    clock.advance(31)
    again["n"] = 2
    assert again.save() is SaveAction.UPDATED
    latest = handler.load(session_id)
    assert (latest["n"], latest.last_activity, latest.expires_at) == (2, int(clock.now), int(clock.now) + 10 * 60)


def test_touch_of_a_destroyed_session_raises(handler: Handler, clock: FakeClock) -> None:
    session_id = new_stored(handler)
    session = handler.load(session_id)
    handler.revoke(session.key or "")
    clock.advance(handler.config.touch_interval + 1)
    with pytest.raises(SessionInterrupted):
        session.save()
    assert stored_rows(handler) == 0


# -- regenerate, invalidate, login, logout ----------------------------------------------------------


def test_a_token_created_under_the_old_id_during_a_login_does_not_cross_over(handler: Handler) -> None:
    session_id = new_stored(handler)
    victim = handler.load(session_id)  # no CSRF token yet (tokens are created on first use)
    attacker = handler.load(session_id)  # holds the same (planted) id
    planted_token = attacker.token()
    attacker.save()
    victim.login("ada")
    victim.save()
    after = handler.load(victim.id)
    assert after.user_id == "ada" and after.get("_token") != planted_token


def test_a_login_without_remember_ends_a_remembered_lifetime(make_handler: HandlerFactory) -> None:
    handler = make_handler()
    session = handler.load(None)
    session.login("ada", remember=True)
    session.save()
    again = handler.load(session.id)
    again.login("ada")
    again.save()
    assert handler.load(again.id).lifetime == (None, None)


def test_regenerate_keeps_key_and_data_and_kills_the_old_id(handler: Handler) -> None:
    old_id = new_stored(handler, a=1)
    session = handler.load(old_id)
    key, token = session.key, session.token()
    session.regenerate()
    assert session.id != old_id and session.id_changed
    assert session.token() != token
    session.save()
    assert handler.load(old_id).is_new
    fresh = handler.load(session.id)
    assert fresh.key == key and fresh["a"] == 1


def test_regenerate_without_destroy_keeps_the_old_id_reaching_the_same_session(handler: Handler) -> None:
    old_id = new_stored(handler, a=1)
    session = handler.load(old_id)
    key = session.key
    session.regenerate(destroy=False)
    session["b"] = 2
    session.save()
    assert session.key == key and session.id != old_id  # the same row: no copy to drift apart
    late = handler.load(old_id)  # a request in flight, or another tab, with the old cookie
    assert late.key == key and late.all_except("_token") == {"a": 1, "b": 2}
    late["c"] = 3
    late.save()
    assert handler.load(session.id).all_except("_token") == {"a": 1, "b": 2, "c": 3}
    again = handler.load(session.id)
    again.regenerate()  # a plain regenerate ends every earlier id
    again.save()
    assert handler.load(old_id).is_new and handler.load(session.id).is_new
    assert handler.load(again.id)["c"] == 3


def test_only_the_id_the_browser_holds_can_be_kept_never_one_a_login_or_regenerate_ended(handler: Handler) -> None:
    for end in ("login", "regenerate"):
        old_id = new_stored(handler, a=1)
        session = handler.load(old_id)
        session.login("u1") if end == "login" else session.regenerate()
        session.regenerate(destroy=False)  # later in the same request: keeps nothing earlier
        session.save()
        old_secret = old_id.split(".")[1]
        assert handler.load(old_id).is_new
        assert handler.load(f"{session.key}.{old_secret}").is_new, end
        assert handler.load(session.id)["a"] == 1


def test_a_login_ends_the_id_a_regenerate_kept(handler: Handler) -> None:
    old_id = new_stored(handler, a=1)
    session = handler.load(old_id)
    session.regenerate(destroy=False)
    session.save()
    kept = session.id
    login = handler.load(old_id)
    login.login("u1")
    login.save()
    assert handler.load(old_id).is_new and handler.load(kept).is_new
    assert handler.load(login.id).user_id == "u1"


def test_invalidate_deletes_the_row_and_starts_over(handler: Handler) -> None:
    old_id = new_stored(handler, a=1)
    session = handler.load(old_id)
    old_key = session.key
    session.invalidate()
    assert len(session) == 0 and session.is_new and session.invalidated
    assert session.save() is SaveAction.DELETED
    assert stored_rows(handler) == 0
    session["after"] = 1
    assert session.save() is SaveAction.INSERTED
    assert session.key != old_key and session.id != old_id
    assert handler.load(old_id).is_new


def test_login_sets_the_user_and_regenerates(handler: Handler) -> None:
    old_id = new_stored(handler, cart=[1])
    session = handler.load(old_id)
    session.login(42)
    session.save()
    assert session.user_id == "42"
    assert handler.load(old_id).is_new
    again = handler.load(session.id)
    assert again.user_id == "42" and again["cart"] == [1]


def test_logout_deletes_the_stored_session(handler: Handler) -> None:
    session = handler.load(None)
    session.login("alice")
    session.save()
    session_id = session.id
    session.logout()
    session.save()
    assert handler.load(session_id).is_new
    assert stored_rows(handler) == 0


def test_a_login_cuts_off_whatever_loaded_the_session_before_it(handler: Handler) -> None:
    """Session fixation with a request held open: the attacker's request neither writes nor reads the victim's."""
    session_id = new_stored(handler, planted=True)
    attacker = handler.load(session_id)  # loaded under the planted id, still running
    victim = handler.load(session_id)
    old_key = victim.key
    victim.login("alice")
    victim["card"] = "4111"
    victim.save()
    assert victim.key != old_key and handler.load_by_key(old_key or "") is None

    attacker["is_admin"] = True
    with pytest.raises(SessionInterrupted):
        attacker.save()
    stored = handler.load(victim.id)
    assert stored.user_id == "alice" and "is_admin" not in stored and stored["card"] == "4111"

    attacker.reload()  # a reload gives a fresh session, never the logged-in one
    assert attacker.is_new and len(attacker) == 0 and attacker.user_id is None


def test_change_privilege_cuts_off_like_login_and_regenerate_does_not(handler: Handler) -> None:
    session_id = new_stored(handler, a=1)
    other = handler.load(session_id)
    rotating = handler.load(session_id)
    rotating.regenerate()  # a plain rotation: in-flight requests still land
    rotating.save()
    other["b"] = 2
    assert other.save() is SaveAction.MERGED
    assert handler.load(rotating.id)["b"] == 2

    late = handler.load(rotating.id)
    sudo = handler.load(rotating.id)
    sudo.change_privilege()  # sudo mode: a change of privilege, as login() is
    sudo.save()
    late["c"] = 3
    with pytest.raises(SessionInterrupted):
        late.save()
    assert "c" not in handler.load(sudo.id) and handler.load(sudo.id)["b"] == 2


def test_login_as_another_user_starts_from_an_empty_session(handler: Handler) -> None:
    session = handler.load(None)
    session.login("alice")
    session["alice_secret"] = 1
    session.save()
    same = handler.load(session.id)
    same.login("alice")  # the same user again keeps the data
    same.save()
    assert handler.load(same.id)["alice_secret"] == 1
    switching = handler.load(same.id)
    switching.login("bob")
    switching.save()
    bob = handler.load(switching.id)
    assert bob.user_id == "bob" and "alice_secret" not in bob
    assert handler.list_sessions("alice") == []


@pytest.mark.parametrize("how", ["clear", "flush"])
def test_clear_and_flush_log_the_user_out(handler: Handler, how: str) -> None:
    session = handler.load(None)
    session.login("alice")
    session["x"] = 1
    session.save()
    loaded = handler.load(session.id)
    getattr(loaded, how)()
    assert loaded.user_id is None and len(loaded) == 0
    loaded["after"] = "logout"  # Flask apps often write right after session.clear()
    loaded.save()
    assert handler.list_sessions("alice") == []
    assert handler.load(session.id).is_new  # the logged-in id is dead
    fresh = handler.load(loaded.id)
    assert fresh.user_id is None and fresh.all() == {"after": "logout"}


# -- payload limits, encryption, corruption --------------------------------------------------------


def test_oversized_save_raises_and_leaves_the_stored_session_intact(make_handler: HandlerFactory) -> None:
    handler = make_handler(max_payload_bytes=1024)
    session_id = new_stored(handler, small="ok")
    session = handler.load(session_id)
    session["big"] = "x" * 2000
    with pytest.raises(PayloadTooLarge) as caught:
        session.save()
    assert caught.value.limit == 1024
    assert handler.load(session_id).all() == {"small": "ok"}


def test_oversized_first_save_stores_nothing(make_handler: HandlerFactory) -> None:
    handler = make_handler(max_payload_bytes=1024)
    session = handler.load(None)
    session["big"] = "x" * 2000
    with pytest.raises(PayloadTooLarge):
        session.save()
    assert stored_rows(handler) == 0


KEY_OLD = "MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY"  # base64url of 32 bytes
KEY_NEW = "ZmVkY2JhOTg3NjU0MzIxMGZlZGNiYTk4NzY1NDMyMTA"


def test_encrypted_payloads_round_trip_and_are_not_plaintext(make_handler: HandlerFactory) -> None:
    handler = make_handler(encryption_keys=(KEY_NEW,))
    session_id = new_stored(handler, secret="top-secret-value")
    assert handler.load(session_id)["secret"] == "top-secret-value"
    if isinstance(handler, DatabaseHandler):
        with handler.engine.connect() as conn:
            payload = conn.execute(sa.select(handler.table.c.payload)).scalar_one()
        assert b"top-secret-value" not in bytes(payload)


def test_key_rotation_reads_old_rows_and_writes_the_newest_key(make_handler: HandlerFactory) -> None:
    old_handler = make_handler(encryption_keys=(KEY_OLD,))
    session_id = new_stored(old_handler, a=1)
    rotated = make_handler(encryption_keys=(KEY_NEW, KEY_OLD))
    session = rotated.load(session_id)
    assert session["a"] == 1
    session["b"] = 2
    session.save()
    only_new = make_handler(encryption_keys=(KEY_NEW,))
    assert only_new.load(session_id).all() == {"a": 1, "b": 2}
    assert old_handler.load(session_id).is_new  # the old key alone can no longer open it


def test_corrupt_or_undecryptable_payload_gives_a_fresh_session_and_a_warning(
    make_handler: HandlerFactory, caplog: pytest.LogCaptureFixture
) -> None:
    plain = make_handler()
    session_id = new_stored(plain, a=1)
    encrypted = make_handler(encryption_keys=(KEY_NEW,))
    with caplog.at_level(logging.WARNING, logger="sqla_sessions"):
        session = encrypted.load(session_id)
    assert session.is_new and "unreadable session payload" in caplog.text


# -- devices and GC ------------------------------------------------------------------------------


def test_device_management(handler: Handler, clock: FakeClock) -> None:
    keys = []
    for agent in ("phone", "laptop", "tablet"):
        session = handler.load(None)
        session.ip_address, session.user_agent = "203.0.113.9", agent
        session.login("alice")
        session.save()
        keys.append(session.key)
        clock.advance(5)
    bob = handler.load(None)
    bob.login("bob")
    bob.save()

    listed = handler.list_sessions("alice")
    assert [info.user_agent for info in listed] == ["tablet", "laptop", "phone"]
    assert all(info.ip_address == "203.0.113.9" and info.user_id == "alice" for info in listed)
    assert listed[0].last_activity >= listed[1].last_activity

    assert handler.revoke(keys[0] or "")
    assert not handler.revoke(keys[0] or "")
    assert handler.revoke_user("alice", except_key=keys[2]) == 1
    assert [info.key for info in handler.list_sessions("alice")] == [keys[2]]
    assert len(handler.list_sessions("bob")) == 1
    assert handler.list_sessions("Alice") == []  # user ids are case-sensitive on every backend


def test_device_list_excludes_expired_sessions(handler: Handler, clock: FakeClock) -> None:
    session = handler.load(None)
    session.login(7)
    session.save()
    clock.advance(handler.config.lifetime_seconds)
    assert handler.list_sessions(7) == []


def test_gc_deletes_only_expired_rows_in_bounded_batches(handler: Handler, clock: FakeClock) -> None:
    for _ in range(7):
        new_stored(handler)
    clock.advance(handler.config.lifetime_seconds + 1)
    live_id = new_stored(handler, live=True)
    batches: list[int] = []
    assert handler.gc(batch_size=3, on_batch=batches.append) == 7
    assert batches == [3, 3, 1]
    assert stored_rows(handler) == 1
    assert handler.load(live_id)["live"] is True


def test_a_paced_gc_pauses_between_batches_only(make_handler: HandlerFactory, clock: FakeClock) -> None:
    handler = make_handler(gc_pause=0.05)
    for _ in range(5):
        new_stored(handler)
    clock.advance(handler.config.lifetime_seconds + 1)
    started = time.monotonic()
    assert handler.gc(batch_size=2) == 5  # batches of 2, 2, 1: two pauses, none after the last
    assert 0.1 <= time.monotonic() - started < 1
    for _ in range(2):
        new_stored(handler)
    clock.advance(handler.config.lifetime_seconds + 1)
    started = time.monotonic()
    assert handler.gc(batch_size=1, max_batches=1, pause=5) == 1  # one batch asked: no pause after it
    assert handler.gc(batch_size=5, pause=0) == 1 and time.monotonic() - started < 1


def test_a_device_list_reads_no_payload(handler: Handler) -> None:
    session = handler.load(None)
    session["big"] = "x" * 5000
    session.login("ada")
    session.save()
    (device,) = handler.list_sessions("ada")
    assert device.key == session.key and handler.load(session.id)["big"] == "x" * 5000


# -- background-job access and reload -------------------------------------------------------------


def test_load_by_key_sees_the_session_without_its_id(handler: Handler) -> None:
    session_id = new_stored(handler, a=1)
    key = handler.load(session_id).key
    assert key is not None
    job_view = handler.load_by_key(key)
    assert job_view is not None and job_view["a"] == 1
    with pytest.raises(RuntimeError):
        _ = job_view.id
    job_view["result"] = "done"
    job_view.save()
    assert handler.load(session_id)["result"] == "done"
    handler.revoke(key)
    assert handler.load_by_key(key) is None


def test_reload_keeps_unsaved_changes_on_top(handler: Handler) -> None:
    session_id = new_stored(handler, shared="old", mine="old")
    session = handler.load(session_id)
    assert session["shared"] == "old"
    session["mine"] = "unsaved"
    other = handler.load(session_id)
    other["shared"] = "theirs"
    other["job"] = "result"
    other.save()
    session.reload()
    assert session.all() == {"shared": "theirs", "mine": "unsaved", "job": "result"}
    session.save()
    assert handler.load(session_id).all() == {"shared": "theirs", "mine": "unsaved", "job": "result"}


def test_reload_of_a_destroyed_session_gives_a_fresh_one(handler: Handler) -> None:
    old_id = new_stored(handler, secret=1)
    session = handler.load(old_id)
    session["unsaved"] = True
    handler.revoke(session.key or "")
    session.reload()
    assert session.is_new and len(session) == 0 and session.id != old_id
    session["again"] = 1
    with pytest.raises(SessionInterrupted):  # like any save of a request that loaded a session now gone
        session.save()
    assert handler.load(old_id).is_new and stored_rows(handler) == 0


# -- flash data across requests ---------------------------------------------------------------------


def request(handler: Handler, session_id: str | None) -> tuple[str, dict[str, Any]]:
    """One request that only reads: return the id and what the request saw."""
    session = handler.load(session_id)
    seen = session.all()
    session.save()
    return session.id, seen


def test_flash_survives_exactly_one_following_request(handler: Handler) -> None:
    session = handler.load(None)
    session.flash("status", "saved")
    session.save()
    _, seen = request(handler, session.id)
    assert seen["status"] == "saved"
    _, seen = request(handler, session.id)
    assert "status" not in seen


def test_flash_outlives_requests_that_never_showed_it(make_handler: HandlerFactory) -> None:
    handler = make_handler()
    session = handler.load(None)
    session.flash("status", "saved")
    session.flash("other", "note")
    session.save()
    poll = handler.load(session.id)  # an XHR poll, an asset: reads something else
    poll["clicks"] = poll.get("clicks", 0) + 1
    poll.save()
    page = handler.load(session.id)
    assert page["status"] == "saved"  # still there for the page that shows it
    page.save()
    after = handler.load(session.id)
    assert "status" not in after and after["other"] == "note"  # only what was read went
    after.mark_page_shown()  # a rendered page shows every flashed value
    after.save()
    final = handler.load(session.id)
    assert "other" not in final and final["_flash"] == {"new": [], "old": []}  # emptied, kept (merges)


def test_a_flash_racing_the_request_that_empties_the_state_is_kept_and_aged(handler: Handler) -> None:
    session = handler.load(None)
    session.flash("notice", "Profile updated")
    session.save()
    showing = handler.load(session.id)  # the page that shows it (and empties the flash state)
    flashing = handler.load(session.id)  # another tab flashes meanwhile
    assert showing["notice"] == "Profile updated"
    flashing.flash("saved", "Saved")
    showing.save()
    flashing.save()  # merged onto the emptied state: both list edits compose
    page = handler.load(session.id)
    assert page["saved"] == "Saved" and "notice" not in page
    page.save()
    assert "saved" not in handler.load(session.id)  # aged like any flash: nothing left behind


def test_flash_aging_request_is_laravels_rule(make_handler: HandlerFactory) -> None:
    handler = make_handler(SessionConfig(flash_aging="request"))
    session = handler.load(None)
    session.flash("status", "saved")
    session.save()
    poll = handler.load(session.id)
    poll["clicks"] = 1
    poll.save()
    assert "status" not in handler.load(session.id)


def test_now_is_gone_after_this_request_and_keep_extends(handler: Handler) -> None:
    session = handler.load(None)
    session.now("inline", 1)
    session.flash("a", 1)
    session.flash("b", 2)
    session.save()
    assert "inline" not in handler.load(session.id)
    second = handler.load(session.id)
    assert second["b"] == 2  # shown
    second.keep("a")
    second.save()
    third = handler.load(session.id)
    assert third.get("a") == 1 and "b" not in third
    third.reflash()
    third.save()
    assert handler.load(session.id).get("a") == 1


def test_config_rejected_before_any_write(make_handler: HandlerFactory) -> None:
    with pytest.raises(ValueError, match="lifetime"):
        make_handler(lifetime=0)


def test_unsupported_value_raises_type_error_naming_the_key(handler: Handler) -> None:
    session = handler.load(None)
    session["fine"] = 1
    session["bad"] = object()
    with pytest.raises(TypeError, match="'bad'"):
        session.save()
    assert stored_rows(handler) == 0


def test_config_default_is_used(handler: Handler) -> None:
    assert handler.config == SessionConfig()


def test_stats_count_live_expired_and_users(handler: Handler, clock: FakeClock) -> None:
    for user in ("a", "a", "b"):
        session = handler.load(None)
        session.login(user)
        session.save()
    clock.advance(handler.config.lifetime_seconds + 1)
    new_stored(handler)
    anonymous = handler.load(None)
    anonymous["x"] = 1
    anonymous.save()
    stats = handler.stats()
    assert (stats.live, stats.expired, stats.users) == (2, 3, 0)
    late = handler.load(None)
    late.login("c")
    late.save()
    assert handler.stats().users == 1
    if isinstance(handler, DatabaseHandler) and handler.engine.dialect.name != "sqlite":
        assert (handler.stats().table_bytes or 0) > 0


# -- the unit of work, as a hostile review probed it ------------------------------------------------


def test_a_save_that_only_changes_the_id_keeps_the_payload(handler: Handler) -> None:
    session_id = new_stored(handler, cart=["a", "b"], pref="dark")
    session = handler.load(session_id)
    session.regenerate()
    session.forget("_token")  # an app that does not use the CSRF token: only the id changed
    session.save()
    assert handler.load(session.id).all() == {"cart": ["a", "b"], "pref": "dark"}


def test_reload_merges_unsaved_changes_onto_what_others_stored(handler: Handler) -> None:
    session_id = new_stored(handler, cart=["a"], n=1)
    mine, theirs = handler.load(session_id), handler.load(session_id)
    mine.push("cart", "x")
    mine.increment("n")
    theirs.push("cart", "y")
    theirs.increment("n")
    theirs.save()
    mine.reload()
    assert sorted(mine["cart"]) == ["a", "x", "y"] and mine["n"] == 3
    mine.save()
    stored = handler.load(session_id)
    assert sorted(stored["cart"]) == ["a", "x", "y"] and stored["n"] == 3


def test_a_value_handed_out_before_a_merged_mid_request_save_is_still_watched(handler: Handler) -> None:
    session_id = new_stored(handler, cart=["a"], other=1)
    session = handler.load(session_id)
    cart = session["cart"]
    cart.append("x")
    others = session["other"], session.get("cart")
    concurrent = handler.load(session_id)
    concurrent.push("cart", "y")
    concurrent.save()
    assert session.save(end_of_request=False) is SaveAction.MERGED
    assert cart == ["a", "y", "x"]  # the object the app holds shows what is stored ...
    cart.append("z")  # ... and later changes to it are still saved
    session.save()
    assert handler.load(session_id)["cart"] == ["a", "y", "x", "z"] and others[0] == 1


def test_two_requests_regenerating_at_once_both_leave_a_working_id(handler: Handler) -> None:
    session_id = new_stored(handler, cart=["a"])
    first, second = handler.load(session_id), handler.load(session_id)
    first.regenerate(destroy=False)
    first.push("cart", "b")
    first.save()
    second.regenerate(destroy=False)
    second.push("cart", "c")
    assert second.save() is SaveAction.MERGED
    # The browser keeps whichever response came last: both ids open the merged session.
    for presented in (first.id, second.id):
        assert handler.load(presented)["cart"] == ["a", "b", "c"]
    assert handler.load(session_id).is_new  # the id both started from is two regenerations old


def test_a_logout_racing_with_a_regenerate_ends_the_session_for_every_id(handler: Handler) -> None:
    session_id = new_stored(handler, a=1)
    tab_a, tab_b = handler.load(session_id), handler.load(session_id)
    tab_a.regenerate(destroy=False)
    tab_a.save()
    tab_b.logout()
    tab_b.save()
    assert handler.load(session_id).is_new and handler.load(tab_a.id).is_new


def test_clear_keeps_the_exactly_once_job_record(handler: Handler) -> None:
    session_id = new_stored(handler, credits=10, _jobs=["job-1"])
    session = handler.load(session_id)
    session.clear()  # an anonymous session: cleared, not invalidated
    session.save()
    assert handler.load(session_id).all() == {"_jobs": ["job-1"]}


def test_a_login_whose_session_ended_meanwhile_starts_a_session_of_its_own(handler: Handler) -> None:
    """The same login form submitted twice: the second finds the session moved by the first; it logs
    in all the same (a browser may keep only its response), in a session nothing else reaches."""
    session_id = new_stored(handler, cart=["a"])
    first, second = handler.load(session_id), handler.load(session_id)
    first.login("ada")
    first.save()
    second.login("ada")
    assert second.save() is SaveAction.INSERTED
    assert {first.key, second.key}.isdisjoint({None}) and first.key != second.key
    for session in (first, second):
        stored = handler.load(session.id)
        assert stored.user_id == "ada" and stored["cart"] == ["a"]
    assert handler.load(session_id).is_new


def test_nested_values_handed_out_stay_watched_across_merges_and_reloads(handler: Handler) -> None:
    session_id = new_stored(handler, cart={"items": ["apple"]}, tags=["x"])
    session = handler.load(session_id)
    items = session["cart"]["items"]
    items.append("pear")
    concurrent = handler.load(session_id)
    concurrent["coupon"] = "SPRING"
    concurrent["cart"]["note"] = "gift"
    concurrent.save()
    assert session.save(end_of_request=False) is SaveAction.MERGED
    items.append("plum")  # the nested list the app holds is still the session's
    tags = session["tags"]
    session.reload()
    tags.append("y")  # read before the reload, changed after it
    session.save()
    stored = handler.load(session_id)
    assert stored["cart"] == {"items": ["apple", "pear", "plum"], "note": "gift"}
    assert stored["tags"] == ["x", "y"] and stored["coupon"] == "SPRING"


def test_change_privilege_never_brings_back_a_revoked_session(handler: Handler) -> None:
    session = handler.load(None)
    session.login("alice")
    session["cart"] = ["x"]
    session.save()
    in_flight = handler.load(session.id)
    handler.revoke_user("alice")  # "log out everywhere", or a logout in another tab
    in_flight.change_privilege()  # a sudo step that loaded the session before
    with pytest.raises(SessionInterrupted):
        in_flight.save()
    assert handler.list_sessions("alice") == []


def test_increments_after_a_mid_request_save_still_compose(handler: Handler) -> None:
    session_id = new_stored(handler, n=5)
    mine = handler.load(session_id)
    mine.increment("n")
    mine.save(end_of_request=False)
    mine.increment("n")
    theirs = handler.load(session_id)
    theirs.increment("n", 10)
    theirs.save()
    mine.save()
    assert handler.load(session_id)["n"] == 17


def test_a_login_after_a_reload_that_found_the_session_gone_logs_in(handler: Handler) -> None:
    session_id = new_stored(handler, cart=["a"])
    first, second = handler.load(session_id), handler.load(session_id)
    first.login("ada")
    first.save()
    second.reload()  # gone under its key: a fresh session
    second.login("ada")  # which may log in, like any fresh session
    assert second.save() is SaveAction.INSERTED
    assert handler.load(second.id).user_id == "ada"


def test_a_user_id_the_column_cannot_hold_is_refused_at_login(handler: Handler) -> None:
    session = handler.load(None)
    for bad in ("x" * 256, "nul\x00byte", ""):
        with pytest.raises(ValueError, match="user id"):
            session.login(bad)
    session.login("x" * 255)
    session.save()
    assert handler.load(session.id).user_id == "x" * 255
