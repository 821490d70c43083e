"""Random concurrent histories against real servers, each checked against the definition of the merge.

One history: a few browsers, each with a session of its own, send overlapping requests to uvicorn
(Starlette) and gunicorn gthread (Flask) — operations on shared keys with unique values (list push,
insert and remove, increments, nested dict sets, set add and discard), some on blocking routes, some
slow enough that their client gives up (a disconnect mid-request), some saving with `asave()` under a
`wait_for` timeout; `regenerate()` and `login()` in the middle; Dramatiq jobs through Redis and direct
handler calls writing the same keys; connections killed with `pg_terminate_backend` (and, in long
runs, a PostgreSQL restart). Then the checker waits for the jobs and reads every session.

The check, per session (see `Ledger.violations`): every acknowledged operation is reflected exactly
once; a refused one (409) is absent; one whose outcome the client never learnt is absent or present
once, never twice; each counter equals its base plus its acknowledged increments (plus at most the
unknown ones); nothing of another session appears; a job lands at most once, and exactly once unless
a login cut it off.
"""

from __future__ import annotations

import random
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import httpx
import sqlalchemy as sa

from sqla_sessions import DatabaseHandler, SessionInterrupted
from tests.history.apps import apply, config
from tests.web.served_app import cookie_of, sent

ACKED, REFUSED, UNKNOWN = "acked", "refused", "unknown"
STRAY = "stray"  # sent with a cookie a login or regenerate had just replaced: it got a fresh session
KINDS = ["push"] * 6 + [
    "insert",
    "remove",
    "remove",
    "swap",
    "swap",
    "incr",
    "incr",
    "dset",
    "sadd",
    "sdiscard",
    "job",
    "direct",
]
RARE = ["regenerate", "login", "kill"]


@dataclass
class Op:
    """One step of a history: what, for which browser, through which door, when."""

    seed: int  # the history's: values and users are unique across histories
    number: int
    browser: int
    kind: str
    at: float  # seconds after the history starts
    server: str = "asgi"  # asgi | wsgi
    blocking: bool = False
    sleep: float = 0.0
    client_timeout: float = 10.0
    asave_timeout: float = 0.0
    target: int | None = None  # remove / sdiscard: the op whose value goes

    def describe(self) -> str:
        extras = [self.server]
        if self.blocking:
            extras.append("blocking")
        if self.sleep:
            extras.append(f"sleep={self.sleep}")
        if self.client_timeout < 10:
            extras.append(f"client gives up after {self.client_timeout}s")
        if self.asave_timeout:
            extras.append(f"asave under wait_for({self.asave_timeout})")
        target = f" of op {self.target}" if self.target is not None else ""
        return f"op {self.number}: browser {self.browser} {self.kind}{target} at {self.at:.2f}s ({', '.join(extras)})"

    @property
    def value(self) -> str:
        return f"s{self.seed}-b{self.browser}-op{self.number}"

    @property
    def user(self) -> str:
        return f"s{self.seed}-user{self.browser}"


def generate(seed: int, browsers: int = 2, length: int = 40, seconds: float = 1.5) -> list[Op]:
    """A random history (the same for the same seed)."""
    rng = random.Random(seed)
    ops: list[Op] = []
    for number in range(length):
        kind = rng.choice(RARE) if rng.random() < 0.08 else rng.choice(KINDS)
        op = Op(seed, number, rng.randrange(browsers), kind, round(rng.uniform(0, seconds), 3))
        op.server = rng.choice(["asgi", "wsgi"])
        if kind in ("remove", "swap", "sdiscard"):
            wanted = ("sadd",) if kind == "sdiscard" else ("push", "insert", "swap")
            earlier = [o.number for o in ops if o.browser == op.browser and o.kind in wanted and o.at < op.at]
            if not earlier:
                op.kind = "push"
            else:
                op.target = rng.choice(earlier[-3:])  # recent items: several requests go for the same one
        roll = rng.random()
        if roll < 0.15:
            op.blocking = True
        elif roll < 0.35:
            op.sleep = 0.3  # loads early, saves late: overlaps the requests around it
        elif roll < 0.42:
            op.sleep, op.client_timeout = 0.6, 0.2  # the client disconnects mid-request
        elif roll < 0.52 and op.server == "asgi":
            op.sleep, op.asave_timeout = 0.0, 0.001
        ops.append(op)
    return sorted(ops, key=lambda o: o.at)


