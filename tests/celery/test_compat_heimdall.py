"""celery_unique.compat.heimdall: celery-heimdall's README and the way its own test suite uses
its API (through the two-line shim), run through a real worker; plus each option's edges."""

from __future__ import annotations

import asyncio
import pickle
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
import redis
from celery.result import AsyncResult

import celery_unique
from celery_unique import ConfigurationError
from celery_unique.compat.heimdall import AlreadyQueuedError, HeimdallTask, RateLimit
from celery_unique.compat.heimdall.task import release_lock, unique_key_for_task
from tests.celery import app as t
from tests.celery import compat_tasks as c
from tests.celery.conftest import MakeApp, run_with_shim
from tests.celery.observe import admissions, assert_within_the_limit, deferrals, span
from tests.conftest import lock_key as shared_lock_key
from tests.conftest import lock_owner
from tests.helpers import wait_until

pytestmark = pytest.mark.usefixtures("worker")


def customer() -> int:
    return uuid.uuid4().int % 10**9 + 100  # never 10: that customer has its own limit


def start_times(tag: str) -> list[float]:
    return sorted(int(x) / 1e6 for x in t.store().lrange(f"times:{tag}", 0, -1))


def lock_key(task: HeimdallTask, *args: Any) -> str:
    return shared_lock_key("cut:", task.unique_key(args))


# -- the README, example by example ------------------------------------------------------------


def test_a_unique_task_runs_once_per_arguments() -> None:
    cid = customer()
    first = c.generate_report.delay(cid)
    assert c.generate_report.delay(cid) == first
    other = c.generate_report.delay(cid + 1)
    assert other != first
    first.get(timeout=10)
    other.get(timeout=10)
    assert t.runs(f"h.generate_report:{cid}") == 1
    assert c.generate_report.delay(cid) != first  # freed when the run ended


def test_unique_timeout_bounds_the_lock_even_while_the_task_runs(client: redis.Redis) -> None:
    cid = customer()
    first = c.generate_report_timeout.delay(cid)
    assert 1000 < client.pttl(lock_key(c.generate_report_timeout, cid)) <= 1500
    assert c.generate_report_timeout.delay(cid) == first
    time.sleep(1.8)  # the run (2.5 s) goes on, its 1.5 s are over
    second = c.generate_report_timeout.delay(cid)
    assert second != first
    first.get(timeout=10)
    second.get(timeout=10)
    assert t.runs(f"h.generate_report_timeout:{cid}") == 2


def test_the_default_unique_timeout_is_an_hour(client: redis.Redis) -> None:
    cid = customer()
    queued = c.generate_report.apply_async((cid,), queue=f"nowhere-{cid}")
    assert 3590_000 < client.pttl(lock_key(c.generate_report, cid)) <= 3600_000
    release_lock(c.generate_report, c.generate_report.unique_key((cid,)))
    queued.forget()


def test_a_key_function_makes_one_report_at_a_time_for_all_customers() -> None:
    first = c.generate_report_one_at_a_time.delay(customer())
    assert c.generate_report_one_at_a_time.delay(customer()) == first
    first.get(timeout=10)


def test_my_api_call_returns_the_same_task_id_until_the_report_is_done() -> None:
    cid = customer()
    ids = {c.my_api_call(cid)["task_id"] for _ in range(5)}
    assert len(ids) == 1
    AsyncResult(ids.pop()).get(timeout=10)
    assert t.runs(f"h.generate_report:{cid}") == 1


def test_unique_raises_names_the_likely_culprit_and_when_it_expires() -> None:
    cid = customer()
    started = c.my_raising_api_call(cid)
    assert started["status"] == "STARTED"
    assert c.my_raising_api_call(cid) == {
        "status": "ALREADY_RUNNING",
        "task_id": started["task_id"],
    }
    with pytest.raises(AlreadyQueuedError) as raised:
        c.generate_report_raises.delay(cid)
    error = raised.value
    assert error.likely_culprit == started["task_id"]
    assert isinstance(error.expires_in, int) and 0 < error.expires_in <= 60 * 60
    assert started["task_id"] in repr(error)
    assert isinstance(error, celery_unique.DuplicateTaskError)
    assert error.task_id == started["task_id"]
    again = pickle.loads(pickle.dumps(error))
    assert (type(again), again.likely_culprit, again.expires_in) == (
        AlreadyQueuedError,
        error.likely_culprit,
        error.expires_in,
    )
    AsyncResult(started["task_id"]).get(timeout=10)


def test_unique_wait_for_expiry_keeps_the_lock_after_the_run_until_the_timeout() -> None:
    cid = customer()
    first = c.generate_report_wait_for_expiry.delay(cid)
    first.get(timeout=10)
    assert c.generate_report_wait_for_expiry.delay(cid) == first  # done, but still locked
    wait_until(lambda: c.generate_report_wait_for_expiry.delay(cid) != first, timeout=5)
    wait_until(lambda: t.runs(f"h.generate_report_wait_for_expiry:{cid}") == 2)


