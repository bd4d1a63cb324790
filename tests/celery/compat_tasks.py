"""Tasks for the migration layers, registered on the test app (imported by ``app.py``).

The first part follows the README examples of celery-singleton and celery-heimdall, through
``celery_unique.compat``; times are scaled down (a 4 s sleep becomes 1 s) and tasks record
their runs, but the calls are the READMEs'. The second part is written the way
celery-heimdall's own test suite is, importing ``celery_heimdall`` through the two-line shim
(``install_as``) as a migrated project would.
"""

from __future__ import annotations

import time
from typing import Any

import celery

from celery_unique.compat.heimdall import AlreadyQueuedError, HeimdallTask, RateLimit
from celery_unique.compat.singleton import Singleton
from tests.celery.app import Run, app, redis_now_us, store


def record(tag: str) -> None:
    """Note when a run started (Redis time, µs), to check a rate limit in every window."""
    store().rpush(f"times:{tag}", redis_now_us())
    store().expire(f"times:{tag}", 600)


# -- celery-singleton's README ---------------------------------------------------------------


@app.task(base=Singleton, name="s.do_stuff")
def do_stuff(*args: Any, **kwargs: Any) -> str:
    time.sleep(1)
    return "I just woke up"


@app.task(base=Singleton, name="s.do_something", unique_on=["username"])
def do_something(username: str, otherarg: Any = None) -> None:
    with Run(f"s.do_something:{username}"):
        time.sleep(1)


@app.task(base=Singleton, name="s.name_only", unique_on=[])
def name_only(tag: str) -> None:
    time.sleep(0.5)


@app.task(base=Singleton, name="s.do_something_raise", raise_on_duplicate=True)
def do_something_raise(username: str) -> None:
    time.sleep(1)


@app.task(base=Singleton, name="s.runs_longer_than_expiry", lock_expiry=1.5)
def runs_longer_than_expiry(tag: str) -> None:
    with Run(tag):
        time.sleep(2.5)


@app.task(base=Singleton, bind=True, name="s.retrying", max_retries=3)
def singleton_retrying(self: Singleton, tag: str) -> int:
    with Run(tag):
        if self.request.retries < 2:
            raise self.retry(countdown=0.3)
    return int(self.request.retries)


# -- celery-heimdall's README ----------------------------------------------------------------


@celery.shared_task(base=HeimdallTask, name="h.generate_report", heimdall={"unique": True})
def generate_report(customer_id: int) -> None:
    with Run(f"h.generate_report:{customer_id}"):
        time.sleep(1)


@celery.shared_task(
    base=HeimdallTask,
    name="h.generate_report_timeout",
    heimdall={"unique": True, "unique_timeout": 1.5},
)
def generate_report_timeout(customer_id: int) -> None:
    with Run(f"h.generate_report_timeout:{customer_id}"):
        time.sleep(2.5)


@celery.shared_task(
    base=HeimdallTask,
    name="h.generate_report_one_at_a_time",
    heimdall={"unique": True, "key": lambda args, kwargs: "generate_report"},
)
def generate_report_one_at_a_time(customer_id: int) -> None:
    time.sleep(1)


def my_api_call(customer_id: int) -> dict[str, Any]:
    return {"status": "RUNNING", "task_id": generate_report.delay(customer_id).id}


@celery.shared_task(
    base=HeimdallTask,
    name="h.generate_report_raises",
    heimdall={"unique": True, "unique_raises": True},
)
def generate_report_raises(customer_id: int) -> None:
    time.sleep(1)


def my_raising_api_call(customer_id: int) -> dict[str, Any]:
    try:
        task = generate_report_raises.delay(customer_id)
        return {"status": "STARTED", "task_id": task.id}
    except AlreadyQueuedError as exc:
        return {"status": "ALREADY_RUNNING", "task_id": exc.likely_culprit}