@dataclass
class Outcome:
    op: Op
    status: str
    value: str | None = None  # the value removed (remove/sdiscard), or written
    finished: float = field(default_factory=time.monotonic)


@dataclass
class Browser:
    """One user agent: its cookie (updated by each response that sets one) and what it was told."""

    number: int
    cookie: str | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)
    navigating: threading.Lock = field(default_factory=threading.Lock)
    settled: threading.Event = field(default_factory=threading.Event)
    """Clear while a login or regenerate is on its way: a browser navigating to the login's response
    sends its next requests once it has the new cookie (the ones already in flight race it)."""

    def __post_init__(self) -> None:
        self.settled.set()

    @property
    def key(self) -> str | None:
        return self.cookie.split(".", 1)[0] if self.cookie else None


class History:
    """Runs one generated history against the servers and checks the result."""

    def __init__(self, ops: list[Op], urls: dict[str, str], handler: DatabaseHandler, admin: sa.Engine) -> None:
        self.ops = ops
        self.urls = urls
        self.handler = handler
        self.admin = admin
        self.browsers = {b: Browser(b) for b in {op.browser for op in ops}}
        self.outcomes: dict[int, Outcome] = {}
        self.started = 0.0

    def run(self) -> list[str]:
        for browser in self.browsers.values():  # each browser starts with a stored session
            for _ in range(10):  # the connections a previous history's `kill` ended fail once each
                with httpx.Client(timeout=10) as client:
                    response = client.post(f"{self.urls['asgi']}/op", json={"kind": "incr"})
                if response.status_code == 200:
                    break
                time.sleep(0.2)
            response.raise_for_status()
            browser.cookie = cookie_of(response) or None
        self.started = time.monotonic()
        with ThreadPoolExecutor(max_workers=12) as pool:
            for future in [pool.submit(self._run_at, op) for op in self.ops]:
                future.result()
        self._wait_for_jobs()
        return self.violations()

    def _run_at(self, op: Op) -> None:
        delay = self.started + op.at - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        self.outcomes[op.number] = self._perform(op)

    def _perform(self, op: Op) -> Outcome:
        browser = self.browsers[op.browser]
        if op.kind in ("login", "regenerate"):
            with browser.navigating:  # one login form at a time (a double submit forks the session)
                browser.settled.clear()
                try:
                    return self._send(op, browser)
                finally:
                    browser.settled.set()
        browser.settled.wait(30)
        return self._send(op, browser)

    def _send(self, op: Op, browser: Browser) -> Outcome:
        if op.kind == "kill":
            try:
                with self.admin.connect() as conn:
                    conn.exec_driver_sql(
                        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                        "WHERE datname = current_database() AND pid <> pg_backend_pid()"
                    )
            except sa.exc.DBAPIError:
                pass  # a kill at the same moment ended this one's connection too
            return Outcome(op, ACKED)
        value = op.value
        if op.target is not None:
            target = self.outcomes.get(op.target)
            if target is None or target.status != ACKED:
                return Outcome(op, REFUSED)  # nothing to remove that is known to be there
            value = target.op.value
        body: dict[str, Any] = {"kind": op.kind, "value": value, "new": op.value, "user": op.user}
        if op.kind == "direct":
            return Outcome(op, self._direct(browser, value), value)
        if op.sleep:
            body["sleep"] = op.sleep
        if op.asave_timeout:
            body["asave_timeout"] = op.asave_timeout
        path = "/blocking/op" if op.blocking else "/op"
        sent_cookie = browser.cookie
        try:
            with httpx.Client(timeout=op.client_timeout) as client:
                response = client.post(f"{self.urls[op.server]}{path}", json=body, headers=sent(sent_cookie))
        except httpx.HTTPError:
            return Outcome(op, UNKNOWN, value)
        new_cookie = cookie_of(response) or None
        fresh = response.headers.get("content-type", "").startswith("application/json") and response.json().get("fresh")
        if fresh:
            # Its cookie named no live session any more (a login moved it meanwhile): it was given a
            # fresh one, and acted there. The browser keeps the session it knows is its own.
            return Outcome(op, STRAY, value)
        if new_cookie:
            with browser.lock:
                browser.cookie = new_cookie
        if response.status_code == 200 and response.json().get("saved"):
            return Outcome(op, ACKED, value)
        if response.status_code == 409:
            # A timed-out asave() may have landed before the refusal of the save after it: unknown.
            return Outcome(op, UNKNOWN if op.asave_timeout else REFUSED, value)
        return Outcome(op, UNKNOWN, value)

    def _direct(self, browser: Browser, value: str) -> str:
        """A handler call in this process (a script, an admin tool): load by key, push, save."""
        key = browser.key
        try:
            session = self.handler.load_by_key(key or "")
            if session is None:
                return REFUSED
            apply(session, {"kind": "push", "value": value})
            session.save(end_of_request=False)
        except SessionInterrupted:
            return REFUSED
        except Exception:
            return UNKNOWN
        return ACKED

    def _wait_for_jobs(self) -> None:
        """Until every acknowledged job landed (or was cut off), bounded."""
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if all(self._job_settled(o) for o in self.outcomes.values() if o.op.kind == "job" and o.status == ACKED):
                return
            time.sleep(0.2)

    def _job_settled(self, outcome: Outcome) -> bool:
        stored = self._stored(self.browsers[outcome.op.browser])
        log = stored.get("log", []) if stored else []
        return outcome.op.value in log or self._cut_off_after(outcome)

    def _cut_off_after(self, outcome: Outcome) -> bool:
        """A login of its browser that may have committed after the job was enqueued: it cuts the job
        off (dropping it is right). One whose answer never came may have committed at any time."""
        started = self.started + outcome.op.at
        return any(
            o.op.kind == "login"
            and o.op.browser == outcome.op.browser
            and (o.status == UNKNOWN or (o.status == ACKED and o.finished >= started))
            for o in self.outcomes.values()
        )

    def _key(self, browser: Browser) -> str | None:
        """The browser's session: by its cookie, or, after a login whose answer never arrived (the row
        moved to a key the browser was not told), by its user (a browser logs in as one user only)."""
        logins = [o for o in self.outcomes.values() if o.op.browser == browser.number and o.op.kind == "login"]
        if any(o.status == UNKNOWN for o in logins):
            live = self.handler.list_sessions(logins[0].op.user)
            if len(live) == 1:
                return live[0].key
            if len(live) > 1:
                # A later login sent with the stale cookie logged in a fresh session too: the browser's
                # is the one holding what it was told was stored (values are unique).
                acked = {
                    o.op.value for o in self.outcomes.values() if o.op.browser == browser.number and o.status == ACKED
                }

                def held(key: str) -> int:
                    session = self.handler.load_by_key(key)
                    return 0 if session is None else len(acked & set(map(str, session.get("log", []))))

                return max(live, key=lambda info: held(info.key)).key
        return browser.key

    def _stored(self, browser: Browser) -> dict[str, Any] | None:
        for attempt in range(5):  # a connection a `kill` ended fails once, then the pool replaces it
            try:
                session = self.handler.load_by_key(self._key(browser) or "")
            except sa.exc.DBAPIError:
                if attempt == 4:
                    raise
                time.sleep(0.2)
                continue
            return None if session is None else session.all()
        return None

    def violations(self) -> list[str]:
        problems: list[str] = []
        for browser in self.browsers.values():
            stored = self._stored(browser)
            if stored is None:
                told = ", ".join(
                    f"{o.op.number}:{o.op.kind}={o.status}"
                    for o in sorted(self.outcomes.values(), key=lambda o: o.op.at)
                    if o.op.browser == browser.number
                )
                users = {o.op.user for o in self.outcomes.values() if o.op.browser == browser.number}
                live = {user: [i.key for i in self.handler.list_sessions(user)] for user in users}
                problems.append(
                    f"browser {browser.number}: its session is gone (cookie key {browser.key}, "
                    f"its user's live sessions {live}; it was told {told})"
                )
                continue
            found = self._check(browser, stored)
            if found:
                told = ", ".join(
                    f"{o.op.number}:{o.op.kind}={o.status}"
                    for o in sorted(self.outcomes.values(), key=lambda o: o.op.at)
                    if o.op.browser == browser.number
                )
                found.append(
                    f"browser {browser.number} (session {self._key(browser)}, stored {stored}) was told {told}"
                )
            problems += found
        return problems

    def _check(self, browser: Browser, stored: dict[str, Any]) -> list[str]:
        mine = [o for o in self.outcomes.values() if o.op.browser == browser.number]
        log = stored.get("log", [])
        tags = stored.get("tags", set())
        deep = stored.get("prefs", {}).get("deep", {})
        counts = Counter(log)
        problems = []
        prefix = mine[0].op.value.rsplit("-op", 1)[0] + "-op" if mine else "?"
        strangers = [v for v in [*log, *tags, *deep] if not str(v).startswith(prefix)]  # (…-after too)
        if strangers:
            problems.append(f"browser {browser.number}: values of another session: {strangers}")
        removed = {o.value for o in mine if o.op.kind in ("remove", "swap") and o.status in (ACKED, UNKNOWN)}
        discarded = {o.value for o in mine if o.op.kind == "sdiscard" and o.status in (ACKED, UNKNOWN)}
        for o in mine:
            v, kind = o.op.value, o.op.kind
            if kind == "swap" and o.status == ACKED and counts[o.value]:
                problems.append(f"{o.op.describe()}: acknowledged removal of {o.value}, still there")
            if kind in ("push", "insert", "swap", "direct", "job"):
                n = counts[v]
                if n > 1:
                    problems.append(f"{o.op.describe()}: {o.status}, stored {n} times")
                elif (
                    o.status == ACKED and n == 0 and v not in removed and not (kind == "job" and self._cut_off_after(o))
                ):
                    problems.append(f"{o.op.describe()}: acknowledged, missing")
                elif o.status in (REFUSED, STRAY) and n == 1:
                    problems.append(f"{o.op.describe()}: {o.status}, yet stored")
            elif kind == "remove" and o.status == ACKED and counts[o.value]:
                problems.append(f"{o.op.describe()}: acknowledged removal of {o.value}, still there")
            elif kind == "dset":
                if o.status == ACKED and deep.get(v) != v:
                    problems.append(f"{o.op.describe()}: acknowledged, missing from the nested dict")
                elif o.status in (REFUSED, STRAY) and v in deep:
                    problems.append(f"{o.op.describe()}: {o.status}, yet stored")
            elif kind == "sadd":
                if o.status == ACKED and v not in tags and v not in discarded:
                    problems.append(f"{o.op.describe()}: acknowledged, missing from the set")
                elif o.status in (REFUSED, STRAY) and v in tags:
                    problems.append(f"{o.op.describe()}: {o.status}, yet stored")
            elif kind == "sdiscard" and o.status == ACKED and o.value in tags:
                problems.append(f"{o.op.describe()}: acknowledged discard of {o.value}, still there")
        for o in mine:  # what the app pushed after its timed-out asave(): stored with the push, once
            if o.op.kind == "push" and o.op.asave_timeout:
                after = counts[f"{o.op.value}-after"]
                if after > 1 or (o.status == ACKED and after == 0 and o.op.value not in removed):
                    problems.append(f"{o.op.describe()}: {o.status}, its later push stored {after} times")
                elif o.status in (REFUSED, STRAY) and after:
                    problems.append(f"{o.op.describe()}: {o.status}, yet its later push is stored")
        increments = [o for o in mine if o.op.kind == "incr"]
        low = 1 + sum(1 for o in increments if o.status == ACKED)  # 1: the request that created it
        high = low + sum(1 for o in increments if o.status == UNKNOWN)
        if not low <= stored.get("n", 0) <= high:
            problems.append(f"browser {browser.number}: counter {stored.get('n')}, expected {low}..{high}")
        return problems


def make_handler() -> DatabaseHandler:
    return DatabaseHandler(config().database_url, config())
