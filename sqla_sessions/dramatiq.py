"""Dramatiq actors that work on a user's session in the background.

    from sqla_sessions.dramatiq import session_actor

    @session_actor(max_retries=3)
    def hydrate(session, marker):
        if session.get("marker") != marker:
            return                      # an older login's job: nothing to do
        session["dashboard"] = slow_report(session.user_id)

    hydrate.send(request.session, marker)   # during a request

Guarantees:

- **After the save.** `send()` with a `Session` enqueues the message only once that session has been
  saved (the middleware saves when the response starts), so the worker sees what the request wrote;
  if the request fails (5xx, exception) nothing is sent.
- **By key.** The message carries the session's stable `key`, never the cookie id.
- **Short transaction.** The worker loads the session by key (no activity is recorded), runs the
  function outside any transaction or lock, then merges only the keys the function changed onto the
  current row: one compare-and-set `UPDATE`, or a short locked merge if a request wrote meanwhile.
  Keys requests wrote meanwhile survive; the job's keys survive the next request's save.
- **No resurrection.** If the session was logged out, revoked or expired since the message was sent,
  the function does not run (or its changes are dropped if that happens while it runs), with a log
  line. A regenerated id does not matter: the key is stable.
- **Exactly-once effects on the session.** Every message carries a job id that is recorded in the
  session in the same write as the job's changes; a redelivered message (Redis requeues the
  messages of a worker that died) whose changes already landed is skipped. Effects outside the
  session (emails, payments) are at-least-once, as with any Dramatiq actor.

Worker configuration: the worker builds its handler lazily from `SessionConfig.from_env()`
(`SQLA_SESSIONS_DATABASE_URL`, `SQLA_SESSIONS_TABLE`, …) on the first message, i.e. after the
`dramatiq` CLI has forked; or call `configure(handler)` in the worker module, or pass `handler=`.
Importing this module creates no broker; decorating an actor binds it to `broker=` or, as with any
Dramatiq actor, to the broker set by `dramatiq.set_broker()`.
"""

from __future__ import annotations

import logging
import os
import threading
import uuid
from collections.abc import Callable
from typing import Any, Generic, ParamSpec, TypeVar, overload

try:
    import dramatiq
except ImportError:  # pragma: no cover - dramatiq is a core dependency
    raise ImportError("sqla_sessions.dramatiq needs dramatiq: pip install sqla-sessions") from None

from .config import SessionConfig
from .core.session import Session
from .core.unit import JOBS_KEY, JobAlreadyApplied
from .errors import SessionInterrupted
from .store.handlers.base import BaseHandler
from .store.handlers.database import DatabaseHandler

logger = logging.getLogger("sqla_sessions")

P = ParamSpec("P")
R = TypeVar("R")

#: How many job ids a session remembers.
JOBS_REMEMBERED = 32

HandlerSource = BaseHandler[Any] | Callable[[], BaseHandler[Any]] | None

_default: BaseHandler[Any] | None = None
_default_pid: int | None = None
_default_lock = threading.Lock()


def configure(handler: BaseHandler[Any] | None) -> None:
    """Set the handler session actors use in this process (None: build one from the environment)."""
    global _default, _default_pid
    with _default_lock:
        _default, _default_pid = handler, (os.getpid() if handler is not None else None)


def default_handler() -> BaseHandler[Any]:
    """The process's handler: configured, or built from `SessionConfig.from_env()` on first use."""
    global _default, _default_pid
    with _default_lock:
        if _default is None:
            config = SessionConfig.from_env()
            handler = DatabaseHandler(config.database_url, config)
            if config.check_on_startup:
                handler.check()  # raises with one line saying what to fix; the next message tries again
            _default = handler
        elif _default_pid != os.getpid() and isinstance(_default, DatabaseHandler):
            # Configured before a fork: never share the parent's pooled connections.
            _default.engine.dispose(close=False)
        _default_pid = os.getpid()
        return _default


