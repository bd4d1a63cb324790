"""A hold that ends before its first renewal is due never starts a renewal thread: most holds
(a short task's run) are such, and a thread's start costs as much as a round trip."""

from __future__ import annotations

import threading
import time

from celery_unique import RedisBackend
from tests.helpers import wait_until


def renewers() -> int:
    return sum(t.name.startswith("celery-unique renew") for t in threading.enumerate())


def test_a_short_hold_starts_no_renewal_thread(redis_url: str, prefix: str) -> None:
    with RedisBackend.from_url(redis_url, key_prefix=prefix) as backend:
        before = renewers()
        for i in range(50):
            with backend.lock(f"short{i}", ttl=30, auto_renew=True) as lock:
                assert lock.renewing  # renewal is on: due in 10 s
            assert not lock.renewing
        assert renewers() == before


def test_a_long_hold_is_renewed_from_when_the_first_extend_is_due(
    redis_url: str, prefix: str
) -> None:
    with RedisBackend.from_url(redis_url, key_prefix=prefix) as backend:
        lock = backend.lock("long", ttl=0.6, auto_renew=True)
        assert lock.acquire()
        started = time.monotonic()
        try:
            wait_until(lambda: renewers() > 0, timeout=5)  # started when due (0.2 s)
            # The hold under test itself (not a wait for an event): 2.5 TTLs.
            time.sleep(max(0.0, started + 1.5 - time.monotonic()))
            assert not lock.lost
            assert lock.owner() == lock.token  # held well past its 0.6 s TTL
        finally:
            lock.release()
