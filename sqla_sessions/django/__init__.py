"""Django session engine: `SESSION_ENGINE = "sqla_sessions.django"`.

    # settings.py
    SESSION_ENGINE = "sqla_sessions.django"
    SQLA_SESSIONS = {"database_url": "postgresql+psycopg://app@db/app"}  # optional, see session_config()
    INSTALLED_APPS += ["sqla_sessions.django"]  # optional: `manage.py sqla_sessions migrate|stats|...`

`request.session` is Django's `SessionBase` API over a sqla_sessions `Session` and its handler (its
own SQLAlchemy engine, not Django's ORM). What changes for a Django app:

- A save writes only the keys this request changed, three-way merged onto the row as stored now:
  two requests (or a request and a job) writing the same session lose nothing.
- `cycle_key()` is our change of privilege (`login()`): a new id *and* key, the old id dead at
  once; `flush()` invalidates (the row is deleted). A session deleted meanwhile makes `save()`
  raise Django's `UpdateError`, which Django's middleware answers as it always does.
- `_auth_user_id` (what `django.contrib.auth.login()` stores) is mirrored to the row's `user_id`,
  so `handler().list_sessions(user.pk)` lists a user's devices and `revoke_user` logs them out.
- `set_expiry()` is stored on the row as the session's own lifetime (seconds: sliding; a date:
  fixed); `clear_expired()` (Django's `clearsessions`) deletes in bounded batches.
- Django's `SESSION_SERIALIZER` is not used: values are stored as tagged JSON (no pickle), which
  also keeps datetimes, dates, UUIDs, decimals, sets and tuples as what they were.
"""

from __future__ import annotations

import math
import os
import threading
from datetime import datetime
from typing import Any

from asgiref.sync import sync_to_async
from django.conf import settings
from django.contrib.sessions.backends.base import CreateError, SessionBase, UpdateError
from django.core.signals import setting_changed

from ..config import SessionConfig
from ..core.session import Session
from ..core.store_api import TOKEN_KEY
from ..errors import SessionInterrupted
from ..store.handlers.database import DatabaseHandler

#: The session key `django.contrib.auth` stores the logged-in user's primary key under.
AUTH_USER_KEY = "_auth_user_id"
#: What `django.contrib.auth` keeps in the session about its logged-in user.
DJANGO_AUTH_KEYS = (AUTH_USER_KEY, "_auth_user_backend", "_auth_user_hash")
#: Where `set_expiry()` keeps the session's own expiry (Django's name, in the session data).
EXPIRY_KEY = "_session_expiry"

_handler: DatabaseHandler | None = None
_handler_lock = threading.Lock()
_SETTINGS = ("SQLA_SESSIONS", "SESSION_COOKIE_AGE", "DATABASES")


def session_config() -> SessionConfig:
    """The config from the settings: `SQLA_SESSIONS` (a dict of `SessionConfig` fields) wins, then
    `SQLA_SESSIONS_*` environment variables, then what Django's settings say.

    From Django's settings: the database (`DATABASES["default"]` as a SQLAlchemy URL: PostgreSQL
    through psycopg, MySQL/MariaDB through PyMySQL, SQLite) and the idle lifetime
    (`SESSION_COOKIE_AGE`, in whole minutes rounded up).
    """
    explicit = dict(getattr(settings, "SQLA_SESSIONS", None) or {})
    derived: dict[str, Any] = {"lifetime": max(1, math.ceil(settings.SESSION_COOKIE_AGE / 60))}
    database = (getattr(settings, "DATABASES", None) or {}).get("default")
    url = database_url_for(database) if database else None
    if url is not None:
        derived["database_url"] = url
    for name, value in derived.items():
        if name not in explicit and f"SQLA_SESSIONS_{name.upper()}" not in os.environ:
            explicit[name] = value
    lifetime = explicit.get("lifetime")
    if "touch_interval" not in explicit and isinstance(lifetime, int) and lifetime * 60 <= 60:
        explicit["touch_interval"] = 30  # must stay below a one-minute lifetime
    return SessionConfig.from_env(**explicit)