class SessionActor(Generic[P, R]):
    """A Dramatiq actor whose function receives a `Session` loaded by key."""

    def __init__(self, fn: Callable[..., R], actor: dramatiq.Actor[..., Any], handler: HandlerSource) -> None:
        self.fn = fn
        self.actor = actor
        self._handler = handler

    @property
    def actor_name(self) -> str:
        return str(self.actor.actor_name)

    @property
    def queue_name(self) -> str:
        return str(self.actor.queue_name)

    @property
    def broker(self) -> dramatiq.Broker:
        return self.actor.broker

    def handler(self) -> BaseHandler[Any]:
        source = self._handler
        if source is None:
            return default_handler()
        if isinstance(source, BaseHandler):
            return source
        handler = source()
        self._handler = handler
        return handler

    def message(self, session_or_key: Session | str, *args: Any, **kwargs: Any) -> dramatiq.Message[Any]:
        """Build (without sending) the message for a stored session, e.g. for `dramatiq.group`."""
        return self.message_with_options(session_or_key, args=args, kwargs=kwargs)

    def message_with_options(
        self,
        session_or_key: Session | str,
        *,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
        **options: Any,
    ) -> dramatiq.Message[Any]:
        return self._message(_key_of(session_or_key), uuid.uuid4().hex, args, kwargs, options)

    def _message(
        self, key: str, job_id: str, args: tuple[Any, ...], kwargs: dict[str, Any] | None, options: dict[str, Any]
    ) -> dramatiq.Message[Any]:
        """The wire form of a job: the session's key and a job id first (never the cookie id)."""
        return self.actor.message_with_options(args=(key, job_id, *args), kwargs=kwargs or {}, **options)

    def send(self, session_or_key: Session | str, *args: Any, **kwargs: Any) -> dramatiq.Message[Any]:
        """Enqueue a job on the session; with a `Session`, only once it has been saved (see module doc)."""
        return self.send_with_options(session_or_key, args=args, kwargs=kwargs)

    def send_with_options(
        self,
        session_or_key: Session | str,
        *,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
        delay: int | None = None,
        **options: Any,
    ) -> dramatiq.Message[Any]:
        if isinstance(session_or_key, str):
            message = self.message_with_options(session_or_key, args=args, kwargs=kwargs, **options)
            return self.broker.enqueue(message, delay=delay)
        session = session_or_key
        job_id = uuid.uuid4().hex
        generation = session.generation
        # The key may not exist yet (a new session is stored by its first save): build the message then.
        holder: list[dramatiq.Message[Any]] = []

        def enqueue() -> None:
            if session.generation != generation:
                # Sent before a login (or logout) in the same request: the job belongs to the session
                # as it was, which is cut off now, so it must not land in the new one.
                logger.info(
                    "%s job %s dropped: the session changed privilege after it was sent", self.actor_name, job_id
                )
                return
            message = self._message(_key_of(session), job_id, args, kwargs, options)
            holder.append(self.broker.enqueue(message, delay=delay))

        session.on_saved(enqueue, f"{self.actor_name} job {job_id}")
        return _PendingMessage(self, job_id, holder)  # type: ignore[return-value]

    def __call__(self, session_or_key: Session | str, *args: Any, **kwargs: Any) -> R | None:
        """Run the job inline, as the worker would (tests, scripts)."""
        return self._run(_key_of(session_or_key), uuid.uuid4().hex, *args, **kwargs)

    def _run(self, key: str, job_id: str, *args: Any, **kwargs: Any) -> R | None:
        handler = self.handler()
        session = handler.load_by_key(key)
        if session is None:
            logger.info("%s: session %s is gone (logged out, revoked or expired); job dropped", self.actor_name, key)
            return None
        done = session.get(JOBS_KEY)
        if isinstance(done, list) and job_id in done:
            logger.info("%s: job %s already landed on session %s; redelivery skipped", self.actor_name, job_id, key)
            return None
        result = self.fn(session, *args, **kwargs)  # no transaction, no lock: it may take its time
        recent = [j for j in (done if isinstance(done, list) else []) if j != job_id][-(JOBS_REMEMBERED - 1) :]
        session[JOBS_KEY] = [*recent, job_id]
        try:
            # The job id is checked again inside the write (compare-and-set or locked merge), and the
            # ids merge as a list: two jobs finishing at once both land, a redelivery of either is refused.
            handler.save(session, record_activity=False, job_id=job_id)
        except JobAlreadyApplied:
            logger.info("%s: job %s already landed on session %s; redelivery dropped", self.actor_name, job_id, key)
            return None
        except SessionInterrupted:
            logger.info("%s: session %s ended while the job ran; its changes were dropped", self.actor_name, key)
            return None
        return result


