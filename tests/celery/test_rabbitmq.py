"""Unique and rate-limited tasks through a real worker on a RabbitMQ broker (results and locks
on the test Redis), with classic queues and with quorum queues, where Celery sends a
countdown through RabbitMQ's native delayed delivery (whole seconds only).

Skipped without Debian's ``rabbitmq-server`` (``nox -s rabbitmq`` installs it);
``CELERY_UNIQUE_REQUIRE_RABBITMQ=1`` makes its absence an error.
"""

from __future__ import annotations

import gc
import os
import time
import uuid
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import redis
from celery import Celery
from celery.contrib.testing.worker import start_worker

from celery_unique import RateLimitedTask, UniqueTask
from celery_unique.celery.settings import backends
from celery_unique.testing import find_rabbitmq_server, running_rabbitmq

pytestmark = pytest.mark.rabbitmq

#: Set to 1 (as ``nox -s rabbitmq`` does) to make a missing rabbitmq-server an error.
REQUIRE = "CELERY_UNIQUE_REQUIRE_RABBITMQ"


@pytest.fixture(scope="module")
def rabbitmq_url() -> Iterator[str]:
    try:
        find_rabbitmq_server()
    except FileNotFoundError as exc:
        if os.environ.get(REQUIRE) == "1":
            pytest.fail(f"{REQUIRE}=1 and {exc}")
        pytest.skip(f"no RabbitMQ broker to run on: {exc}")
    with running_rabbitmq() as url:
        yield url


@dataclass
class Rabbit:
    """An app on the broker, its tasks, and the Redis where they note what ran."""

    queue_type: str
    app: Celery
    store: redis.Redis
    slow: Any
    limited: Any

    def runs(self, tag: str) -> int:
        return int(self.store.get(f"runs:{tag}") or 0)


def make_app(broker: str, redis_url: str, queue_type: str) -> Rabbit:
    queue = f"{queue_type}-{uuid.uuid4().hex[:8]}"
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

    @app.task(base=UniqueTask, name="r.slow", shared=False)
    def slow(tag: str) -> str:
        store.incr(f"runs:{tag}")
        store.expire(f"runs:{tag}", 600)
        time.sleep(0.2)
        return tag

    @app.task(
        base=RateLimitedTask, name="r.limited", global_rate_limit="2/s", bind=True, shared=False
    )
    def limited(self: RateLimitedTask, tag: str, i: int) -> int:
        store.incr(f"runs:{tag}")
        store.expire(f"runs:{tag}", 600)
        return i

    return Rabbit(queue_type, app, store, slow, limited)


@pytest.fixture(scope="module", params=["classic", "quorum"])
def rabbit(request: pytest.FixtureRequest, rabbitmq_url: str, redis_url: str) -> Iterator[Rabbit]:
    made = make_app(rabbitmq_url, redis_url, request.param)
    try:
        with start_worker(
            made.app,
            pool="threads",
            concurrency=4,
            perform_ping_check=False,
            shutdown_timeout=30,
        ):
            yield made
    finally:
        backends.close(made.app)
        made.store.close()
        made.app.close()
        # An AsyncResult unsubscribes from its result channel when collected: now, while
        # Redis runs (Celery's Redis result backend has no close(); see conftest.celery_app).
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ResourceWarning)
            gc.collect()


def test_a_duplicate_applied_while_queued_gets_the_holders_id_and_it_runs_once(
    rabbit: Rabbit,
) -> None:
    tag = uuid.uuid4().hex
    first = rabbit.slow.apply_async((tag,), countdown=2)  # queued for 2 s
    again = rabbit.slow.delay(tag)
    assert again.id == first.id
    assert first.get(timeout=30) == tag
    assert rabbit.runs(tag) == 1


def test_six_calls_over_a_rate_limit_of_two_per_second_all_succeed(
    rabbit: Rabbit, request: pytest.FixtureRequest
) -> None:
    if rabbit.queue_type == "quorum":
        reason = "a deferral of under a second: ValueError: countdown must be a positive number"
        request.applymarker(pytest.mark.xfail(strict=True, reason=reason))
    tag = uuid.uuid4().hex
    results = [rabbit.limited.delay(tag, i) for i in range(6)]
    for result in results:
        result.get(timeout=30, propagate=False)
    states = [r.state for r in results]
    errors = [repr(r.result) for r in results if r.state != "SUCCESS"]
    assert states == ["SUCCESS"] * 6, errors
    assert sorted(r.result for r in results) == list(range(6))
    assert rabbit.runs(tag) == 6