def handler() -> DatabaseHandler:
    """The process's handler (one engine and pool), built from the settings on first use."""
    global _handler
    current = _handler
    if current is not None:
        return current
    with _handler_lock:
        if _handler is None:
            config = session_config()
            _handler = DatabaseHandler(config.database_url, config)
        return _handler


def _reset_handler(*, setting: str, **kwargs: Any) -> None:
    """Tests override settings: the next request builds a handler from the new ones."""
    global _handler
    if setting in _SETTINGS:
        with _handler_lock:
            old, _handler = _handler, None
        if old is not None:
            old.close()


setting_changed.connect(_reset_handler)


class SessionStore(SessionBase):
    """Django's session API on a sqla_sessions `Session` (see the module's docstring)."""

    # Annotations only: Django's base sets them (`_session_key` is its validating property).
    _session_cache: Session
    _session_key: str | None

    ip_address: str | None = None
    """The client's address, written with the next change (set by `ClientMiddleware`)."""
    user_agent: str | None = None
    """The client's user agent, written with the next change (set by `ClientMiddleware`)."""

    # -- the session behind `request.session` -----------------------------------------------------------

    def _get_session(self, no_load: bool = False) -> Session:
        """Our `Session` (not a dict): Django's mapping methods run on it, so changes are tracked per key."""
        self.accessed = True
        try:
            return self._session_cache
        except AttributeError:
            pass
        if self.session_key is None or no_load:
            session = Session(handler())
        else:
            session = handler().load(self.session_key)
            if session.is_new:
                self._session_key = None  # unknown, expired or malformed: never adopted (session fixation)
        self._session_cache = session
        return session

    _session = property(_get_session)

    async def _aget_session(self, no_load: bool = False) -> Session:
        if "_session_cache" in self.__dict__:
            self.accessed = True
            return self._session_cache
        return await sync_to_async(self._get_session)(no_load)

    def load(self) -> dict[str, Any]:
        """The stored data of `session_key` (Django's contract: {} and `session_key` None when there is none)."""
        session = handler().load(self.session_key)
        if session.is_new:
            self._session_key = None
        return session.all()

    def exists(self, session_key: str | None) -> bool:
        return bool(session_key) and not handler().load(session_key).is_new

    def clear(self) -> None:
        """Remove every key (the row stays; `flush()` ends the session)."""
        session = self._session
        for key in list(session):
            del session[key]
        self.accessed = self.modified = True

    # -- writes ------------------------------------------------------------------------------------------

    def create(self) -> None:
        """Store the session now under a new id (with what it holds; empty for a new one)."""
        current = self._session
        session = current if current.is_new else _copy(current)
        session.ensure_stored()
        self._write(session)
        self._session_cache = session
        self.modified = True

    def save(self, must_create: bool = False) -> None:
        """Write this request's changes, merged onto the stored row; `UpdateError` if the session ended meanwhile."""
        session = self._session
        if must_create:
            if not session.is_new:
                raise CreateError
            session.ensure_stored()
        elif session.is_new and self.session_key is None:
            self.create()
            return
        self._write(session)

    def _write(self, session: Session) -> None:
        if self.ip_address is not None:
            session.ip_address = self.ip_address
        if self.user_agent is not None:
            session.user_agent = self.user_agent
        self._mirror(session)
        try:
            handler().save(session, end_of_request=False)
        except SessionInterrupted:
            raise UpdateError from None
        self._session_key = session.id if not session.is_new else None

    def _mirror(self, session: Session) -> None:
        """Carry Django's own keys onto the row: the logged-in user, and `set_expiry()` as a lifetime."""
        user = session.get(AUTH_USER_KEY)
        user_id = None if user is None else str(user)
        if user_id != session.user_id:
            # Django decides what the session holds; our login()/logout() decide who owns it and under
            # which id: a change of privilege (new id and key, the old id dead) even without cycle_key().
            kept = session.all()
            kept.pop(TOKEN_KEY, None)  # a CSRF token of ours is renewed by the change, never carried over
            if user_id is None:
                session.logout()
            else:
                session.login(user_id)
            session.put(kept)
        lifetime = _lifetime(session.get(EXPIRY_KEY), session.created_at)
        if lifetime != session.lifetime:
            session.set_lifetime(*lifetime)

    def delete(self, session_key: str | None = None) -> None:
        """Delete the session this id opens (a wrong secret deletes nothing)."""
        key = self.session_key if session_key is None else session_key
        if not key:
            return
        target = handler().load(key)
        if not target.is_new and target.key is not None:
            handler().destroy(target.key)

    def cycle_key(self) -> None:
        """A change of privilege, at once: a new id and key, the old id dead, the data kept."""
        session = self._session
        session.change_privilege()
        session.ensure_stored()
        try:
            self._write(session)
        except UpdateError:
            # The session ended meanwhile (the same login form submitted twice, a logout in another
            # tab): the login starts a session of its own from what this request saw, as Django's
            # create() would; nothing that held the old one reaches it.
            fresh = _copy(session)
            for key in DJANGO_AUTH_KEYS:
                # A login sets them again right after cycle_key(); anything else (a password change in
                # a request that raced a revocation) must not bring the revoked user back.
                fresh.pop(key, None)
            fresh.ensure_stored()
            self._write(fresh)
            self._session_cache = fresh

    def flush(self) -> None:
        """End the session: the row is deleted now, and the session starts over empty under a new id."""
        session = self._session
        session.invalidate()
        self._write(session)
        self._session_key = None
        self.accessed = self.modified = True

    async def acycle_key(self) -> None:
        await sync_to_async(self.cycle_key)()

    async def aflush(self) -> None:
        await sync_to_async(self.flush)()

    async def acreate(self) -> None:
        await sync_to_async(self.create)()

    @classmethod
    def clear_expired(cls) -> None:
        """Delete expired sessions in bounded batches (`gc_batch_size` rows per statement)."""
        handler().gc()


