"""The Celery app of the RabbitMQ tests: built by the tests (to publish) and, from the
environment, by ``celery -A tests.celery.rabbit_app worker`` in a subprocess (a worker of its
own: two in-process workers on different brokers do not share one process well).

Tasks note in Redis what ran (``runs:<tag>``, ``peak:<tag>``, ``ran:<tag>``), and the worker
notes each deferral's countdown (``deferred:<tag>``), the tag being a task's first argument.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any

import redis
from celery import Celery

from celery_unique import RateLimitedTask, UniqueTask
from celery_unique import signals as unique_signals
from celery_unique.core.messages import SLOT_HEADER

#: Where the worker subprocess learns its broker, Redis, queue type and queue name.
ENV = {
    "broker": "CELERY_UNIQUE_TEST_RABBITMQ_URL",
    "redis": "CELERY_UNIQUE_TEST_REDIS_URL",
    "queue_type": "CELERY_UNIQUE_TEST_QUEUE_TYPE",
    "queue": "CELERY_UNIQUE_TEST_QUEUE",
}

# Counts a run of a tag and the most of its runs at once (KEYS: running, runs, peak).
_ENTER = """
local now = redis.call('INCR', KEYS[1])
redis.call('INCR', KEYS[2])
if now > tonumber(redis.call('GET', KEYS[3]) or '0') then redis.call('SET', KEYS[3], now) end
for i = 1, 3 do redis.call('EXPIRE', KEYS[i], 600) end
return now
"""


@dataclass
class Rabbit:
    """An app on the broker, its tasks, and the Redis where they note what ran."""

    queue_type: str
    app: Celery
    store: redis.Redis
    ping: Any
    slow: Any
    limited: Any
    one_at_a_time: Any
    while_running: Any

    def runs(self, tag: str) -> int:
        return int(self.store.get(f"runs:{tag}") or 0)

    def peak(self, tag: str) -> int:
        return int(self.store.get(f"peak:{tag}") or 0)

    def deferred(self, tag: str) -> list[float]:
        """The countdowns of the deferrals of the instances called with ``tag``."""
        return [float(x) for x in self.store.lrange(f"deferred:{tag}", 0, -1)]

    def ran(self, tag: str) -> list[tuple[float, float | None]]:
        """When each run of ``tag`` ran and the slot it was booked for (``None``: at once)."""
        lines = self.store.lrange(f"ran:{tag}", 0, -1)
        pairs = [(x.decode() if isinstance(x, bytes) else x).split() for x in lines]
        return [(float(at), None if slot == "None" else float(slot)) for at, slot in pairs]


def make_app(broker: str, redis_url: str, queue_type: str, queue: str) -> Rabbit:
    app = Celery(f"rabbit-{queue}", set_as_current=False)
    app.conf.update(
        broker_url=broker,
        result_backend=redis_url,
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
        result_expires=600,
        task_default_queue=queue,
        unique_key_prefix=f"cu-{queue}:",
    )
    if queue_type == "quorum":
        # As Celery documents native delayed delivery: quorum queues on a topic exchange.
        app.conf.update(
            task_default_queue_type="quorum",
            task_default_exchange_type="topic",
            worker_detect_quorum_queues=True,
        )
    store = redis.Redis.from_url(redis_url)

    def run(tag: str, seconds: float) -> None:
        store.eval(_ENTER, 3, f"running:{tag}", f"runs:{tag}", f"peak:{tag}")
        try:
            time.sleep(seconds)
        finally:
            store.decr(f"running:{tag}")

    @app.task(name="r.ping", shared=False)
    def ping() -> str:
        return "pong"

    @app.task(base=UniqueTask, name="r.slow", shared=False)
    def slow(tag: str) -> str:
        run(tag, 0.2)
        return tag

    @app.task(
        base=RateLimitedTask, name="r.limited", global_rate_limit="2/s", bind=True, shared=False
    )
    def limited(self: RateLimitedTask, tag: str, i: int) -> int:
        # When it ran and the slot it was booked for, by the worker's clock.
        slot_at = getattr(self.request, SLOT_HEADER, None)
        store.rpush(f"ran:{tag}", f"{time.time()!r} {slot_at!r}")
        store.expire(f"ran:{tag}", 600)
        run(tag, 0)
        return i

    @app.task(base=RateLimitedTask, name="r.one_at_a_time", concurrency_limit=1, shared=False)
    def one_at_a_time(tag: str, i: int) -> int:
        run(tag, 0.3)
        return i

    @app.task(
        base=UniqueTask,
        name="r.while_running",
        unique_until="started",
        unique_while_running=True,
        shared=False,
    )
    def while_running(tag: str) -> None:
        run(tag, 1.5)

    return Rabbit(queue_type, app, store, ping, slow, limited, one_at_a_time, while_running)


def _note_deferral(sender: Any = None, countdown: float = 0.0, **_: Any) -> None:
    args = sender.request.args or ()  # sent in the deferred run's own thread
    if args and rabbit is not None:
        rabbit.store.rpush(f"deferred:{args[0]}", repr(countdown))
        rabbit.store.expire(f"deferred:{args[0]}", 600)


rabbit: Rabbit | None = None
if all(os.environ.get(name) for name in ENV.values()):  # the worker subprocess
    rabbit = make_app(*(os.environ[name] for name in ENV.values()))
    app = rabbit.app
    unique_signals.task_deferred.connect(_note_deferral, weak=False)
