"""`SessionConfig`: every setting, validated once, shared by the handler and the middlewares."""

from __future__ import annotations

import base64
import binascii
import dataclasses
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from datetime import UTC, date, datetime, timedelta
from typing import Any, Literal

from .errors import ConfigurationError

SameSite = Literal["lax", "strict", "none"]
FlashAging = Literal["shown", "request"]
PreparedStatements = Literal["auto", "on", "off"]

_ENV_PREFIX = "SQLA_SESSIONS_"
#: At most 32 characters: the longest name derived from it, `ix_<table>_user_id_last_activity`, must
#: fit PostgreSQL's 63.
_TABLE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,31}")
_COOKIE_NAME = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")  # an RFC 6265 token
_AES_KEY_SIZES = (16, 24, 32)


#: The embedded default: a SQLite file in the working directory (the demo's, and a first try's).
DEFAULT_DATABASE_URL = "sqlite:///sessions.db"


@dataclass(frozen=True, slots=True)
class SessionConfig:
    """Session settings; Laravel's `config/session.php` in Python names. Invalid values raise `ValueError`."""

    database_url: str = DEFAULT_DATABASE_URL
    table: str = "sessions"
    lifetime: int = 120
    """Idle lifetime in minutes (sliding)."""
    absolute_lifetime: int | None = None
    """Optional hard cap in minutes since creation."""
    expire_on_close: bool = False
    remember_lifetime: int = 43_200
    """Idle lifetime in minutes of a session logged in with `login(user, remember=True)` (30 days);
    its cookie outlives the browser even with `expire_on_close`."""
    legacy_remember_until: datetime | None = None
    """Flask-Login only: until when a `remember_token` cookie Flask-Login issued before the switch to
    sqla_sessions still logs its user in (into a remembered session; the cookie is then deleted). None
    (the default): such cookies are refused and deleted. A `datetime` (naive: UTC), a `date`, or an
    ISO 8601 string (`SQLA_SESSIONS_LEGACY_REMEMBER_UNTIL=2025-12-31`). Until then `revoke_user()`
    also stores a marker that refuses the user's old tokens for good."""
    flash_aging: FlashAging = "shown"
    """"shown": flash data goes after a request that read it or rendered an HTML page (an XHR poll
    or an asset request in between leaves it); "request": after the next request, whatever it was
    (Laravel's rule)."""
    cookie_name: str = "session"
    cookie_path: str = "/"
    cookie_domain: str | None = None
    cookie_secure: bool | None = None
    """None: on when the request is https."""
    cookie_http_only: bool = True
    cookie_same_site: SameSite = "lax"
    cookie_partitioned: bool = False
    lottery: tuple[int, int] = (2, 100)
    touch_interval: int = 60
    """Seconds; an unchanged session's `last_activity` is refreshed at most this often."""
    max_payload_bytes: int = 262_144
    encryption_keys: tuple[str | bytes, ...] = field(default=(), repr=False)
    """AEAD keys, newest first: base64 strings or raw bytes of 16, 24 or 32 bytes."""
    block_lock_seconds: float = 10
    block_wait_seconds: float = 10
    lock_timeout_status: int = 423
    block_body_bytes: int = 2_621_440
    """Largest request body a blocking request may send (2.5 MiB, Django's default for a form). A
    blocking request reads its whole body before it takes its session's lock, so a slow client never
    holds the lock or a pooled connection; a larger body is answered 413."""
    session_connections: int | None = None
    """Long holds of pooled connections one session may have at once in a process: blocking requests,
    and saves waiting for a row lock (None: a quarter of `pool_size`). Past it: `lock_timeout_status` at once."""
    address_connections: int | None = None
    """The same for one client address, over all its sessions (None: half of `pool_size`). Past it: 429
    at once. Behind a proxy, let the server take the address from `X-Forwarded-For` (see fairshare)."""
    gc_batch_size: int = 1000
    """Rows deleted per statement by garbage collection."""
    gc_pause: float = 0
    """Seconds between GC batches (0: none). A paced sweep leaves room for live requests on a large
    table; see docs/deployment.md for the figures."""
    # -- the engine sqla_sessions creates from database_url (an engine passed in keeps its own) ------
    pool_size: int = 40
    """Connections kept open per process. The default covers the ASGI middleware's 32 worker threads
    plus blocking requests, each holding one; size it to the threads (and blocking requests) of your
    server: a WSGI server with 16 threads needs 16, plus its blocking requests."""
    max_overflow: int = 0
    """Connections beyond `pool_size`, closed again when returned: each one is a new database
    connection under steady load (churn), so the default is none."""
    pool_timeout: float = 5
    """Seconds a request waits for a pooled connection; past it the request answers 503."""
    pool_recycle: int = 3600
    """Seconds after which a connection is replaced at checkout (-1: never); below a proxy's idle timeout."""
    pool_pre_ping: bool = False
    """Test each connection at checkout (one round trip per request); a dead one is replaced anyway when it fails."""
    connect_timeout: float = 5
    """Seconds to establish a database connection (an unreachable host answers 503 instead of hanging)."""
    prepared_statements: PreparedStatements = "auto"
    """Server-side prepared statements on PostgreSQL: "on", "off" (PgBouncer < 1.21 in transaction mode,
    or one without `max_prepared_statements`), "auto" (off when the URL's port is PgBouncer's 6432, and
    from the server's first refusal of one: `handlers.prepared`)."""
    websocket_origins: tuple[str, ...] = ()
    """Origins besides the request's own host whose pages get the session on a websocket
    (e.g. `("https://app.example.com",)`); others get an empty one (cross-site websocket hijacking)."""
    batch_requests: bool = True
    """Run the loads and saves that concurrent requests make at the same moment as one statement per
    batch (`SELECT … WHERE key = ANY(…)`; on PostgreSQL one multi-row compare-and-set UPDATE, one
    INSERT): one round trip and one commit for many requests (docs/internals.md). Turn it off where a
    statement across keys costs more than several (a distributed PostgreSQL such as Citus, where
    keys live on different shards)."""
    check_on_startup: bool = False
    """The middlewares (when they build the handler) and the Dramatiq worker call `handler.check()` as
    they start: a missing table or a refused role stops the process with one line, not every request."""

    def __post_init__(self) -> None:
        _check(bool(self.database_url), "database_url", "must not be empty")
        table_ok = _TABLE_NAME.fullmatch(self.table) is not None
        _check(table_ok, "table", f"{self.table!r} is not a plain SQL identifier of at most 32 characters")
        _check_int(self.lifetime, "lifetime", minimum=1)
        if self.absolute_lifetime is not None:
            _check_int(self.absolute_lifetime, "absolute_lifetime", minimum=1)
        _check_int(self.remember_lifetime, "remember_lifetime", minimum=1)
        if self.legacy_remember_until is not None:
            # frozen: the normalized value (an aware datetime) replaces what was given
            object.__setattr__(self, "legacy_remember_until", _moment(self.legacy_remember_until))
        _check(self.flash_aging in ("shown", "request"), "flash_aging", "must be shown or request")
        _check(
            _COOKIE_NAME.fullmatch(self.cookie_name) is not None,
            "cookie_name",
            f"{self.cookie_name!r} is not a valid cookie name",
        )
        _check(
            self.cookie_path.startswith("/") and not any(c in self.cookie_path for c in ";\r\n,"),
            "cookie_path",
            "must start with '/' and contain no ';', ',' or line breaks",
        )
        if self.cookie_domain is not None:
            _check(
                bool(self.cookie_domain) and not any(c in self.cookie_domain for c in ";\r\n, "),
                "cookie_domain",
                "must be a bare domain name",
            )
        if self.cookie_name.startswith(("__Host-", "__Secure-")):
            # Browsers set such a cookie only with Secure; __Host- also only for Path=/ and no Domain,
            # so no sibling subdomain can plant (toss) one of the same name.
            _check(self.cookie_secure is not False, "cookie_secure", f"{self.cookie_name!r} cookies must be Secure")
        if self.cookie_name.startswith("__Host-"):
            _check(self.cookie_path == "/", "cookie_path", "a __Host- cookie must have Path=/")
            _check(self.cookie_domain is None, "cookie_domain", "a __Host- cookie must not name a Domain")
        _check(self.cookie_same_site in ("lax", "strict", "none"), "cookie_same_site", "must be lax, strict or none")
        if self.cookie_same_site == "none":
            _check(self.cookie_secure is not False, "cookie_secure", "SameSite=None cookies must be Secure")
        lottery = self.lottery
        _check(
            isinstance(lottery, tuple) and len(lottery) == 2 and all(isinstance(x, int) for x in lottery),
            "lottery",
            "must be a pair of integers (chances, out_of)",
        )
        _check(
            0 <= lottery[0] <= lottery[1] and lottery[1] > 0,
            "lottery",
            "must satisfy 0 <= chances <= out_of, out_of > 0",
        )
        _check_int(self.touch_interval, "touch_interval", minimum=0)
        _check(
            self.touch_interval < self.lifetime * 60,
            "touch_interval",
            "must be shorter than lifetime (or sessions expire during continuous activity)",
        )
        _check_int(self.max_payload_bytes, "max_payload_bytes", minimum=64)
        _check_int(self.gc_batch_size, "gc_batch_size", minimum=1)
        _check(
            isinstance(self.gc_pause, int | float) and not isinstance(self.gc_pause, bool) and 0 <= self.gc_pause <= 60,
            "gc_pause",
            "must be a number of seconds from 0 to 60",
        )
        for name in ("block_lock_seconds", "block_wait_seconds"):
            value = getattr(self, name)
            _check(isinstance(value, int | float) and not isinstance(value, bool), name, "must be a number")
            _check(0 < value <= 3600, name, "must be more than 0 and at most 3600 seconds")
        _check_int(self.lock_timeout_status, "lock_timeout_status", minimum=400)
        _check(self.lock_timeout_status <= 599, "lock_timeout_status", "must be an HTTP error status (400-599)")
        _check_int(self.block_body_bytes, "block_body_bytes", minimum=0)
        for name in ("session_connections", "address_connections"):
            if getattr(self, name) is not None:
                _check_int(getattr(self, name), name, minimum=1)
        _check_int(self.pool_size, "pool_size", minimum=1)
        _check_int(self.max_overflow, "max_overflow", minimum=0)
        _check_int(self.pool_recycle, "pool_recycle", minimum=-1)
        for name in ("pool_timeout", "connect_timeout"):
            value = getattr(self, name)
            _check(isinstance(value, int | float) and not isinstance(value, bool), name, "must be a number")
            _check(0 < value <= 3600, name, "must be more than 0 and at most 3600 seconds")
        _check(self.prepared_statements in ("auto", "on", "off"), "prepared_statements", "must be auto, on or off")
        _check(
            isinstance(self.websocket_origins, tuple)
            and all(
                isinstance(o, str) and "://" in o and not any(c in o for c in " ;,\r\n") for o in self.websocket_origins
            ),
            "websocket_origins",
            "must be a tuple of origins like 'https://app.example.com'",
        )
        _check(isinstance(self.encryption_keys, tuple), "encryption_keys", "must be a tuple")
        for key in self.encryption_keys:
            decode_encryption_key(key)

    @property
    def write_wait_seconds(self) -> float:
        """How long a save (not a blocking request's) waits for a row lock another request holds:
        no longer than a request waits for a pooled connection, nor than a blocking request would."""
        return min(self.block_wait_seconds, self.pool_timeout)

    @property
    def lifetime_seconds(self) -> int:
        return self.lifetime * 60

    @property
    def absolute_lifetime_seconds(self) -> int | None:
        return None if self.absolute_lifetime is None else self.absolute_lifetime * 60

    @property
    def legacy_remember_until_seconds(self) -> int | None:
        """`legacy_remember_until` in unix seconds."""
        until = self.legacy_remember_until
        return None if until is None else int(until.timestamp())

    def replace(self, **changes: Any) -> SessionConfig:
        """Return a copy with *changes* applied (and validated)."""
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> SessionConfig:
        """Build a config from `SQLA_SESSIONS_<FIELD>` variables (e.g. `SQLA_SESSIONS_DATABASE_URL`).

        Booleans accept 1/0, true/false, yes/no, on/off; `lottery` is `"2,100"`; `encryption_keys` is a
        comma-separated list of base64 keys, newest first; an empty value means None for optional fields.
        Keyword *overrides* win over the environment.
        """
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for f in fields(cls):
            raw = env.get(_ENV_PREFIX + f.name.upper())
            if raw is not None:
                values[f.name] = _parse_env(f.name, str(f.type), raw.strip())
        values.update(overrides)
        return cls(**values)


