"""One settings resolver for UniqueTask, RateLimitedTask and both migration layers: the same
option means the same thing, and a bad value is refused, whichever class reads it."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import uuid
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import redis
from celery import Celery

from celery_unique import ConfigurationError, RateLimitedTask, UniqueTask
from celery_unique.celery import Setting
from celery_unique.compat.heimdall import HeimdallTask
from celery_unique.compat.singleton import Singleton
from celery_unique.core.lifecycle import Revoked
from celery_unique.core.messages import KEY_HEADER
from tests.celery import app as t
from tests.celery import compat_tasks as c
from tests.celery.conftest import MakeApp
from tests.conftest import lock_key, lock_owner
from tests.helpers import wait_until

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
    wait_until(lambda: t.runs(tag) >= 1)  # the run has started (it records that first)
    owner = lock_owner(client, "SINGLETONLOCK_", name)
    assert owner is not None and owner.startswith(result.id)  # the run holds it now
    assert 0 < client.pttl(lock_key("SINGLETONLOCK_", name)) <= 2000  # its lease, not 30 s
    result.get(timeout=20)


# Celery's in-memory broker lives in one process, and two in-process workers cannot run one
# after the other in one process (stopping one stops Celery's worker state for both): this
# runs in a process of its own, with its own worker.
MEMORY_APP = """
import json, sys, uuid
import redis
from celery import Celery
from celery.contrib.testing.worker import start_worker
from celery_unique.compat.heimdall import HeimdallTask, RateLimit
from celery_unique.core.keys import KeySpace
from celery_unique.core.locks import parse_owner

url, prefix = sys.argv[1], sys.argv[2]
app = Celery("memory", set_as_current=False)
app.conf.update(broker_url="memory://", result_backend="cache+memory://",
                broker_connection_retry_on_startup=True, unique_key_prefix=prefix)
clients = []

class OwnRedis(HeimdallTask):
    def setup_redis(self):
        client = redis.Redis.from_url(url)
        clients.append(client)
        return client

@app.task(base=OwnRedis, bind=True, heimdall={"unique": True}, name="unique_job")
def unique_job(self, x):
    return self.redis_backend().owner(self.unique_key((x,)))  # who holds it, mid-run

@app.task(base=OwnRedis, heimdall={"rate_limit": RateLimit((5, 1))}, name="limited_job")
def limited_job(x):
    return x

with start_worker(app, pool="threads", perform_ping_check=False):
    result = unique_job.delay(1)
    holder = result.get(timeout=20)
    limited = [limited_job.delay(i).get(timeout=20) for i in range(3)]
after = parse_owner(clients[0].get(KeySpace(prefix).lock(unique_job.unique_key((1,)))))
print(json.dumps({"id": result.id, "holder": holder, "limited": limited, "after": after}))
"""


def test_heimdall_with_its_own_redis_runs_on_a_broker_that_is_not_redis(
    redis_url: str, tmp_path: Path
) -> None:
    script = tmp_path / "memory_app.py"
    script.write_text(MEMORY_APP)
    prefix = f"h{uuid.uuid4().hex[:6]}:"
    done = subprocess.run(
        [sys.executable, str(script), redis_url, prefix],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert done.returncode == 0, done.stderr[-3000:]
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    assert seen["holder"].startswith(seen["id"])  # the run held its key in our Redis
    assert seen["limited"] == [0, 1, 2]  # the rate-limited task ran too
    assert seen["after"] is None  # and the key was freed after the run


def test_a_rate_limited_task_without_a_limit_needs_no_redis(make_app: MakeApp) -> None:
    app = make_app(broker_url="memory://")

    @app.task(base=RateLimitedTask, shared=False)
    def free(x: int) -> int:
        return x

    assert free.rate_config.limits((1,), {}) is None  # resolved without any lock store


class Off(UniqueTask):
    """Uniqueness switched off through the override point, as celery-heimdall's layer does."""

    def unique_setting(self, name: str) -> Setting | None:
        if name == "enabled":
            return Setting(False, "a test")
        return super().unique_setting(name)


def test_a_false_enabled_setting_makes_a_plain_celery_task(make_app: MakeApp) -> None:
    # No Redis anywhere: any use of a lock here is a ConfigurationError.
    app = make_app(broker_url="memory://")

    def job(x: int) -> int:
        return x

    on = app.task(base=UniqueTask, shared=False, name="on")(job)
    off = app.task(base=Off, shared=False, name="off")(job)
    request = SimpleNamespace(**{KEY_HEADER: "key"})
    with pytest.raises(ConfigurationError, match="need Redis"):
        on.apply_async((1,))
    with pytest.raises(ConfigurationError, match="need Redis"):
        on.free_ended_instance("t", request, (1,), {}, Revoked())

    assert off.apply_async((1,)) != off.apply_async((1,))  # two instances, no lock taken
    assert asyncio.run(off.aapply_async((1,))).id
    off.free_ended_instance("t", request, (1,), {}, Revoked())  # nothing to free
    off.push_request(id="t", called_directly=False)  # a worker's delivery
    try:
        assert off(2) == 2
    finally:
        off.pop_request()
