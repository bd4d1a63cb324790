"""The sync executor keeps a few connections between operations instead of handing each back
to the pool: what that must never cost. A bounded pool's waiter is not starved by a
connection sitting idle in the executor, the client's own calls (SCAN, UNLINK) still find
one, and a kept connection the server closed is replaced without the caller noticing."""

from __future__ import annotations

import threading
import time
import uuid

import pytest
import redis

from celery_unique import RedisBackend
from tests.helpers import wait_until


def _named(client: redis.Redis, name: str) -> list[dict[str, str]]:
    return [c for c in client.client_list() if c.get("name") == name]


@pytest.mark.parametrize("max_connections", [1, 2])
def test_threads_beyond_a_bounded_pool_each_get_a_connection_in_time(
    redis_url: str, prefix: str, max_connections: int
) -> None:
    errors: list[BaseException] = []
    slowest = 0.0
    with RedisBackend.from_url(
        redis_url, key_prefix=prefix, max_connections=max_connections
    ) as backend:

        def work(n: int) -> None:
            nonlocal slowest
            try:
                for i in range(50):
                    started = time.monotonic()
                    backend.acquire_or_owner(f"job{n}:{i}", "me", 10)
                    slowest = max(slowest, time.monotonic() - started)
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=work, args=(n,)) for n in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
    assert errors == []
    # A starved waiter would have sat out the whole 2 s deadline and failed; none came close.
    assert slowest < backend.executor.timeout


def test_the_clients_own_calls_find_a_connection_of_a_one_connection_pool(
    redis_url: str, prefix: str
) -> None:
    with RedisBackend.from_url(redis_url, key_prefix=prefix, max_connections=1) as backend:
        for i in range(5):
            assert backend.acquire_or_owner(f"job{i}", "me", 10).acquired
        # SCAN and UNLINK go through the client, on the pool the kept connection came from.
        keys = list(backend.executor.scan(f"{prefix}*"))
        assert len(keys) == 5
        assert backend.executor.unlink(keys) == 5
        assert backend.acquire_or_owner("job0", "me", 10).acquired  # and it is kept again


def test_a_kept_connection_the_server_closed_is_replaced_unnoticed(
    redis_url: str, prefix: str, client: redis.Redis
) -> None:
    name = f"kept-{uuid.uuid4().hex[:8]}"
    with RedisBackend.from_url(redis_url, key_prefix=prefix, client_name=name) as backend:
        assert backend.acquire_or_owner("job", "me", 10).acquired
        (kept,) = _named(client, name)
        client.client_kill_filter(_id=kept["id"])
        wait_until(lambda: not _named(client, name))
        # The next call finds the kept socket closed before it sends, and takes a fresh one:
        # no error, and no resend of a command whose fate is unknown.
        assert backend.acquire_or_owner("job", "me", 10).acquired
        assert backend.owner("job") == "me"
        (fresh,) = _named(client, name)
        assert fresh["id"] != kept["id"]