#: Flask's session settings and the `SessionConfig` field each one gives its default.
_FLASK_SETTINGS = {
    "SESSION_COOKIE_NAME": "cookie_name",
    "SESSION_COOKIE_DOMAIN": "cookie_domain",
    "SESSION_COOKIE_PATH": "cookie_path",
    "SESSION_COOKIE_HTTPONLY": "cookie_http_only",
    "SESSION_COOKIE_SECURE": "cookie_secure",
    "SESSION_COOKIE_SAMESITE": "cookie_same_site",
    "SESSION_COOKIE_PARTITIONED": "cookie_partitioned",
    "PERMANENT_SESSION_LIFETIME": "lifetime",
}


def config_from_flask_settings(settings: Mapping[str, Any], flask_defaults: Mapping[str, Any]) -> SessionConfig:
    """A Flask (or Quart) app's session config: `SQLA_SESSIONS_<FIELD>` keys of its *settings* win,
    then `SQLA_SESSIONS_<FIELD>` environment variables, then the session settings the app changed
    from the framework's defaults (*flask_defaults*), as Flask-Session reads them.

    `PERMANENT_SESSION_LIFETIME` (a timedelta or seconds) is the idle lifetime in minutes, rounded
    up; `SESSION_COOKIE_SAMESITE` None leaves ours (Lax); `SESSION_COOKIE_PATH` falls back to
    `APPLICATION_ROOT` when that was changed.
    """
    values: dict[str, Any] = {}
    for setting, name in _FLASK_SETTINGS.items():
        value = settings.get(setting)
        if value == flask_defaults.get(setting) or value is None or (name == "cookie_domain" and value is False):
            continue  # Flask's default (or its old "no domain", False), not the app's choice: ours stands
        if name == "lifetime":
            seconds = value.total_seconds() if isinstance(value, timedelta) else float(value)
            value = max(1, math.ceil(seconds / 60))
        elif name == "cookie_same_site":
            value = str(value).lower()
        values[name] = value
    if "cookie_path" not in values and settings.get("APPLICATION_ROOT") not in (None, "/"):
        values["cookie_path"] = settings["APPLICATION_ROOT"]
    for f in fields(SessionConfig):
        if f"SQLA_SESSIONS_{f.name.upper()}" in os.environ:
            values.pop(f.name, None)  # the environment wins over Flask's settings
        explicit = settings.get(f"SQLA_SESSIONS_{f.name.upper()}")
        if explicit is not None:
            values[f.name] = explicit
    lifetime = values.get("lifetime")
    if isinstance(lifetime, int) and lifetime == 1 and "touch_interval" not in values:
        values["touch_interval"] = 30  # must stay below a one-minute lifetime
    return SessionConfig.from_env(**values)


