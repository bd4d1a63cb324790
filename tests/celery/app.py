"""The Celery app under test: imported by the in-process worker fixture and, for tests that
must kill a worker, by ``celery -A tests.celery.app worker`` in a subprocess.

Tasks record what really ran in Redis (``runs:<tag>``, and the most that ran at once in
``peak:<tag>``), so the tests count executions instead of inferring them.
"""

from __future__ import annotations

import json
import os
import threading
import time
from typing import Any

import redis
from celery import Celery, signals
from celery.exceptions import Ignore, Reject

from celery_unique import RateLimit, RateLimitedTask, UniqueTask
from celery_unique import signals as unique_signals

app = Celery("celery_unique_tests")
app.conf.update(
    broker_connection_retry_on_startup=True,
    task_acks_late=False,
    worker_hijack_root_logger=False,
    result_expires=600,
    unique_key_prefix="cut:",
)


def configure(url: str) -> None:
    """Point the app at the test Redis (broker, results and locks)."""
    app.conf.update(broker_url=url, result_backend=url)


if os.environ.get("CELERY_UNIQUE_TEST_REDIS_URL"):
    configure(os.environ["CELERY_UNIQUE_TEST_REDIS_URL"])
if os.environ.get("CELERY_UNIQUE_TEST_DEAD_LOCKS_URL"):
    # A worker whose lock Redis is down and which may run tasks without their locks.
    app.conf.update(
        unique_backend_url=os.environ["CELERY_UNIQUE_TEST_DEAD_LOCKS_URL"], unique_fail_open=True
    )

if os.environ.get("CELERY_UNIQUE_TEST_LOCKS_URL"):
    # A worker whose lock Redis is a server of the test's own (to pause), failing closed.
    app.conf.update(unique_backend_url=os.environ["CELERY_UNIQUE_TEST_LOCKS_URL"])

if os.environ.get("CELERY_UNIQUE_TEST_CLUSTER_URL"):
    # Locks on a Redis Cluster; the broker and results stay on the test Redis.
    app.conf.update(
        unique_backend_url=os.environ["CELERY_UNIQUE_TEST_CLUSTER_URL"],
        unique_backend_options={"cluster": True},
    )

if os.environ.get("CELERY_UNIQUE_TEST_MARK_REVOKES"):
    # A worker that marks revoked ids as Celery before 5.6.2 needs celery_unique to, whatever
    # the Celery installed (test_revoke.py).
    from celery_unique.celery import revokes

    revokes.install(force=True)

_clients: dict[str, redis.Redis] = {}

_ENTER = """
local now = redis.call('INCR', KEYS[1])
redis.call('INCR', KEYS[2])
if now > tonumber(redis.call('GET', KEYS[3]) or '0') then redis.call('SET', KEYS[3], now) end
redis.call('EXPIRE', KEYS[1], 600); redis.call('EXPIRE', KEYS[2], 600)
redis.call('EXPIRE', KEYS[3], 600)
return now
"""


def store() -> redis.Redis:
    url = str(app.conf.broker_url)
    if url not in _clients:
        _clients[url] = redis.Redis.from_url(url)
    return _clients[url]


class Run:
    """Counts a run of ``tag`` and how many of its runs overlap."""

    def __init__(self, tag: str) -> None:
        self.tag = tag

    def __enter__(self) -> Run:
        t = self.tag
        store().eval(_ENTER, 3, f"running:{t}", f"runs:{t}", f"peak:{t}")
        store().set(f"pid:{t}", os.getpid(), ex=600)  # which process runs it, to kill it
        return self

    def __exit__(self, *exc: object) -> None:
        store().decr(f"running:{self.tag}")


def runs(tag: str) -> int:
    return int(store().get(f"runs:{tag}") or 0)


def pid(tag: str) -> int:
    return int(store().get(f"pid:{tag}") or 0)


def peak(tag: str) -> int:
    return int(store().get(f"peak:{tag}") or 0)