@celery.shared_task(
    base=HeimdallTask,
    name="h.generate_report_wait_for_expiry",
    heimdall={"unique": True, "unique_timeout": 2, "unique_wait_for_expiry": True},
)
def generate_report_wait_for_expiry(customer_id: int) -> None:
    with Run(f"h.generate_report_wait_for_expiry:{customer_id}"):
        pass


@celery.shared_task(
    base=HeimdallTask,
    name="h.download_report_from_amazon",
    heimdall={"rate_limit": RateLimit((2, 2))},
    max_retries=0,
)
def download_report_from_amazon(tag: str) -> None:
    record(tag)


@celery.shared_task(
    base=HeimdallTask,
    name="h.download_report_per_customer",
    heimdall={
        # Customer 10 gets the lower limit, everyone else the higher one.
        "rate_limit": RateLimit(lambda args: (1, 1) if args[0] == 10 else (3, 1)),
        "key": lambda args, kwargs: f"customer_{args[0]}:{args[1]}",
    },
)
def download_report_per_customer(customer_id: int, tag: str) -> None:
    record(f"{tag}:{customer_id}")


@celery.shared_task(
    base=HeimdallTask,
    bind=True,
    name="h.unique_and_limited",
    heimdall={"unique": True, "rate_limit": RateLimit((1, 1))},
    max_retries=0,
)
def unique_and_limited(self: HeimdallTask, tag: str, i: int) -> int:
    record(tag)
    return int(self.request.retries)


@celery.shared_task(base=HeimdallTask, bind=True, name="h.with_block")
def task_with_block(self: HeimdallTask, key: str) -> bool:
    return bool(self.only_after(key, 1.5))


# -- written as celery-heimdall's own tests are, through the shim ---------------------------

from celery_unique.compat.heimdall import install_as  # noqa: E402

install_as("celery_heimdall")  # what the two-line celery_heimdall.py shim does

from celery_heimdall import HeimdallTask as ShimTask  # noqa: E402
from celery_heimdall import RateLimit as ShimRateLimit  # noqa: E402


@celery.shared_task(base=ShimTask, heimdall={"unique": True})
def default_unique_task(dummy_arg: Any = None) -> None:
    time.sleep(1)  # the duplicate is published while this runs


@celery.shared_task(
    base=ShimTask,
    heimdall={"unique": True, "unique_wait_for_expiry": True},
    name="wait_for_task",
    bind=True,
)
def wait_for_task(self: Any, dummy_arg: Any = None) -> str:
    return str(self.request.id)


@celery.shared_task(base=ShimTask, heimdall={"unique": True, "unique_raises": True})
def unique_raises_task() -> None:
    time.sleep(0.5)


@celery.shared_task(base=ShimTask, heimdall={"unique": True, "key": lambda _, __: "MyTaskKey"})
def explicit_key_task() -> None:
    time.sleep(0.3)


@celery.shared_task(base=ShimTask, heimdall={"unique": True, "key": "MyTaskKeyStr"})
def explicit_key_task_str() -> None:
    time.sleep(0.3)


@celery.shared_task(
    base=ShimTask, bind=True, heimdall={"unique": True, "lock_prefix": "new-prefix:"}
)
def task_with_override_config(task: Any) -> str:
    time.sleep(0.5)  # the duplicate is published while this runs
    return str(task.heimdall_config.lock_prefix)


@celery.shared_task(base=ShimTask, heimdall={"times": 2, "per": 2})
def default_rate_limit_task(tag: str) -> None:
    record(tag)


@celery.shared_task(base=ShimTask, heimdall={"rate_limit": ShimRateLimit((2, 2))})
def tuple_rate_limit_task(tag: str) -> None:
    record(tag)


@celery.shared_task(base=ShimTask, heimdall={"rate_limit": ShimRateLimit(lambda key: (2, 2))})
def callable_rate_limit_task(tag: str) -> None:
    record(tag)


# -- settings every layer honours ----------------------------------------------------------------


@app.task(base=Singleton, name="s.short_lease", unique_lease=2)
def singleton_short_lease(tag: str) -> None:
    with Run(tag):
        time.sleep(1.5)