def decode_encryption_key(key: str | bytes) -> bytes:
    """Return the raw AES key for a configured key (raw bytes, or base64/base64url text)."""
    if isinstance(key, bytes):
        raw = key
    elif isinstance(key, str):
        try:
            padded = key.strip() + "=" * (-len(key.strip()) % 4)
            raw = base64.urlsafe_b64decode(padded.replace("+", "-").replace("/", "_"))
        except (binascii.Error, ValueError):
            raise ConfigurationError("encryption_keys", "a key is not valid base64") from None
    else:
        raise ConfigurationError("encryption_keys", "keys must be str (base64) or bytes")
    if len(raw) not in _AES_KEY_SIZES:
        raise ConfigurationError("encryption_keys", f"a key is {len(raw)} bytes; AES keys are 16, 24 or 32 bytes")
    return raw


def _moment(value: object) -> datetime:
    """A `legacy_remember_until` value as an aware datetime: a datetime (naive: UTC), a date (its
    start, UTC) or an ISO 8601 string of either."""
    if isinstance(value, str):
        try:
            value = datetime.fromisoformat(value)
        except ValueError:
            raise ConfigurationError("legacy_remember_until", f"{value!r} is not an ISO 8601 date") from None
    if isinstance(value, date) and not isinstance(value, datetime):
        value = datetime(value.year, value.month, value.day)
    _check(isinstance(value, datetime), "legacy_remember_until", "must be a datetime, a date or an ISO 8601 string")
    assert isinstance(value, datetime)
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


def _check(ok: bool, name: str, message: str) -> None:
    if not ok:
        raise ConfigurationError(name, message)


def _check_int(value: object, name: str, *, minimum: int) -> None:
    _check(isinstance(value, int) and not isinstance(value, bool), name, "must be an integer")
    assert isinstance(value, int)
    _check(value >= minimum, name, f"must be at least {minimum}")


_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def _parse_env(name: str, annotation: str, raw: str) -> Any:
    optional = "None" in annotation
    if optional and raw.lower() in ("", "none", "null"):
        return None
    try:
        if annotation.startswith("bool"):
            if raw.lower() in _TRUE:
                return True
            if raw.lower() in _FALSE:
                return False
            raise ValueError(raw)
        if annotation.startswith("int"):
            return int(raw)
        if annotation.startswith("float"):
            return float(raw)
        if annotation.startswith("tuple[int, int]"):
            chances, out_of = raw.split(",")
            return (int(chances), int(out_of))
        if annotation.startswith("tuple"):
            return tuple(part.strip() for part in raw.split(",") if part.strip())
    except ValueError:
        raise ConfigurationError(name, f"cannot parse {_ENV_PREFIX}{name.upper()}={raw!r}") from None
    return raw