@app.task(base=UniqueTask, name="t.slow")
def slow(tag: str, seconds: float = 0.3, extra: Any = None) -> str:
    with Run(tag):
        time.sleep(seconds)
    return tag


@app.task(base=UniqueTask, name="t.fails")
def fails(tag: str) -> None:
    with Run(tag):
        raise ValueError("boom")


@app.task(base=UniqueTask, name="t.ignores")
def ignores(tag: str) -> None:
    with Run(tag):
        raise Ignore()


@app.task(base=UniqueTask, name="t.rejects")
def rejects(tag: str) -> None:
    with Run(tag):
        raise Reject("no", requeue=False)


@app.task(base=UniqueTask, bind=True, name="t.retrying", max_retries=5)
def retrying(self: UniqueTask, tag: str, times: int = 2, delay: float = 0.3) -> int:
    with Run(tag):
        if self.request.retries < times:
            raise self.retry(countdown=delay)
    return int(self.request.retries)


@app.task(
    base=UniqueTask,
    bind=True,
    name="t.autoretrying",
    autoretry_for=(KeyError,),
    max_retries=5,
    default_retry_delay=0.2,
)
def autoretrying(self: UniqueTask, tag: str) -> int:
    with Run(tag):
        if self.request.retries < 2:
            raise KeyError("not yet")
    return int(self.request.retries)


@app.task(base=UniqueTask, name="t.customer", unique_on=["customer_id"])
def customer(customer_id: int, fmt: str = "pdf", tag: str = "") -> str:
    with Run(tag):
        time.sleep(0.3)
    return fmt


@app.task(base=UniqueTask, name="t.name_only", unique_on=[])
def name_only(tag: str) -> None:
    with Run(tag):
        time.sleep(0.3)


@app.task(base=UniqueTask, name="t.by_callable", unique_on=lambda a, b, tag: [a % 10, tag])
def by_callable(a: int, b: int, tag: str) -> None:
    with Run(tag):
        time.sleep(0.3)


@app.task(base=UniqueTask, name="t.started", unique_until="started")
def started(tag: str, seconds: float = 0.5) -> None:
    with Run(tag):
        time.sleep(seconds)


@app.task(base=UniqueTask, name="t.expired", unique_until="expired", unique_ttl=30)
def expired(tag: str) -> None:
    with Run(tag):
        pass


@app.task(base=UniqueTask, name="t.raising", on_duplicate="raise")
def raising(tag: str) -> None:
    with Run(tag):
        time.sleep(0.3)


@app.task(base=UniqueTask, name="t.short_lease", unique_lease=2)
def short_lease(tag: str, seconds: float = 60) -> None:
    with Run(tag):
        time.sleep(seconds)


@app.task(base=UniqueTask, name="t.pooled", unique_on=["tag"], unique_lease=2)
def pooled(tag: str, hold: bool = False) -> str:
    """For the pool tests (solo, threads, gevent, eventlet): with ``hold``, runs until the
    test calls ``let_go(tag)`` (60 s at most), looking every 50 ms, so the test keeps it
    running longer than its 2 s lease (only renewal keeps its key then) and knows every call
    it makes meanwhile came during the run; ``hold`` is not part of the key. Returns the
    module of the ``time.sleep`` it ran with: gevent's or eventlet's once the pool has
    monkey-patched the worker, the standard one otherwise."""
    with Run(tag):
        ends = time.monotonic() + 60
        while hold and not store().exists(f"go:{tag}") and time.monotonic() < ends:
            time.sleep(0.05)
    return str(time.sleep.__module__)


@app.task(base=UniqueTask, name="t.hogs", unique_lease=1)
def hogs(tag: str, seconds: float = 3.0) -> None:
    """Holds the CPU for ``seconds`` without yielding (no I/O, no sleep): under gevent or
    eventlet nothing else in the worker runs meanwhile, renewal included."""
    with Run(tag):
        ends = time.perf_counter() + seconds
        while time.perf_counter() < ends:
            pass


