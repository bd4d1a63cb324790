"""One settings resolver for UniqueTask, RateLimitedTask and both migration layers: the same
option means the same thing, and a bad value is refused, whichever class reads it."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from celery import Celery
from celery.contrib.testing.worker import start_worker

from celery_unique import ConfigurationError, RateLimitedTask, UniqueTask
from celery_unique.compat.heimdall import HeimdallTask, RateLimit
from celery_unique.compat.singleton import Singleton
from tests.celery import app as t
from tests.celery import compat_tasks as c
from tests.celery.conftest import MakeApp
from tests.conftest import lock_key, lock_owner

pytestmark = pytest.mark.usefixtures("worker")

CLASSES: list[type[UniqueTask]] = [UniqueTask, Singleton, HeimdallTask]


def unique_task(app: Celery, base: type[UniqueTask], **options: Any) -> Any:
    if base is HeimdallTask:
        options["heimdall"] = {"unique": True}

    def job(x: int) -> None: ...

    return app.task(base=base, shared=False, name=f"job-{uuid.uuid4().hex[:8]}", **options)(job)


@pytest.mark.parametrize("base", CLASSES)
def test_a_task_level_unique_lease_is_honoured_by_every_class(
    make_app: MakeApp, redis_url: str, base: type[UniqueTask]
) -> None:
    task = unique_task(make_app(broker_url=redis_url), base, unique_lease=5)
    assert task.unique_config.policy.lease == 5.0


@pytest.mark.parametrize("base", CLASSES)
def test_a_zero_lease_in_app_conf_is_refused_by_every_class(
    make_app: MakeApp, redis_url: str, base: type[UniqueTask]
) -> None:
    task = unique_task(make_app(broker_url=redis_url, unique_lease=0), base)
    with pytest.raises(ConfigurationError, match=r"app\.conf\.unique_lease must be .* > 0"):
        _ = task.unique_config


def test_a_singleton_run_holds_its_key_for_its_own_lease(client: redis.Redis) -> None:
    tag = uuid.uuid4().hex
    result = c.singleton_short_lease.delay(tag)
    name = c.singleton_short_lease.unique_key((tag,))
    deadline = time.monotonic() + 20
    while t.runs(tag) < 1:  # the run has started (it records that first)
        assert time.monotonic() < deadline, "the task never started"
        time.sleep(0.02)
    owner = lock_owner(client, "SINGLETONLOCK_", name)
    assert owner is not None and owner.startswith(result.id)  # the run holds it now
    assert 0 < client.pttl(lock_key("SINGLETONLOCK_", name)) <= 2000  # its lease, not 30 s
    result.get(timeout=20)


@pytest.fixture
def memory_app() -> Iterator[Celery]:
    """An app whose broker and result backend are not Redis (Celery's in-memory ones)."""
    app = Celery(f"memory-{uuid.uuid4().hex[:6]}", set_as_current=False)
    app.conf.update(
        broker_url="memory://",
        result_backend="cache+memory://",
        broker_connection_retry_on_startup=True,
    )
    yield app
    app.close()


def test_heimdall_with_its_own_redis_runs_on_a_broker_that_is_not_redis(
    memory_app: Celery, redis_url: str
) -> None:
    clients: list[redis.Redis] = []

    class OwnRedis(HeimdallTask):
        def setup_redis(self) -> redis.Redis:
            client = redis.Redis.from_url(redis_url)
            clients.append(client)
            return client

    prefix = f"h{uuid.uuid4().hex[:6]}:"
    memory_app.conf.unique_key_prefix = prefix

    @memory_app.task(base=OwnRedis, bind=True, heimdall={"unique": True}, shared=False)
    def unique_job(self: OwnRedis, x: int) -> str | None:
        return self.redis_backend().owner(self.unique_key((x,)))  # who holds it, mid-run

    @memory_app.task(
        base=OwnRedis, heimdall={"rate_limit": RateLimit((5, 1))}, shared=False, name="limited"
    )
    def limited_job(x: int) -> int:
        return x

    try:
        with start_worker(memory_app, pool="threads", perform_ping_check=False):
            result = unique_job.delay(1)
            holder = result.get(timeout=20)
            assert holder is not None and holder.startswith(result.id)  # held in our Redis
            assert [limited_job.delay(i).get(timeout=20) for i in range(3)] == [0, 1, 2]
        name = unique_job.unique_key((1,))
        assert lock_owner(clients[0], prefix, name) is None  # freed after the run
    finally:
        for client in clients:
            client.close()


def test_a_rate_limited_task_without_a_limit_needs_no_redis(make_app: MakeApp) -> None:
    app = make_app(broker_url="memory://")

    @app.task(base=RateLimitedTask, shared=False)
    def free(x: int) -> int:
        return x

    assert free.rate_config.limits((1,), {}) is None  # resolved without any lock store
