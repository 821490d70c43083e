"""A session's lifecycle: login and logout, a new id, invalidation, lifetimes, flash data, the CSRF token.

A change of id (`regenerate()`, a change of privilege, `invalidate()`) renews the CSRF token with it;
flash data is aged at the end of a request, only by the requests that showed it.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from .ids import generate_session_key, new_session_id, session_key_of
from .records import USER_ID_LENGTH
from .store_api import FLASH_KEY as _FLASH
from .store_api import TOKEN_KEY as _TOKEN
from .tracking import TrackedMapping
from .unit import JOBS_KEY

#: Where Flask keeps `session.permanent` in the session itself (its cookie sessions and Flask-Session do too).
PERMANENT_KEY = "_permanent"


class SessionLifecycle(TrackedMapping):
    """Who the session belongs to, which id reaches it, how long it lives, which flash data it keeps."""

    __slots__ = ()

    # -- lifetimes and Flask's `permanent` ------------------------------------------------------------

    @property
    def permanent(self) -> bool:
        """Flask's flag, False by default. True for a session with a lifetime of its own (remember-me:
        `login(..., remember=True)`, `set_lifetime(idle=...)`) or one the app made permanent
        (`session.permanent = True`, stored with the session under Flask's own key, `_permanent`).

        A permanent session's cookie outlives the browser even with `expire_on_close`; any other
        session's cookie is the config's (until its expiry, or the browser's close with
        `expire_on_close`). Flask-Login's `SESSION_PROTECTION = "strong"` logs a session that is not
        permanent out when its client (address, user agent) changes, and only marks a permanent one
        not fresh.
        """
        return self.lifetime[0] is not None or self._peek(PERMANENT_KEY) is True

    @permanent.setter
    def permanent(self, value: bool) -> None:
        """True: stored with the session (a flag alone does not create a row). False: the flag goes,
        and so does an idle lifetime of its own (the user is no longer remembered)."""
        if bool(value) != self.permanent:
            self._permanent_changed = True
        if value:
            if self._peek(PERMANENT_KEY) is not True:
                self[PERMANENT_KEY] = True
            return
        if PERMANENT_KEY in self:
            del self[PERMANENT_KEY]
        if self.lifetime[0] is not None:
            self.set_lifetime(None, self.lifetime[1])

    @property
    def lifetime(self) -> tuple[int | None, int | None]:
        """This session's own (idle, absolute) lifetime in seconds; None for either: the config's."""
        if self._lifetime is not None:
            return self._lifetime
        loaded = self._loaded
        return (None, None) if loaded is None else (loaded.idle_lifetime, loaded.absolute_lifetime)

    def set_lifetime(self, idle: int | timedelta | None = None, absolute: int | timedelta | None = None) -> None:
        """Give this session a lifetime of its own, stored on its row (both None: back to the config's).

        *idle* replaces the config's sliding `lifetime`, *absolute* its `absolute_lifetime` (a cap
        since creation); seconds or a `timedelta`. It takes effect at the next save, and the cookie
        follows. A lifetime of 0 or less ends the session at that save (Django's past `set_expiry`).
        """
        self._lifetime = (_seconds(idle, "idle"), _seconds(absolute, "absolute"))
        self._accessed = True

    def ensure_stored(self) -> None:
        """Store this session at its next save even if it holds nothing (Django's `create()`).

        Sessions are otherwise created lazily: a request that writes nothing leaves no row.
        """
        self._ensure_stored = True

    # -- id and user: regenerate, change of privilege, invalidate, login ----------------------------

    @property
    def id(self) -> str:
        """The session id: the cookie value. Only its hash is ever stored."""
        if self._id is None:
            if self._loaded is not None:
                raise RuntimeError("this session was loaded by its key (background job): its cookie id is unknown")
            self._id = new_session_id(generate_session_key())
        return self._id

    def regenerate(self, destroy: bool = True) -> None:
        """Give the session a new id (and a new CSRF token), keeping its data and its key.

        With *destroy* (the default) every earlier id stops working at save. With `destroy=False` the
        id the session had until now keeps reaching it, the same row and data (requests in flight
        with the old cookie, other tabs), until the next regeneration; unlike Laravel's
        `migrate(false)`, whose old id keeps a copy that drifts apart. Either way requests and jobs
        that hold the session by its key still reach it; for a change of privilege use
        `change_privilege()` (which `login()` calls), which ends every earlier id.
        """
        # Only the id the browser holds (this request's first change of id) may stay valid: after a
        # login, or a regenerate() meant to end it, an earlier id is never kept.
        self._keep_previous_id = not destroy and self._loaded is not None and not self._id_changed
        self._mint_id(new_key=False)
        self._id_changed = True
        self._renew_token()

    def _mint_id(self, *, new_key: bool) -> None:
        """A new id (a new secret) naming the row this session will be stored at.

        The cookie names the row, so the row moves when the key does: at a change of privilege.
        """
        if new_key:
            key = generate_session_key()
        elif self._id is not None:
            key = session_key_of(self._id)
        elif self._loaded is not None:
            key = self._loaded.key
        else:
            key = generate_session_key()
        self._id = new_session_id(key)

    def change_privilege(self) -> None:
        """Mark a change of privilege (sudo mode, a new role): regenerate, and cut off the previous session.

        At save the stored session moves to a new key. Whatever loaded it before (an in-flight
        request, a `reload()`, a job enqueued earlier) can no longer read or write it: their saves
        are refused with `SessionInterrupted`, their reloads give a fresh session, their jobs are
        dropped.
        """
        self._mint_id(new_key=True)
        self._id_changed = True
        self._keep_previous_id = False  # every earlier id ends with a change of privilege
        self._renew_token()
        self._generation += 1

    def _renew_token(self) -> None:
        """A new CSRF token, if the session has one: a session without one gets it on first use (`token()`)."""
        if _TOKEN in self._live or (_TOKEN in self._raw and _TOKEN not in self._gone):
            self.regenerate_token()

    def invalidate(self) -> None:
        """Drop every value and the stored session; the session continues as a new one with a new id."""
        if self._loaded is not None:
            self._destroy_key = self._loaded.key
        self._reset()
        self._mint_id(new_key=True)
        self._id_changed = True
        self._generation += 1

    def login(self, user_id: object, *, remember: bool = False) -> None:
        """Attach the session to a user: a change of privilege (new id, cut off from the previous one).

        Logging in as another user than the current one starts from an empty session. *remember*
        ("remember me"): the session lives `remember_lifetime` minutes idle (and at least as long
        despite an `absolute_lifetime`), its cookie outlives the browser; one row the user can see
        among their devices and revoke, not a separate token. A login without it ends a lifetime
        the session had of its own (the user did not ask to be remembered this time).
        """
        if user_id is None:
            raise ValueError("login() needs a user id")
        user = str(user_id)
        if not user or len(user) > USER_ID_LENGTH or "\x00" in user:
            raise ValueError(f"a user id is 1 to {USER_ID_LENGTH} characters without NUL, not {user[:40]!r}")
        if self._user_id is not None and self._user_id != user:
            self.invalidate()
        self._user_id = user
        self.change_privilege()
        if remember:
            config = self._require_store().config
            remembered = config.remember_lifetime * 60
            absolute = config.absolute_lifetime_seconds
            self.set_lifetime(remembered, None if absolute is None else max(absolute, remembered))
        elif self.lifetime != (None, None):
            self.set_lifetime()

    def logout(self) -> None:
        """Forget the user and everything in the session (invalidate)."""
        self.invalidate()

    def clear(self) -> None:
        """Remove every key; a logged-in session is logged out (invalidated), as Flask's `session.clear()` means."""
        if self._user_id is not None:
            self.invalidate()
            return
        for key in self._keys():
            if key != JOBS_KEY:  # bookkeeping of exactly-once jobs, not the app's data
                del self[key]
        self._accessed = True

    def flush(self) -> None:
        """Remove every key; a logged-in session is logged out (invalidated), as Django's `flush()` does."""
        self.clear()

    def _reset(self) -> None:
        self._epoch += 1
        self._loaded = None
        self._raw, self._live, self._gone, self._deltas, self._assigned = {}, {}, set(), {}, set()
        self._user_id = self._base_user_id = None
        self._keep_previous_id = False
        self._accessed = True

    # -- flash data: aged only by requests that showed it -----------------------------------------------

    def now(self, key: str, value: Any) -> None:
        """Store *value* for this request only (it goes at the end of this request, shown or not)."""
        super().now(key, value)
        self._flash_shown.add(key)

    def mark_page_shown(self) -> None:
        """This request rendered a page (a non-XHR HTML response to a GET): the middlewares call it.

        Flash data counts as shown then; otherwise only the flashed values the request read do, so
        an XHR poll or an asset request between a redirect and its page does not eat the message.
        """
        self._page_shown = True

    def _age_flash(self) -> None:
        if _FLASH not in self._live and not _flash_pending(self._raw.get(_FLASH)):
            return  # nothing flashed in this request, nothing left to show from earlier ones
        store = self._store
        if self._page_shown or (store is not None and store.config.flash_aging == "request"):
            self.age_flash_data()
        else:
            self.age_flash_data(shown=self._flash_shown)


def flash_keys(state: Any) -> frozenset[str]:
    """The keys a stored flash state (`{"new": [...], "old": [...]}`, raw) leaves for this request to show."""
    if type(state) is not dict:
        return frozenset()
    old = state.get("old")
    return frozenset(k for k in old if type(k) is str) if type(old) is list else frozenset()


def _flash_pending(state: Any) -> bool:
    """Whether a stored flash state (raw) still names keys to age."""
    return type(state) is dict and any(type(state.get(part)) is list and state[part] for part in ("new", "old"))


def _seconds(value: int | timedelta | None, name: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, timedelta):
        return int(value.total_seconds())
    if type(value) is not int:
        raise TypeError(f"set_lifetime({name}=...) takes seconds (int) or a timedelta, not {type(value).__name__}")
    return value