@app.task(base=UniqueTask, name="t.gated", unique_lease=2)
def gated(tag: str) -> None:
    """Runs until the test calls ``open_gate(tag)`` (60 s at most): still running, however
    slow the box, while the test does what must happen during the run."""
    with Run(tag):
        store().blpop([f"gate:{tag}"], timeout=60)


def open_gate(tag: str) -> None:
    store().rpush(f"gate:{tag}", 1)
    store().expire(f"gate:{tag}", 600)


@app.task(base=UniqueTask, name="t.hard_limit", time_limit=1, unique_lease=60)
def hard_limit(tag: str) -> None:
    with Run(tag):
        time.sleep(30)


# -- rate limited -------------------------------------------------------------------------------

LIMITED = RateLimit(10, per=1, burst=2)


def redis_now_us() -> int:
    seconds, micros = store().time()
    return int(seconds) * 1_000_000 + int(micros)


@app.task(base=RateLimitedTask, name="t.limited", global_rate_limit=LIMITED)
def limited(tag: str, i: int) -> int:
    store().rpush(f"times:{tag}", redis_now_us())
    store().expire(f"times:{tag}", 600)
    return i


@app.task(
    base=RateLimitedTask,
    name="t.per_customer",
    global_rate_limit=RateLimit(1, per=3600),
    rate_limit_key=["customer_id"],
)
def per_customer(customer_id: int, tag: str) -> None:
    with Run(tag):
        pass


@app.task(
    base=RateLimitedTask,
    name="t.dynamic",
    global_rate_limit=lambda tag, n: None if n == 0 else RateLimit(1, per=3600),
    rate_limit_key=lambda tag, n: tag,
)
def dynamic(tag: str, n: int) -> None:
    with Run(tag):
        pass


class UniqueLimited(UniqueTask, RateLimitedTask):
    """Both at once: the unique lock is kept while the rate limit defers the run."""


@app.task(
    base=UniqueLimited,
    bind=True,
    name="t.unique_limited",
    global_rate_limit=RateLimit(1, per=2),
    rate_limit_key=lambda tag: tag,
    max_retries=0,
)
def unique_limited(self: UniqueTask, tag: str) -> int:
    with Run(tag):
        return int(self.request.retries)


# The migration layers' tasks register on this app too (after everything they import).
from tests.celery import compat_tasks  # noqa: E402, F401

# -- rate limited: booked slots -----------------------------------------------------------------

BOOKED = RateLimit(20, per=1, burst=2)


def record_time(tag: str) -> None:
    store().rpush(f"times:{tag}", redis_now_us())
    store().expire(f"times:{tag}", 600)


@app.task(
    base=RateLimitedTask,
    name="t.booked",
    global_rate_limit=BOOKED,
    rate_limit_key=lambda tag, i: tag,
)
def booked(tag: str, i: int) -> int:
    record_time(tag)
    return i


@app.task(
    base=RateLimitedTask,
    name="t.short_horizon",
    global_rate_limit=RateLimit(1, per=1),
    rate_limit_key=lambda tag: tag,
    rate_limit_max_wait=0.3,
)
def short_horizon(tag: str) -> None:
    record_time(tag)


# -- concurrency limits ---------------------------------------------------------------------------


@app.task(
    base=RateLimitedTask,
    bind=True,
    name="t.concurrent",
    concurrency_limit=2,
    concurrency_key=lambda tag, seconds=0.4: tag,
    max_retries=0,
)
def concurrent(self: RateLimitedTask, tag: str, seconds: float = 0.4) -> int:
    with Run(tag):
        time.sleep(seconds)
    return int(self.request.retries)


@app.task(
    base=RateLimitedTask,
    name="t.concurrent_fails",
    concurrency_limit=1,
    concurrency_key=lambda tag: tag,
)
def concurrent_fails(tag: str) -> None:
    with Run(tag):
        raise ValueError("boom")