def test_a_rate_limit_holds_across_the_fleet_and_every_task_succeeds() -> None:
    tag = uuid.uuid4().hex
    with admissions(c.download_report_from_amazon.name, tag) as admitted:
        results = [c.download_report_from_amazon.delay(tag) for _ in range(6)]
        for result in results:
            result.get(timeout=30)  # max_retries=0: deferrals do not use retries up
    assert len(start_times(tag)) == len(admitted) == 6
    assert_within_the_limit(admitted, burst=2, rate=1.0)  # RateLimit((2, 2))
    assert span(admitted) >= 3.5  # 2 at once, then one a second


def test_a_dynamic_rate_limit_per_customer_key() -> None:
    tag = uuid.uuid4().hex
    task = c.download_report_per_customer
    with admissions(task.name, 10, tag) as admitted, deferrals(task.name, 11, tag) as deferred:
        slow = [task.delay(10, tag) for _ in range(3)]
        fast = [task.delay(11, tag) for _ in range(3)]
        for result in slow + fast:
            result.get(timeout=30)
    assert len(start_times(f"{tag}:10")) == len(start_times(f"{tag}:11")) == 3
    assert_within_the_limit(admitted, burst=1, rate=1.0)  # (1, 1) for customer 10
    assert span(admitted) >= 1.8
    assert not deferred  # (3, 1) for customer 11: all three at once


def test_a_unique_rate_limited_task_keeps_its_lock_and_retries_while_deferred() -> None:
    tag = uuid.uuid4().hex
    with admissions(c.unique_and_limited.name, tag) as admitted:
        results = [c.unique_and_limited.delay(tag, i) for i in range(3)]
        assert c.unique_and_limited.delay(tag, 2) == results[2]  # deferred: still one instance
        assert [r.get(timeout=30) for r in results] == [0, 0, 0]  # no retry used
    assert len(start_times(tag)) == len(admitted) == 3
    assert_within_the_limit(admitted, burst=1, rate=1.0)
    assert span(admitted) >= 1.8


def test_only_after_runs_a_block_at_most_once_per_period() -> None:
    key = f"only-after-{uuid.uuid4().hex}"
    assert c.task_with_block.delay(key).get(timeout=10) is True
    assert c.task_with_block.delay(key).get(timeout=10) is False
    time.sleep(1.6)
    assert c.task_with_block.delay(key).get(timeout=10) is True


# -- celery-heimdall's own tests, as written against its API (through the shim) --------------


def test_default_unique() -> None:
    task1 = c.default_unique_task.apply_async()
    result = c.default_unique_task.apply_async()
    assert result.id == task1.id
    task1.get(timeout=10)
    c.default_unique_task.apply_async().get(timeout=10)


def test_raises_unique() -> None:
    task1 = c.unique_raises_task.apply_async()
    with pytest.raises(AlreadyQueuedError) as exc_info:
        c.unique_raises_task.apply_async()
    assert exc_info.value.likely_culprit == task1.id
    expires_in = exc_info.value.expires_in
    assert expires_in is not None and 0 < expires_in <= 60 * 60
    assert task1.id in repr(exc_info.value)
    task1.get(timeout=10)


def test_unique_explicit_key() -> None:
    task1 = c.explicit_key_task.apply_async()
    assert c.explicit_key_task.apply_async().id == task1.id
    task1.get(timeout=10)
    c.explicit_key_task.apply_async().get(timeout=10)
    task1 = c.explicit_key_task_str.apply_async()
    assert c.explicit_key_task_str.apply_async().id == task1.id
    task1.get(timeout=10)


def test_different_keys() -> None:
    one = c.default_unique_task.delay("Task1")
    two = c.default_unique_task.delay("Task2")
    assert one.id != two.id
    one.get(timeout=10)
    two.get(timeout=10)


def test_task_with_override_config() -> None:
    task1 = c.task_with_override_config.apply_async()
    assert c.task_with_override_config.apply_async().id == task1.id
    assert task1.get(timeout=10) == "new-prefix:"


def test_send_task_is_unique_at_run_time() -> None:
    task = t.app.tasks["wait_for_task"]
    release_lock(task, unique_key_for_task(task, (), {}, prefix=task.heimdall_config.lock_prefix))
    task1 = t.app.send_task("wait_for_task")  # around apply_async, as beat does
    assert task1.get(timeout=10) == task1.id  # and it holds its lock for unique_timeout
    task2 = t.app.send_task("wait_for_task")
    assert task2.get(timeout=10) is None  # another holds the key: no run, no hang
    release_lock(task, unique_key_for_task(task, (), {}, prefix=task.heimdall_config.lock_prefix))


@pytest.mark.parametrize(
    "name", ["default_rate_limit_task", "tuple_rate_limit_task", "callable_rate_limit_task"]
)
def test_default_rate_limit(name: str) -> None:
    func = getattr(c, name)
    tag = uuid.uuid4().hex
    with admissions(func.name, tag) as admitted, deferrals(func.name, tag) as deferred:
        results = [func.apply_async((tag,)) for _ in range(6)]
        for result in results:
            result.get(timeout=30)
    assert len(start_times(tag)) == len(admitted) == 6
    assert sum(r.id not in deferred for r in results) >= 2  # two at once: never deferred
    assert_within_the_limit(admitted, burst=2, rate=1.0)  # 2 per 2 s


