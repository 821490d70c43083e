"""session_actor semantics with Dramatiq's StubBroker and an in-process worker (fast; beside the real ones)."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from collections.abc import Iterator
from typing import Any

import dramatiq
import pytest
from dramatiq.brokers.stub import StubBroker
from dramatiq.results import Results
from dramatiq.results.backends import StubBackend

from sqla_sessions import MemoryHandler, Session, SessionConfig
from sqla_sessions.dramatiq import JOBS_KEY, SessionActor, gc_actor, session_actor
from tests.conftest import FakeClock


@pytest.fixture
def broker() -> Iterator[StubBroker]:
    broker = StubBroker()
    broker.add_middleware(Results(backend=StubBackend()))
    broker.emit_after("process_boot")
    dramatiq.set_broker(broker)  # results and groups look their broker up globally
    yield broker
    broker.flush_all()
    broker.close()
    dramatiq.broker.global_broker = None


@pytest.fixture
def worker(broker: StubBroker) -> Iterator[dramatiq.Worker]:
    worker = dramatiq.Worker(broker, worker_timeout=50, worker_threads=2)
    worker.start()
    yield worker
    worker.stop()


@pytest.fixture
def handler(clock: FakeClock) -> MemoryHandler:
    return MemoryHandler(SessionConfig(), clock=clock)


def stored(handler: MemoryHandler, **data: Any) -> Session:
    session = handler.load(None)
    session.put(data or {"seed": True})
    session.save()
    return handler.load(session.id)


def actor_on(broker: StubBroker, handler: MemoryHandler, fn: Any, **options: Any) -> SessionActor[..., Any]:
    return session_actor(broker=broker, handler=handler, max_retries=0, **options)(fn)


def test_send_with_a_session_waits_for_its_save_and_carries_only_the_key(
    broker: StubBroker, handler: MemoryHandler
) -> None:
    def hydrate(session: Session, marker: str) -> None:
        session["hydrated"] = marker

    actor = actor_on(broker, handler, hydrate)
    session = handler.load(None)
    session["marker"] = "m1"
    pending = actor.send(session, "m1")
    assert broker.queues[actor.queue_name].qsize() == 0  # not before the save
    with pytest.raises(RuntimeError):
        _ = pending.message_id
    session.save()
    assert broker.queues[actor.queue_name].qsize() == 1
    message = dramatiq.Message.decode(broker.queues[actor.queue_name].get())
    assert message.args[0] == session.key and message.args[2:] == ("m1",)
    assert session.id not in json.dumps(message.asdict())
    assert pending.message_id == message.message_id


def test_a_failed_save_sends_nothing(
    broker: StubBroker, handler: MemoryHandler, caplog: pytest.LogCaptureFixture
) -> None:
    actor = actor_on(broker, handler, lambda session: None)
    session = stored(handler, a=1)
    handler.revoke(session.key or "")
    session["b"] = 2
    actor.send(session)
    with pytest.raises(Exception, match="destroyed"):
        session.save()
    assert broker.queues[actor.queue_name].qsize() == 0
    assert "not run: the session was not saved" in caplog.text


def test_the_job_merges_onto_writes_made_while_it_ran(broker: StubBroker, worker: Any, handler: MemoryHandler) -> None:
    started, release = threading.Event(), threading.Event()

    def slow(session: Session) -> str:
        started.set()
        release.wait(10)
        session["result"] = [1, 2, 3]
        return "ok"

    actor = actor_on(broker, handler, slow, store_results=True)
    session = stored(handler, keep=True)
    message = actor.send(session.key or "")
    assert started.wait(10)
    request = handler.load_by_key(session.key or "")
    assert request is not None
    request["from_request"] = True
    request.save()
    release.set()
    assert message.get_result(block=True, timeout=10_000) == "ok"
    final = handler.load_by_key(session.key or "")
    assert final is not None
    assert {k: v for k, v in final.items() if k != JOBS_KEY} == {
        "keep": True,
        "from_request": True,
        "result": [1, 2, 3],
    }


def test_a_logged_out_session_is_never_resurrected(broker: StubBroker, worker: Any, handler: MemoryHandler) -> None:
    ran: list[str] = []
    actor = actor_on(broker, handler, lambda session: ran.append("ran"))
    session = stored(handler)
    key = session.key or ""
    session.logout()
    session.save()
    actor.send(key)
    broker.join(actor.queue_name)
    assert ran == [] and len(handler) == 0


def test_a_logout_while_the_job_runs_drops_its_changes(broker: StubBroker, worker: Any, handler: MemoryHandler) -> None:
    started, release = threading.Event(), threading.Event()

    def slow(session: Session) -> None:
        started.set()
        release.wait(10)
        session["result"] = "late"

    actor = actor_on(broker, handler, slow)
    session = stored(handler)
    actor.send(session.key or "")
    assert started.wait(10)
    handler.revoke(session.key or "")
    release.set()
    broker.join(actor.queue_name)
    assert len(handler) == 0


def test_a_regenerated_id_still_gets_the_results(broker: StubBroker, worker: Any, handler: MemoryHandler) -> None:
    started, release = threading.Event(), threading.Event()

    def slow(session: Session) -> None:
        started.set()
        release.wait(10)
        session["result"] = "landed"

    actor = actor_on(broker, handler, slow)
    session = stored(handler)
    actor.send(session.key or "")
    assert started.wait(10)
    session.regenerate()  # a new id while the job runs (not a change of privilege)
    session.save()
    release.set()
    broker.join(actor.queue_name)
    assert handler.load(session.id)["result"] == "landed"


@pytest.mark.parametrize("while_running", [False, True])
def test_a_job_enqueued_before_a_login_is_dropped(
    broker: StubBroker, worker: Any, handler: MemoryHandler, while_running: bool
) -> None:
    """A job an attacker queued on a planted session never lands in the victim's logged-in session."""
    started, release = threading.Event(), threading.Event()

    def plant(session: Session) -> None:
        started.set()
        release.wait(10)
        session["planted_by_job"] = True

    actor = actor_on(broker, handler, plant)
    session = stored(handler)
    if while_running:
        actor.send(session.key or "")
        assert started.wait(10)
    else:
        worker.pause()
        actor.send(session.key or "")
    session.login("victim")
    session.save()
    if not while_running:
        worker.resume()
    release.set()
    broker.join(actor.queue_name)
    worker.join()
    assert "planted_by_job" not in handler.load(session.id)