@app.task(
    base=RateLimitedTask,
    name="t.one_per_customer",
    concurrency_limit=1,
    concurrency_key=["customer_id"],
)
def one_per_customer(customer_id: int, tag: str) -> None:
    with Run(f"{tag}:{customer_id}"), Run(tag):
        time.sleep(0.3)


@app.task(
    base=UniqueLimited,
    bind=True,
    name="t.unique_concurrent",
    concurrency_limit=1,
    concurrency_key=lambda tag, n: tag,
    max_retries=0,
)
def unique_concurrent(self: UniqueTask, tag: str, n: int) -> int:
    with Run(tag):
        time.sleep(0.3)
    return int(self.request.retries)


@app.task(
    base=RateLimitedTask,
    name="t.concurrent_hard_limit",
    concurrency_limit=1,
    concurrency_key=lambda tag: tag,
    time_limit=1,
    unique_lease=60,
)
def concurrent_hard_limit(tag: str) -> None:
    with Run(tag):
        time.sleep(30)


@app.task(
    base=RateLimitedTask,
    name="t.concurrent_short_lease",
    concurrency_limit=1,
    concurrency_key=lambda tag: tag,
    unique_lease=2,
)
def concurrent_short_lease(tag: str) -> None:
    with Run(tag):
        time.sleep(60)


# -- one queued + one running ------------------------------------------------------------------


@app.task(
    base=UniqueTask,
    bind=True,
    name="t.queued_and_running",
    unique_until="started",
    unique_while_running=True,
    unique_on=["key"],
    max_retries=0,
)
def queued_and_running(self: UniqueTask, key: str, tag: str, seconds: float = 0.8) -> int:
    with Run(tag):
        store().rpush(f"spans:{tag}", f"start {redis_now_us()}")
        time.sleep(seconds)
        store().rpush(f"spans:{tag}", f"end {redis_now_us()}")
        store().expire(f"spans:{tag}", 600)
    return int(self.request.retries)


def spans(tag: str) -> list[tuple[str, int]]:
    """The ``(start|end, Redis µs)`` marks ``queued_and_running`` left, in order."""
    marks = []
    for entry in store().lrange(f"spans:{tag}", 0, -1):
        kind, at = (entry.decode() if isinstance(entry, bytes) else str(entry)).split()
        marks.append((kind, int(at)))
    return marks


# -- replace (debounce) ---------------------------------------------------------------------------


@app.task(base=UniqueTask, name="t.debounced", on_duplicate="replace", unique_on=["key"])
def debounced(key: str, value: int, tag: str, seconds: float = 0.0) -> int:
    with Run(tag):
        store().rpush(f"values:{tag}", value)
        store().expire(f"values:{tag}", 600)
        time.sleep(seconds)
    return value


def values(tag: str) -> list[int]:
    return [int(v) for v in store().lrange(f"values:{tag}", 0, -1)]


@app.task(base=UniqueTask, name="t.loses_its_lock", unique_lease=1)
def loses_its_lock(tag: str) -> None:
    with Run(tag):
        time.sleep(2.5)


# -- redelivered while running (the fault suite) ----------------------------------------------


@app.task(base=UniqueTask, name="t.redelivered", unique_lease=2)
def redelivered(tag: str) -> str:
    """Runs until the test says ``go`` (:func:`let_go`), at most 60 s."""
    with Run(tag):
        ends = time.monotonic() + 60
        while not store().exists(f"go:{tag}") and time.monotonic() < ends:
            time.sleep(0.02)
    return tag


def let_go(tag: str) -> None:
    store().set(f"go:{tag}", 1, ex=600)


_deferring = threading.local()  # the run this thread is deferring (task_deferred said so)


