"""celery_unique.compat.singleton: celery-singleton's README, run through a real worker, and
the edge cases of each option and setting."""

from __future__ import annotations

import asyncio
import json
import pickle
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
import redis
from celery.signals import worker_ready

import celery_unique
from celery_unique import ConfigurationError, RedisBackend
from celery_unique.celery.settings import Setting
from celery_unique.compat import singleton as compat
from celery_unique.compat.singleton import DuplicateTaskError, Singleton, clear_locks
from celery_unique.core.locks import parse_owner
from tests.celery import app as t
from tests.celery import compat_tasks as c
from tests.celery.conftest import MakeApp, run_with_shim
from tests.conftest import lock_key as shared_lock_key
from tests.helpers import wait_until

pytestmark = pytest.mark.usefixtures("worker")


def key_of(task: Singleton, *args: Any, **kwargs: Any) -> str:
    backend = compat.singleton_backend(task.app)
    return shared_lock_key(backend.key_prefix, task.unique_key(args, kwargs))


# -- the README, example by example ------------------------------------------------------------


def test_quick_start_queues_once_and_frees_the_lock_when_done() -> None:
    async_result = c.do_stuff.delay(1, 2, 3, a="b")
    async_result2 = c.do_stuff.delay(1, 2, 3, a="b")
    assert async_result == async_result2  # queued once

    a = c.do_stuff.delay(1, 2, 3)
    b = c.do_stuff.delay(1, 2, 3)
    assert a == b
    c_ = c.do_stuff.delay(4, 5, 6)
    assert a != c_  # other arguments, another task
    assert a.get(timeout=10) == "I just woke up"
    d = c.do_stuff.delay(1, 2, 3)  # the lock went with the run
    assert a != d
    for result in (async_result, c_, d):
        assert result.get(timeout=10) == "I just woke up"


def test_unique_on_considers_only_the_named_arguments() -> None:
    user = uuid.uuid4().hex
    task1 = c.do_something.delay(username=user, otherarg=99)
    task2 = c.do_something.delay(username=user, otherarg=100)
    assert task1 == task2
    assert c.do_something.delay(user, 101) == task1  # positional spelling, same key
    task1.get(timeout=10)
    assert t.runs(f"s.do_something:{user}") == 1


def test_unique_on_empty_list_means_the_task_name_alone() -> None:
    first = c.name_only.delay(uuid.uuid4().hex)
    assert c.name_only.delay(uuid.uuid4().hex) == first
    first.get(timeout=10)


def test_unique_on_accepts_one_name_as_a_string(make_app: MakeApp, redis_url: str) -> None:
    app = make_app(broker_url=redis_url, result_backend=redis_url)

    @app.task(base=Singleton, unique_on="username", shared=False)
    def greet(username: str, otherarg: Any = None) -> None: ...

    assert greet.unique_key(("bob", 1)) == greet.unique_key(("bob", 2))
    assert greet.unique_key(("bob",)) != greet.unique_key(("alice",))


def test_raise_on_duplicate_raises_with_the_holders_id() -> None:
    user = uuid.uuid4().hex
    task1 = c.do_something_raise.delay(user)
    with pytest.raises(DuplicateTaskError) as raised:
        c.do_something_raise.delay(user)
    assert raised.value.task_id == task1.id
    # One error tree: it is celery-unique's too, and survives pickling (result backends).
    assert isinstance(raised.value, celery_unique.DuplicateTaskError)
    assert raised.value.ttl is not None and raised.value.ttl > 0
    again = pickle.loads(pickle.dumps(raised.value))
    assert (type(again), again.task_id) == (DuplicateTaskError, task1.id)
    task1.get(timeout=10)


def test_lock_expiry_lets_a_new_instance_start_while_the_first_still_runs() -> None:
    tag = uuid.uuid4().hex
    task1 = c.runs_longer_than_expiry.delay(tag)
    time.sleep(0.5)
    assert c.runs_longer_than_expiry.delay(tag) == task1  # within the expiry: a duplicate
    time.sleep(1.3)  # the lock's 1.5 s are over, the run (2.5 s) is not
    task2 = c.runs_longer_than_expiry.delay(tag)
    assert task1 != task2  # two separate task instances
    task1.get(timeout=10)
    task2.get(timeout=10)
    assert t.runs(tag) == 2
    assert t.peak(tag) == 2  # they did overlap, as lock_expiry allows


def test_clear_locks_on_worker_ready_frees_every_lock(redis_url: str) -> None:
    tag = uuid.uuid4().hex
    # Queued where no worker listens: the lock stays, as if its worker had died.
    stuck = c.do_something.apply_async((tag,), queue=f"nowhere-{tag}")
    assert c.do_something.delay(tag) == stuck

    @worker_ready.connect(weak=False)
    def unlock_all(**kwargs: Any) -> None:
        clear_locks(t.app)

    try:
        worker_ready.send(sender=None)
    finally:
        worker_ready.disconnect(unlock_all)
    fresh = c.do_something.delay(tag)
    assert fresh != stuck
    fresh.get(timeout=10)