def test_a_redelivered_job_lands_once(handler: MemoryHandler, broker: StubBroker) -> None:
    runs: list[int] = []

    def append(session: Session) -> None:
        runs.append(1)
        session.push("events", "hydrated")

    actor = actor_on(broker, handler, append)
    session = stored(handler)
    message = actor.message(session)
    for _ in range(2):  # the same message delivered twice (a worker died before acking)
        actor.actor.fn(*message.args, **message.kwargs)
    assert runs == [1]
    assert handler.load(session.id)["events"] == ["hydrated"]


def test_a_job_does_not_count_as_user_activity(handler: MemoryHandler, broker: StubBroker, clock: FakeClock) -> None:
    session = stored(handler)
    before = (session.last_activity, session.expires_at)
    clock.advance(600)
    actor_on(broker, handler, lambda s: s.put("x", 1))(session)
    after = handler.load(session.id)
    assert after["x"] == 1 and (after.last_activity, after.expires_at) == before


def test_dispatch_several_jobs_wait_for_them_and_see_the_results_in_the_same_request(
    broker: StubBroker, worker: Any, handler: MemoryHandler
) -> None:
    def part(session: Session, name: str) -> str:
        session[f"part_{name}"] = name.upper()
        return name

    actor = actor_on(broker, handler, part, store_results=True)
    session = stored(handler)
    session["requested"] = True
    session.save(end_of_request=False)  # flush this request's writes before the workers read them
    jobs = dramatiq.group([actor.message(session, name) for name in ("a", "b", "c")]).run()
    assert sorted(jobs.get_results(block=True, timeout=10_000)) == ["a", "b", "c"]
    session.reload()
    assert (session["part_a"], session["part_b"], session["part_c"], session["requested"]) == ("A", "B", "C", True)