@unique_signals.task_deferred.connect(weak=False, dispatch_uid="tests.deferring")
def _note_deferral(sender: Any = None, task_id: str | None = None, **_: Any) -> None:
    _deferring.task_id = task_id


@signals.task_postrun.connect(weak=False, dispatch_uid="tests.settled")
def _count_endings(
    sender: Any = None, task_id: str | None = None, args: Any = None, **_: Any
) -> None:
    # Every delivery of t.redelivered ends here once: deferred (it comes back) or for good.
    deferring, _deferring.task_id = getattr(_deferring, "task_id", None), None
    if getattr(sender, "name", None) == "t.redelivered":
        counter = f"{'deferred' if deferring == task_id else 'settled'}:{args[0]}"
        store().incr(counter)
        store().expire(counter, 600)


def settled(tag: str) -> int:
    """How many deliveries of ``redelivered(tag)`` have ended for good (not deferred)."""
    return int(store().get(f"settled:{tag}") or 0)


def deferred(tag: str) -> int:
    """How many deliveries of ``redelivered(tag)`` were deferred."""
    return int(store().get(f"deferred:{tag}") or 0)


# -- canvas ---------------------------------------------------------------------------------------


@app.task(name="t.collect")
def collect(results: list[Any]) -> list[Any]:
    """A chord body: what the header gave it."""
    return results


@app.task(name="t.called_back")
def called_back(result: Any, tag: str) -> None:
    """A link callback: counts its calls and keeps what it was given."""
    store().rpush(f"called:{tag}", json.dumps(result))
    store().expire(f"called:{tag}", 600)


def calls(tag: str) -> list[Any]:
    """What ``called_back(..., tag)`` was called with, in order."""
    return [json.loads(item) for item in store().lrange(f"called:{tag}", 0, -1)]


@app.task(base=UniqueTask, name="t.by_name_slow", unique_on=[])
def by_name_slow(*results: Any, tag: str = "", seconds: float = 0.5) -> str:
    """One instance at a time, whatever its arguments (so a chord's body can be a duplicate)."""
    with Run(tag):
        time.sleep(seconds)
    return tag


# -- beat (test_beat.py) ------------------------------------------------------------------------


def beat_setting(tag: str, queue: str, seconds: float) -> str:
    """The ``CELERY_UNIQUE_TEST_BEAT`` value of a beat that fires ``slow(tag, seconds)`` every
    second, to ``queue``."""
    return json.dumps({"tag": tag, "queue": queue, "seconds": seconds})


def beat_fired(tag: str) -> tuple[int, int]:
    """What the firings of that beat did: how many published a message, how many were
    answered as duplicates (counted in the beat process)."""
    published, duplicates = store().mget([f"beat-published:{tag}", f"beat-duplicates:{tag}"])
    return int(published or 0), int(duplicates or 0)


if os.environ.get("CELERY_UNIQUE_TEST_BEAT"):
    _beat = json.loads(os.environ["CELERY_UNIQUE_TEST_BEAT"])
    app.conf.beat_schedule = {
        "unique-every-second": {
            "task": "t.slow",
            "schedule": 1.0,
            "args": (_beat["tag"], _beat["seconds"]),
            "options": {"queue": _beat["queue"]},
        }
    }

    def _beat_count(what: str) -> None:
        counter = f"beat-{what}:{_beat['tag']}"
        store().incr(counter)
        store().expire(counter, 600)

    # This process fires nothing else: every publish or duplicate of t.slow is the schedule's.
    @signals.after_task_publish.connect(weak=False, dispatch_uid="tests.beat.published")
    def _beat_published(sender: Any = None, **_: Any) -> None:
        if sender == "t.slow":
            _beat_count("published")

    @unique_signals.task_duplicate.connect(weak=False, dispatch_uid="tests.beat.duplicate")
    def _beat_duplicate(sender: Any = None, **_: Any) -> None:
        if getattr(sender, "name", None) == "t.slow":
            _beat_count("duplicates")