# -- edges -------------------------------------------------------------------------------------


def test_without_unique_nothing_is_locked(make_app: MakeApp, redis_url: str) -> None:
    app = make_app(broker_url=redis_url, result_backend=redis_url)

    @app.task(base=HeimdallTask, shared=False)
    def plain() -> None: ...

    nowhere = f"nowhere-{uuid.uuid4().hex}"
    assert plain.apply_async(queue=nowhere) != plain.apply_async(queue=nowhere)

    async def twice() -> set[str]:
        return {(await plain.aapply_async(queue=nowhere)).id for _ in range(2)}

    assert len(asyncio.run(twice())) == 2


def test_app_settings_and_a_custom_redis(make_app: MakeApp, redis_url: str) -> None:
    other_db = redis_url.rsplit("/", 1)[0] + "/4"
    clients: list[redis.Redis] = []

    class OwnRedis(HeimdallTask):
        def setup_redis(self) -> redis.Redis:
            client = redis.Redis.from_url(other_db, decode_responses=True)
            clients.append(client)
            return client

    app = make_app(
        broker_url=redis_url,
        heimdall_unique_raises=True,
        heimdall_lock_prefix="app-prefix:",
        heimdall_unique_timeout=90,
    )

    @app.task(base=OwnRedis, heimdall={"unique": True}, shared=False)
    def job(x: int) -> None: ...

    nowhere = f"nowhere-{uuid.uuid4().hex}"
    try:
        first = job.apply_async((1,), queue=nowhere)
        with pytest.raises(AlreadyQueuedError):
            job.apply_async((1,), queue=nowhere)
        name = job.unique_key((1,))
        assert name.startswith("app-prefix:")
        assert lock_owner(clients[0], "cu:", name) == first.id
        assert 85_000 < clients[0].pttl(shared_lock_key("cu:", name)) <= 90_000
        assert job.heimdall_redis is clients[0]
        release_lock(job, name)
        assert clients[0].exists(shared_lock_key("cu:", name)) == 0
    finally:
        for client in clients:
            client.close()


def test_bad_options_are_clear_errors(make_app: MakeApp, redis_url: str) -> None:
    app = make_app(broker_url=redis_url)
    nowhere = f"nowhere-{uuid.uuid4().hex}"

    @app.task(base=HeimdallTask, heimdall={"unique": True, "unique_timeout": -5}, shared=False)
    def bad_timeout() -> None: ...

    @app.task(base=HeimdallTask, heimdall={"unique": True, "key": lambda a, k: 42}, shared=False)
    def bad_key() -> None: ...

    @app.task(base=HeimdallTask, heimdall={"rate_limit": (2, 60)}, shared=False)
    def bare_tuple() -> None: ...

    @app.task(base=HeimdallTask, heimdall={"rate_limit": RateLimit((0, 60))}, shared=False)
    def zero_times() -> None: ...

    not_a_pair: Any = lambda: 5  # noqa: E731  (a wrong return, on purpose)

    @app.task(base=HeimdallTask, heimdall={"rate_limit": RateLimit(not_a_pair)}, shared=False)
    def bad_callable() -> None: ...

    @app.task(base=HeimdallTask, heimdall={"uniqe": True}, shared=False)
    def misspelt() -> None: ...

    @app.task(base=HeimdallTask, heimdall={"times": 2}, shared=False)
    def times_alone() -> None: ...

    with pytest.raises(ConfigurationError, match="uniqe"):
        misspelt.apply_async(queue=nowhere)
    with pytest.raises(ConfigurationError, match="'per'"):
        _ = times_alone.rate_config
    with pytest.raises(ConfigurationError, match="unique_timeout"):
        bad_timeout.apply_async(queue=nowhere)
    with pytest.raises(ConfigurationError, match="key"):
        bad_key.apply_async(queue=nowhere)
    with pytest.raises(ConfigurationError, match="RateLimit"):
        _ = bare_tuple.rate_config
    with pytest.raises(ConfigurationError):
        _ = zero_times.rate_config
    with pytest.raises(ConfigurationError, match="times, per"):
        bad_callable.rate_config.limits((), {})


def test_the_shim_serves_old_imports_as_the_same_objects(tmp_path: Path) -> None:
    code = """
import celery_heimdall
from celery_heimdall import HeimdallTask, AlreadyQueuedError, RateLimit, Strategy
from celery_heimdall.task import release_lock, unique_key_for_task, HeimdallTask as T2
from celery_heimdall.errors import AlreadyQueuedError as E2
from celery_heimdall.config import Config
import celery_unique.compat.heimdall as compat
assert HeimdallTask is T2 is compat.HeimdallTask and AlreadyQueuedError is E2
assert release_lock is compat.task.release_lock and Config is compat.config.Config
print("ok")
"""
    assert run_with_shim(tmp_path, "celery_heimdall", "heimdall", code) == "ok"