# -- the lifecycle celery-singleton got wrong --------------------------------------------------


def test_a_retrying_task_keeps_its_lock_and_its_retries_run() -> None:
    tag = uuid.uuid4().hex
    first = c.singleton_retrying.delay(tag)
    wait_until(lambda: t.runs(tag) >= 1)
    assert c.singleton_retrying.delay(tag) == first  # still one instance while it retries
    assert first.get(timeout=10) == 2  # celery-singleton dropped the retry: it never ran
    assert t.runs(tag) == 3
    assert c.singleton_retrying.delay(tag) != first  # freed at the end


def test_a_revoked_task_frees_its_lock() -> None:
    tag = uuid.uuid4().hex
    queued = c.do_something.apply_async((tag,), countdown=1)
    queued.revoke()  # celery-singleton kept this lock until it expired, or for ever
    lock = c.do_something.generate_lock(c.do_something.name, [tag])
    wait_until(lambda: c.do_something.get_existing_task_id(lock) is None, timeout=15)
    assert t.runs(f"s.do_something:{tag}") == 0


def test_a_stale_holder_cannot_free_the_lock_of_the_next_instance(client: redis.Redis) -> None:
    tag = uuid.uuid4().hex
    task1 = c.runs_longer_than_expiry.delay(tag)
    time.sleep(1.8)  # its lock expired; a second instance takes the key
    task2 = c.runs_longer_than_expiry.delay(tag)
    task1.get(timeout=10)  # the first ends while the second is queued or running
    owner = parse_owner(client.get(key_of(c.runs_longer_than_expiry, tag)))
    assert owner is not None and owner.startswith(task2.id)
    task2.get(timeout=10)


def test_release_lock_and_generate_lock_helpers(client: redis.Redis) -> None:
    tag = uuid.uuid4().hex
    stuck = c.do_something.apply_async((tag,), queue=f"nowhere-{tag}")
    lock = c.do_something.generate_lock(c.do_something.name, [tag])
    assert c.do_something.get_existing_task_id(lock) == stuck.id
    c.do_something.release_lock(task_args=[tag])
    assert c.do_something.get_existing_task_id(lock) is None
    assert client.exists(key_of(c.do_something, tag)) == 0


# -- settings ----------------------------------------------------------------------------------


@pytest.fixture
def nowhere() -> str:
    """A queue no worker consumes: configuration tests only need the producer side."""
    return f"nowhere-{uuid.uuid4().hex[:8]}"


def test_app_settings_backend_url_prefix_raise_and_expiry(
    make_app: MakeApp, redis_url: str, client: redis.Redis, nowhere: str
) -> None:
    other_db = redis_url.rsplit("/", 1)[0] + "/3"
    app = make_app(
        broker_url=redis_url,
        singleton_backend_url=other_db,
        singleton_key_prefix="MYLOCKS_",
        singleton_raise_on_duplicate=True,
        singleton_lock_expiry=77,
    )

    @app.task(base=Singleton, shared=False)
    def job(x: int) -> None: ...

    first = job.apply_async((1,), queue=nowhere)
    with pytest.raises(DuplicateTaskError):
        job.apply_async((1,), queue=nowhere)
    db3 = redis.Redis.from_url(other_db)
    try:
        key = shared_lock_key("MYLOCKS_", job.unique_key((1,)))
        assert parse_owner(db3.get(key)) == first.id
        assert 70 < db3.pttl(key) / 1000 <= 77
        assert client.exists(key) == 0  # not in the broker's database
        assert clear_locks(app) == 1
        assert db3.exists(key) == 0
    finally:
        db3.close()


def test_task_options_override_the_app_settings(
    make_app: MakeApp, redis_url: str, nowhere: str
) -> None:
    app = make_app(broker_url=redis_url, singleton_raise_on_duplicate=True)

    @app.task(base=Singleton, raise_on_duplicate=False, lock_expiry=5, shared=False)
    def job(x: int) -> None: ...

    first = job.apply_async((1,), queue=nowhere)
    assert job.apply_async((1,), queue=nowhere) == first
    assert 0 < job.unique_config.backend.client.pttl(key_of(job, 1)) <= 5000


def test_uppercase_settings_with_and_without_a_namespace(make_app: MakeApp, redis_url: str) -> None:
    class Settings:
        CELERY_BROKER_URL = redis_url
        CELERY_SINGLETON_KEY_PREFIX = "NS_"
        CELERY_SINGLETON_RAISE_ON_DUPLICATE = True

    namespaced = make_app()
    namespaced.config_from_object(Settings, namespace="CELERY")
    assert compat.config(namespaced, "key_prefix") == Setting(
        "NS_", "app.conf.singleton_key_prefix"
    )
    assert getattr(compat.config(namespaced, "raise_on_duplicate"), "value", None) is True

    plain = make_app(CELERY_SINGLETON_LOCK_EXPIRY=12, SINGLETON_KEY_PREFIX="P_")
    assert compat.config(plain, "lock_expiry") == Setting(
        12, "app.conf.CELERY_SINGLETON_LOCK_EXPIRY"
    )
    assert compat.config(plain, "key_prefix") == Setting("P_", "app.conf.SINGLETON_KEY_PREFIX")
    assert compat.config(plain, "backend_url") is None


