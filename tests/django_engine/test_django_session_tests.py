"""Django's own `SessionTestsMixin` (from its source distribution) with `sqla_sessions.django` as the
backend, on PostgreSQL and SQLite; plus what the mixin does not ask: per-key merges, the user
mirror, expiry on the row, bounded clean-up.

Where Django's tests encode a storage detail we differ on, the test is named and overridden below
with the reason (see the README's Django section).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import django
import pytest
import sqlalchemy as sa
from django.conf import settings

from tests.conftest import IN_CI, backend_for
from tests.django_engine.django_source import sessions_tests_parent

try:
    sys.path.insert(0, str(sessions_tests_parent()))
except Exception as exc:  # no PyPI: the suite cannot get Django's tests
    if IN_CI:
        raise
    pytest.skip(f"Django's source distribution is not reachable: {exc}", allow_module_level=True)

if not settings.configured:
    settings.configure(
        SECRET_KEY="sqla-sessions-tests",
        INSTALLED_APPS=[
            "django.contrib.contenttypes",
            "django.contrib.auth",
            "django.contrib.sessions",
            "sessions_tests",  # Django's test package: its models module must belong to an app
            "sqla_sessions.django",
        ],
        DATABASES={"default": {"ENGINE": "django.db.backends.sqlite3", "NAME": ":memory:"}},
        SESSION_ENGINE="sqla_sessions.django",
        USE_TZ=True,
        SQLA_SESSIONS={"database_url": "sqlite://"},  # replaced per test class
    )
    django.setup()

from django.contrib.sessions.backends.base import UpdateError
from django.core.management import call_command
from django.test import SimpleTestCase, override_settings
from sessions_tests.tests import SessionTestsMixin  # type: ignore[import-not-found]

from sqla_sessions import SaveAction
from sqla_sessions.django import SessionStore, database_url_for, handler, session_config


@pytest.fixture(scope="class", autouse=True)
def sessions_database(request: pytest.FixtureRequest, tmp_root: Path) -> Iterator[None]:
    database = getattr(request.cls, "database", None)
    if database is None:
        yield
        return
    backend = backend_for(database, tmp_root)
    with override_settings(SQLA_SESSIONS={"database_url": backend.url, "lottery": (0, 1)}):
        yield


class DjangosOwnSessionTests(SessionTestsMixin, SimpleTestCase):  # type: ignore[misc]
    backend = SessionStore
    database = "postgresql"


class DjangosOwnSessionTestsOnSQLite(DjangosOwnSessionTests):
    database = "sqlite"


class EngineTests(SimpleTestCase):
    database = "postgresql"

    def test_two_requests_writing_different_keys_and_one_list_keep_everything(self) -> None:
        first = SessionStore()
        first["cart"] = ["apple"]
        first.save()
        key = first.session_key
        a, b = SessionStore(key), SessionStore(key)
        cart = a["cart"]
        cart.append("pear")
        a["cart"] = cart  # Django code assigns (or sets modified) after a change in place
        b["cart"] = [*b["cart"], "plum"]
        b["theme"] = "dark"
        a.save()
        b.save()  # lost the race: merged, not overwritten
        assert SessionStore(key).load() == {"cart": ["apple", "pear", "plum"], "theme": "dark"}

    def test_login_via_auth_user_key_sets_the_user_and_rotates(self) -> None:
        session = SessionStore()
        session["cart"] = ["apple"]
        session.save()
        anonymous = session.session_key
        session.cycle_key()  # what django.contrib.auth.login() does first
        session["_auth_user_id"] = "42"
        session.save()
        assert session.session_key not in (None, anonymous) and not session.exists(anonymous)
        devices = handler().list_sessions(42)
        assert len(devices) == 1 and SessionStore(session.session_key)["cart"] == ["apple"]
        assert devices[0].key == session.session_key.split(".")[0]
        session.flush()  # logout()
        assert handler().list_sessions(42) == []

    def test_a_user_key_set_without_cycle_key_still_rotates(self) -> None:
        session = SessionStore()
        session["x"] = 1
        session.save()
        before = session.session_key
        session["_auth_user_id"] = "7"
        session.save()
        assert session.session_key != before and not session.exists(before)
        assert SessionStore(session.session_key).load() == {"x": 1, "_auth_user_id": "7"}

    def test_a_revoked_session_makes_save_raise_update_error(self) -> None:
        session = SessionStore()
        session["_auth_user_id"] = "9"
        session.save()
        assert handler().revoke_user(9) == 1
        session["more"] = 1
        with pytest.raises(UpdateError):
            session.save()

    def test_set_expiry_seconds_is_the_rows_sliding_lifetime(self) -> None:
        session = SessionStore()
        session["x"] = 1
        session.set_expiry(3600)
        session.save()
        stored = handler().load(session.session_key)
        assert stored.lifetime == (3600, None)
        assert stored.expires_at is not None and stored.created_at is not None
        assert stored.expires_at - stored.created_at == 3600
        session.set_expiry(None)
        session.save()
        assert handler().load(session.session_key).lifetime == (None, None)

    def test_a_login_whose_session_moved_meanwhile_starts_afresh(self) -> None:
        session = SessionStore()
        session["cart"] = ["apple"]
        session.save()
        key = session.session_key
        first, second = SessionStore(key), SessionStore(key)  # the login form submitted twice
        assert first["cart"] == second["cart"] == ["apple"]
        first.cycle_key()
        first["_auth_user_id"] = "5"
        first.save()
        second.cycle_key()  # the row moved away: no UpdateError (Django's own backend never fails here)
        second["_auth_user_id"] = "5"
        second.save()
        assert SessionStore(second.session_key)["cart"] == ["apple"] and not second.exists(key)
        assert len(handler().list_sessions(5)) == 2  # two logins, two devices; neither reaches the old id

    def test_a_cycle_key_racing_a_revocation_does_not_bring_the_user_back(self) -> None:
        session = SessionStore()
        session["_auth_user_id"] = "7"
        session["cart"] = [1]
        session.save()
        in_flight = SessionStore(session.session_key)
        assert in_flight["_auth_user_id"] == "7"
        assert handler().revoke_user(7) == 1  # "log out everywhere"
        in_flight.cycle_key()  # e.g. update_session_auth_hash() in a password change that raced it
        assert handler().list_sessions(7) == []
        assert SessionStore(in_flight.session_key).load() == {"cart": [1]}  # anonymous from here on

    def test_set_expiry_seconds_may_be_a_float(self) -> None:
        session = SessionStore()
        session["x"] = 1
        session.set_expiry(300.5)
        session.save()
        assert handler().load(session.session_key).lifetime == (300, None)

    def test_set_expiry_date_is_fixed(self) -> None:
        session = SessionStore()
        session["x"] = 1
        session.set_expiry(timedelta(days=2))
        session.save()
        stored = handler().load(session.session_key)
        assert stored.created_at is not None and stored.expires_at is not None
        assert abs(stored.expires_at - (stored.created_at + 2 * 86400)) <= 2

    def test_an_unchanged_session_saved_again_writes_nothing(self) -> None:
        session = SessionStore()
        session["x"] = 1
        session.save()
        again = SessionStore(session.session_key)
        assert again["x"] == 1
        assert handler().save(again._session) is SaveAction.NOTHING

    def test_clear_expired_and_clearsessions_delete_in_batches(self) -> None:
        keys = []
        for _ in range(5):
            session = SessionStore()
            session["x"] = 1
            session.set_expiry(-10)
            session.save()
            keys.append(session.session_key)
        live = SessionStore()
        live["y"] = 1
        live.save()
        with override_settings(SQLA_SESSIONS={**settings.SQLA_SESSIONS, "gc_batch_size": 2}):
            call_command("clearsessions")
            assert handler().stats().expired == 0 and handler().stats().live >= 1
        assert SessionStore(live.session_key).load() == {"y": 1}

    def test_the_management_command_runs_the_cli(self) -> None:
        call_command("sqla_sessions", "stats")
        with pytest.raises(Exception, match="status"):
            call_command("sqla_sessions", "no-such-command")


class EngineTestsOnSQLite(EngineTests):
    database = "sqlite"


def test_settings_derive_the_database_and_lifetime(monkeypatch: pytest.MonkeyPatch) -> None:
    database = {
        "ENGINE": "django.db.backends.postgresql",
        "NAME": "app",
        "USER": "web",
        "PASSWORD": "p@ss word",
        "HOST": "db.internal",
        "PORT": "5433",
    }
    url = sa.make_url(database_url_for(database) or "")
    assert (url.drivername, url.username, url.password, url.host, url.port, url.database) == (
        "postgresql+psycopg", "web", "p@ss word", "db.internal", 5433, "app"
    )  # fmt: skip
    assert database_url_for({"ENGINE": "django.db.backends.sqlite3", "NAME": "/srv/db.sqlite3"}) == (
        "sqlite:////srv/db.sqlite3"
    )
    assert database_url_for({"ENGINE": "django.db.backends.oracle", "NAME": "x"}) is None
    for name in list(os.environ):
        if name.startswith("SQLA_SESSIONS_"):
            monkeypatch.delenv(name)
    with override_settings(SQLA_SESSIONS=None, SESSION_COOKIE_AGE=3601):
        config = session_config()
    assert config.lifetime == 61 and config.database_url == "sqlite://"  # the in-memory DATABASES above
    with override_settings(SQLA_SESSIONS={"database_url": "sqlite:///x.db", "table": "web_sessions"}):
        config = session_config()
    assert (config.database_url, config.table) == ("sqlite:///x.db", "web_sessions")
    monkeypatch.setenv("SQLA_SESSIONS_LIFETIME", "5")
    with override_settings(SQLA_SESSIONS=None):
        assert session_config().lifetime == 5  # the environment wins over what Django's settings say
