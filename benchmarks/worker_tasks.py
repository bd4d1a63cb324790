"""The tasks of the worker benchmark (``benchmarks/worker.py``): one per variant, same body.

Imported by the benchmark (the producer) and by ``celery -A benchmarks.worker_tasks worker``,
which learns the Redis URL from :data:`URL_ENV`. Broker, result backend and every lock store
(ours, celery-singleton's, celery-once's) are that one Redis. A peer that does not import is
left out, and :data:`SKIPPED` says why.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable
from typing import Any

from celery import Celery

from celery_unique import RateLimitedTask, UniqueTask

URL_ENV = "CELERY_UNIQUE_BENCH_URL"
QUEUE = "bench-worker"  # its own queue: with --url the Redis may be shared
TTL = 3600  # seconds every unique lock is taken for; each is freed when its run ends

PLAIN = "plain @app.task"
UNIQUE = "UniqueTask"
RATE = "RateLimitedTask global_rate_limit"
CONCURRENCY = "RateLimitedTask concurrency_limit"
SINGLETON = "celery-singleton Singleton"
ONCE = "celery-once QueueOnce"

app = Celery("celery_unique_bench_worker", set_as_current=False)
app.conf.update(
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=False,
    task_default_queue=QUEUE,
    result_expires=600,
    unique_key_prefix="bench-w:",
    unique_ttl=TTL,
    singleton_key_prefix="bench-w-singleton:",
    singleton_lock_expiry=TTL,
)


def configure(url: str) -> None:
    """Point broker, results and lock stores at ``url``."""
    once = {"url": url, "default_timeout": TTL}
    app.conf.update(
        broker_url=url,
        result_backend=url,
        ONCE={"backend": "celery_once.backends.Redis", "settings": once},
    )


if os.environ.get(URL_ENV):
    configure(os.environ[URL_ENV])


def job(n: int) -> int:
    """The body of every variant: as little as a task can do."""
    return n


def _register(name: str, **options: Any) -> str:
    full = f"bench.worker.{name}"
    app.task(name=full, **options)(job)
    return full


def task(label: str) -> Any:
    """The task of variant ``label`` itself (``@app.task`` hands out a lazy proxy)."""
    app.finalize(auto=True)
    return app.tasks[TASKS[label]]


#: Variant label -> task name, in the order the tables list them.
TASKS: dict[str, str] = {
    PLAIN: _register("plain"),
    UNIQUE: _register("unique", base=UniqueTask),
    # Far above anything one worker reaches: every run is admitted at once.
    RATE: _register("rate", base=RateLimitedTask, global_rate_limit="100000/s"),
    # Above the worker's concurrency (2): every run gets a slot at once.
    CONCURRENCY: _register("concurrency", base=RateLimitedTask, concurrency_limit=8),
}
#: Peer label -> why it is not measured.
SKIPPED: dict[str, str] = {}
#: Peer distribution -> the label of its variant.
PEERS = {"celery-singleton": SINGLETON, "celery-once": ONCE}


def _peer(label: str, module: str, base: Callable[[Any], Any], name: str) -> None:
    try:
        found = importlib.import_module(module)
    except ImportError as exc:
        SKIPPED[label] = f"not installed: `import {module}` failed ({exc})"
    else:
        TASKS[label] = _register(name, base=base(found))


_peer(SINGLETON, "celery_singleton", lambda m: m.Singleton, "singleton")
_peer(ONCE, "celery_once", lambda m: m.QueueOnce, "once")