def test_json_encoder_class_setting(make_app: MakeApp, redis_url: str, nowhere: str) -> None:
    class UUIDEncoder(json.JSONEncoder):
        def default(self, o: object) -> object:
            return str(o) if isinstance(o, uuid.UUID) else super().default(o)

    plain = make_app(broker_url=redis_url)
    encoded = make_app(broker_url=redis_url, singleton_json_encoder_class=UUIDEncoder)
    value = uuid.uuid4()
    for app in (plain, encoded):

        @app.task(base=Singleton, shared=False, name="job")
        def job(x: Any) -> None: ...

    with pytest.raises(ConfigurationError, match="x"):
        plain.tasks["job"].apply_async((value,), queue=nowhere, serializer="pickle")
    encoded_job = encoded.tasks["job"]
    assert encoded_job.unique_key((value,)) == encoded_job.unique_key((str(value),))


def test_backend_class_and_kwargs_settings(make_app: MakeApp, redis_url: str) -> None:
    for default in (
        None,
        "celery_singleton.backends.redis.RedisBackend",
        "celery_singleton.backend.RedisBackend",
    ):
        assert compat.backend_class(default) is RedisBackend

    class Mine(RedisBackend):
        pass

    assert compat.backend_class(Mine) is Mine
    assert compat.backend_class(f"{RedisBackend.__module__}:RedisBackend") is RedisBackend
    with pytest.raises(ConfigurationError, match="singleton_backend_class"):
        compat.backend_class("json:JSONEncoder")

    app = make_app(
        singleton_backend_url=redis_url,
        singleton_backend_class=Mine,
        singleton_backend_kwargs={"socket_timeout": 3.5},
    )
    backend = compat.singleton_backend(app)
    assert type(backend) is Mine
    assert backend.client.connection_pool.connection_kwargs["socket_timeout"] == 3.5

    wrong = make_app(broker_url=redis_url, singleton_json_encoder_class="json:JSONDecoder")

    @wrong.task(base=Singleton, shared=False)
    def job() -> None: ...

    with pytest.raises(ConfigurationError, match="singleton_json_encoder_class"):
        job.delay()

    bad = make_app(singleton_backend_url=redis_url, singleton_backend_kwargs=["socket_timeout"])
    with pytest.raises(ConfigurationError, match="singleton_backend_kwargs"):
        compat.singleton_backend(bad)


def test_singleton_and_unique_tasks_keep_their_own_asyncio_backends(
    make_app: MakeApp, redis_url: str
) -> None:
    from celery_unique.celery import async_backend_for
    from celery_unique.celery.store import backends

    app = make_app(broker_url=redis_url, singleton_backend_url=redis_url)

    async def both() -> tuple[str, str]:
        try:
            singleton = compat.singleton_async_backend(app)
            assert singleton is not None
            return async_backend_for(app).key_prefix, singleton.key_prefix
        finally:
            await backends.aclose(app)

    assert asyncio.run(both()) == ("cu:", compat.DEFAULT_KEY_PREFIX)


def test_no_redis_anywhere_is_a_clear_error(make_app: MakeApp) -> None:
    app = make_app(broker_url="memory://")

    @app.task(base=Singleton, shared=False)
    def job() -> None: ...

    with pytest.raises(ConfigurationError, match="singleton_backend_url"):
        job.delay()


def test_bad_lock_expiry_is_a_clear_error(make_app: MakeApp, redis_url: str) -> None:
    app = make_app(broker_url=redis_url)

    @app.task(base=Singleton, lock_expiry=-1, shared=False)
    def job() -> None: ...

    with pytest.raises(ConfigurationError, match="lock_expiry"):
        job.delay()


# -- the two-line shim -------------------------------------------------------------------------


def test_the_shim_serves_old_imports(tmp_path: Path) -> None:
    code = """
import celery_singleton
from celery_singleton import Singleton, clear_locks, DuplicateTaskError
from celery_singleton.exceptions import DuplicateTaskError as E2
from celery_singleton.singleton import Singleton as S2
import celery_unique.compat.singleton as compat
assert Singleton is S2 is compat.Singleton and DuplicateTaskError is E2
assert clear_locks is compat.clear_locks
print("ok")
"""
    assert run_with_shim(tmp_path, "celery_singleton", "singleton", code) == "ok"


def test_duplicate_task_error_takes_the_old_positional_arguments() -> None:
    error = DuplicateTaskError("dup", "abc")
    assert (error.task_id, error.ttl, str(error)) == ("abc", None, "dup")
