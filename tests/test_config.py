"""SessionConfig: defaults from SPEC, validation that names the field, the environment."""

from __future__ import annotations

import dataclasses

import pytest

from sqla_sessions import ConfigurationError, SessionConfig


def test_defaults_match_the_spec() -> None:
    config = SessionConfig()
    assert config.database_url == "sqlite:///sessions.db"
    assert (config.table, config.lifetime, config.absolute_lifetime, config.expire_on_close) == (
        "sessions",
        120,
        None,
        False,
    )
    assert (config.cookie_name, config.cookie_path, config.cookie_domain, config.cookie_secure) == (
        "session",
        "/",
        None,
        None,
    )
    assert (config.cookie_http_only, config.cookie_same_site, config.cookie_partitioned) == (True, "lax", False)
    assert (config.lottery, config.touch_interval, config.max_payload_bytes) == ((2, 100), 60, 262144)
    assert config.encryption_keys == ()
    assert (config.block_lock_seconds, config.block_wait_seconds, config.lock_timeout_status) == (10, 10, 423)


def test_config_is_frozen() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        SessionConfig().lifetime = 5  # type: ignore[misc]


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("lifetime", 0),
        ("lifetime", "120"),
        ("lifetime", True),
        ("absolute_lifetime", -1),
        ("table", "drop table;"),
        ("table", ""),
        ("cookie_name", "bad name"),
        ("cookie_name", "a;b"),
        ("cookie_path", "no-slash"),
        ("cookie_path", "/a;b"),
        ("cookie_domain", "a.com; x"),
        ("cookie_same_site", "Sometimes"),
        ("lottery", (3, 2)),
        ("lottery", (1,)),
        ("lottery", [2, 100]),
        ("touch_interval", -1),
        ("max_payload_bytes", 10),
        ("encryption_keys", ("not base64!",)),
        ("encryption_keys", (b"short",)),
        ("encryption_keys", ["list"]),
        ("block_lock_seconds", 0),
        ("block_wait_seconds", "10"),
        ("lock_timeout_status", 200),
        ("lock_timeout_status", 600),
        ("database_url", ""),
        ("gc_batch_size", 0),
    ],
)
def test_invalid_values_raise_value_error_naming_the_field(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=field) as caught:
        SessionConfig(**{field: value})  # type: ignore[arg-type]
    assert isinstance(caught.value, ConfigurationError) and caught.value.field == field


def test_same_site_none_requires_secure() -> None:
    with pytest.raises(ValueError, match="cookie_secure"):
        SessionConfig(cookie_same_site="none", cookie_secure=False)
    assert SessionConfig(cookie_same_site="none").cookie_secure is None


def test_the_host_prefix_is_enforced_and_always_secure() -> None:
    """`__Host-session`: Secure, Path=/, no Domain, so no sibling subdomain can plant (toss) it."""
    from sqla_sessions.http.cookies import CookieWriter

    for bad in ({"cookie_domain": "example.com"}, {"cookie_path": "/app"}, {"cookie_secure": False}):
        with pytest.raises(ValueError, match="__Host-"):
            SessionConfig(cookie_name="__Host-session", **bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="must be Secure"):
        SessionConfig(cookie_name="__Secure-session", cookie_secure=False)
    writer = CookieWriter(SessionConfig(cookie_name="__Host-session"))
    cookie = writer.set("0" * 32 + "." + "A" * 40, expires_at=None, https=False)  # Secure even over http
    assert cookie.startswith("__Host-session=") and "; Secure" in cookie and "Domain" not in cookie
    assert "Path=/;" in cookie
    assert "; Secure" in writer.delete(https=False)


def test_from_env_parses_every_kind_of_field() -> None:
    env = {
        "SQLA_SESSIONS_DATABASE_URL": "postgresql+psycopg://u@h/db",
        "SQLA_SESSIONS_TABLE": "web_sessions",
        "SQLA_SESSIONS_LIFETIME": "30",
        "SQLA_SESSIONS_ABSOLUTE_LIFETIME": "600",
        "SQLA_SESSIONS_EXPIRE_ON_CLOSE": "yes",
        "SQLA_SESSIONS_COOKIE_SECURE": "none",
        "SQLA_SESSIONS_COOKIE_DOMAIN": "example.com",
        "SQLA_SESSIONS_LOTTERY": "1, 50",
        "SQLA_SESSIONS_ENCRYPTION_KEYS": "MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY, ZmVkY2JhOTg3NjU0MzIxMA==",
        "SQLA_SESSIONS_BLOCK_WAIT_SECONDS": "2.5",
        "UNRELATED": "x",
    }
    config = SessionConfig.from_env(env)
    assert config.database_url == "postgresql+psycopg://u@h/db"
    assert (config.table, config.lifetime, config.absolute_lifetime) == ("web_sessions", 30, 600)
    assert config.expire_on_close is True and config.cookie_secure is None
    assert config.cookie_domain == "example.com" and config.lottery == (1, 50)
    assert len(config.encryption_keys) == 2 and config.block_wait_seconds == 2.5


def test_from_env_overrides_win_and_bad_values_name_the_variable() -> None:
    assert SessionConfig.from_env({"SQLA_SESSIONS_LIFETIME": "30"}, lifetime=5).lifetime == 5
    with pytest.raises(ValueError, match="SQLA_SESSIONS_LIFETIME"):
        SessionConfig.from_env({"SQLA_SESSIONS_LIFETIME": "soon"})
    with pytest.raises(ValueError, match="expire_on_close"):
        SessionConfig.from_env({"SQLA_SESSIONS_EXPIRE_ON_CLOSE": "maybe"})


def test_from_env_reads_os_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SQLA_SESSIONS_COOKIE_NAME", "sid")
    assert SessionConfig.from_env().cookie_name == "sid"


def test_encryption_keys_are_not_in_repr() -> None:
    key = "MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY"
    assert key not in repr(SessionConfig(encryption_keys=(key,)))