class ClientMiddleware:
    """Write the client's address and user agent on the session's row, for device lists.

    Django's session engine never sees the request: list it after `SessionMiddleware` in
    `MIDDLEWARE`. Behind a proxy, set `REMOTE_ADDR` from your proxy's header first (as Django asks).
    """

    def __init__(self, get_response: Any) -> None:
        self.get_response = get_response

    def __call__(self, request: Any) -> Any:
        session = getattr(request, "session", None)
        if isinstance(session, SessionStore):
            session.ip_address = request.META.get("REMOTE_ADDR") or None
            session.user_agent = request.META.get("HTTP_USER_AGENT") or None
        return self.get_response(request)


def _copy(session: Session) -> Session:
    fresh = Session(handler())
    fresh.put(session.all())
    return fresh


def _lifetime(expiry: Any, created_at: int | None) -> tuple[int | None, int | None]:
    """The row lifetime for Django's `_session_expiry`: seconds idle (sliding), or a fixed date.

    0 (the cookie ends with the browser) and None keep the configured lifetime, as in Django.
    """
    if not expiry or isinstance(expiry, bool):
        return None, None
    if isinstance(expiry, int | float):
        return math.floor(expiry), None
    if isinstance(expiry, str):
        try:
            expiry = datetime.fromisoformat(expiry)
        except ValueError:
            return None, None
    if isinstance(expiry, datetime):
        # A fixed date: idle and absolute both end there (the idle part never reaches it first).
        since_creation = math.floor(expiry.timestamp()) - (created_at or math.floor(datetime.now().timestamp()))
        return since_creation, since_creation
    return None, None


def database_url_for(database: dict[str, Any]) -> str | None:
    """A `DATABASES` entry as a SQLAlchemy URL (None for a Django engine we have no driver for)."""
    import sqlalchemy as sa

    engine = str(database.get("ENGINE", ""))
    drivers = {
        "django.db.backends.postgresql": "postgresql+psycopg",
        "django.db.backends.mysql": "mysql+pymysql",
        "django.db.backends.sqlite3": "sqlite",
    }
    driver = drivers.get(engine)
    if driver is None:
        return None
    name = str(database.get("NAME") or "")
    if driver == "sqlite":
        return "sqlite://" if name in ("", ":memory:") else f"sqlite:///{name}"
    port = database.get("PORT")
    url = sa.URL.create(
        driver,
        username=database.get("USER") or None,
        password=database.get("PASSWORD") or None,
        host=database.get("HOST") or None,
        port=int(port) if port else None,
        database=name or None,
    )
    return url.render_as_string(hide_password=False)