class _PendingMessage:
    """What `send(session)` returns: the message as soon as it has been enqueued (after the save)."""

    def __init__(self, actor: SessionActor[Any, Any], job_id: str, holder: list[dramatiq.Message[Any]]) -> None:
        self.actor = actor
        self.job_id = job_id
        self._holder = holder

    @property
    def sent(self) -> bool:
        return bool(self._holder)

    def __getattr__(self, name: str) -> Any:
        if not self._holder:
            raise RuntimeError("the message is enqueued when the session is saved; save it first")
        return getattr(self._holder[0], name)


def _key_of(session_or_key: Session | str) -> str:
    if isinstance(session_or_key, str):
        return session_or_key
    key = session_or_key.key
    if key is None:
        raise ValueError("this session has not been stored yet: save it (or write to it) before sending a job")
    return key


@overload
def session_actor(fn: Callable[..., R], /) -> SessionActor[..., R]: ...
@overload
def session_actor(
    fn: None = None, /, *, broker: dramatiq.Broker | None = None, handler: HandlerSource = None, **actor_options: Any
) -> Callable[[Callable[..., R]], SessionActor[..., R]]: ...
def session_actor(
    fn: Callable[..., R] | None = None,
    /,
    *,
    broker: dramatiq.Broker | None = None,
    handler: HandlerSource = None,
    **actor_options: Any,
) -> SessionActor[..., R] | Callable[[Callable[..., R]], SessionActor[..., R]]:
    """Turn `fn(session, *args, **kwargs)` into a Dramatiq actor working on the session.

    *handler* is a handler or a zero-argument factory (called once, in the worker process); default:
    `configure()`'s, else one built from the environment. Other options go to `dramatiq.actor`
    (`actor_name`, `queue_name`, `max_retries`, `time_limit`, `store_results`, …).
    """

    def decorate(function: Callable[..., R]) -> SessionActor[..., R]:
        wrapper: SessionActor[..., R]

        def run(key: str, job_id: str, *args: Any, **kwargs: Any) -> R | None:
            return wrapper._run(key, job_id, *args, **kwargs)

        run.__name__ = function.__name__
        run.__qualname__ = function.__qualname__
        run.__module__ = function.__module__
        options: dict[str, Any] = {"actor_name": function.__name__, **actor_options}
        if broker is not None:
            options["broker"] = broker
        actor: dramatiq.Actor[..., Any] = dramatiq.actor(**options)(run)
        wrapper = SessionActor(function, actor, handler)
        return wrapper

    return decorate(fn) if fn is not None else decorate


def gc_actor(
    *, broker: dramatiq.Broker | None = None, handler: HandlerSource = None, **actor_options: Any
) -> dramatiq.Actor[..., int]:
    """Declare an actor that deletes expired sessions in batches (schedule it, e.g. every 10 minutes).

    Returns the actor; `actor.send()` runs one sweep. Nothing is declared until you call this.
    """
    options: dict[str, Any] = {"actor_name": "sqla_sessions_gc", "max_retries": 0, **actor_options}
    if broker is not None:
        options["broker"] = broker

    def sqla_sessions_gc(batch_size: int | None = None) -> int:
        resolved = handler if isinstance(handler, BaseHandler) else (handler() if handler else default_handler())
        deleted = resolved.gc(batch_size, on_batch=lambda n: logger.debug("gc batch deleted %d sessions", n))
        logger.info("gc deleted %d expired sessions", deleted)
        return deleted

    actor: dramatiq.Actor[..., int] = dramatiq.actor(**options)(sqla_sessions_gc)
    return actor