def test_a_new_session_gets_its_key_at_the_save(broker: StubBroker, handler: MemoryHandler) -> None:
    actor = actor_on(broker, handler, lambda s: None)
    session = handler.load(None)
    with pytest.raises(ValueError):
        actor.message(session)
    actor.send(session)
    session["a"] = 1
    session.save()
    message = dramatiq.Message.decode(broker.queues[actor.queue_name].get())
    assert message.args[0] == session.key


def test_gc_actor_sweeps(broker: StubBroker, worker: Any, handler: MemoryHandler, clock: FakeClock) -> None:
    stored(handler)
    clock.advance(handler.config.lifetime_seconds + 1)
    sweep = gc_actor(broker=broker, handler=handler, store_results=True)
    assert sweep.send().get_result(block=True, timeout=10_000) == 1
    assert len(handler) == 0


def test_importing_the_module_creates_no_broker() -> None:
    code = "import dramatiq.broker as b, sqla_sessions.dramatiq; print(b.global_broker is None)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "True"


def test_two_jobs_finishing_together_both_land_once(broker: StubBroker, worker: Any, handler: MemoryHandler) -> None:
    """Both ids are recorded (they merge as a list), so a later redelivery of either is skipped."""
    together = threading.Barrier(2)

    def bump(session: Session, n: int) -> None:
        session.increment("count")
        session.push("seen", n)
        together.wait(10)  # both loaded the same version: one compare-and-set wins, the other merges

    actor = actor_on(broker, handler, bump)
    session = stored(handler)
    first, second = actor.message(session.key or "", 1), actor.message(session.key or "", 2)
    broker.enqueue(first)
    broker.enqueue(second)
    broker.join(actor.queue_name)
    worker.join()
    stored_now = handler.load(session.id)
    assert stored_now["count"] == 2 and sorted(stored_now["seen"]) == [1, 2]
    together.reset()
    together = threading.Barrier(1)  # redeliveries run one at a time
    broker.enqueue(first)
    broker.enqueue(second)
    broker.join(actor.queue_name)
    worker.join()
    assert handler.load(session.id)["count"] == 2


def test_a_redelivery_racing_its_original_lands_once(broker: StubBroker, worker: Any, handler: MemoryHandler) -> None:
    """The job id is checked inside the write, not only at load: two deliveries running at once apply once."""
    together = threading.Barrier(2)

    def apply(session: Session) -> None:
        session[f"effect_{threading.get_ident()}"] = True  # an effect that would show up twice
        together.wait(10)  # both deliveries loaded the session before either wrote

    actor = actor_on(broker, handler, apply)
    session = stored(handler)
    message = actor.message(session.key or "")
    broker.enqueue(message)
    broker.enqueue(message)
    broker.join(actor.queue_name)
    worker.join()
    stored_now = handler.load(session.id)
    assert [k for k in stored_now if k.startswith("effect_")] != []
    assert len([k for k in stored_now if k.startswith("effect_")]) == 1
    assert stored_now[JOBS_KEY].count(message.args[1]) == 1


def test_a_job_sent_before_a_login_in_the_same_request_is_dropped(broker: StubBroker, handler: MemoryHandler) -> None:
    """Sent on alice's session, then the request logs in as bob: the job must not land in bob's session."""
    landed: list[str | None] = []

    def notify(session: Session) -> None:
        landed.append(session.user_id)
        session["inbox"] = "for alice"

    actor = actor_on(broker, handler, notify)
    session = stored(handler)
    session.login("alice")
    session.save()
    request = handler.load(session.id)
    before = actor.send(request)  # bound to alice's session as it is now ...
    request.login("bob")  # ... which this request then cuts off
    after = actor.send(request)  # sent after the login: bob's
    request.save()
    assert not before.sent and after.sent
    worker = dramatiq.Worker(broker, worker_threads=1)
    worker.start()
    broker.join(actor.queue_name)
    worker.join()
    worker.stop()
    assert landed == ["bob"]
