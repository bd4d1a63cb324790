"""celery_unique.signals, each sent where its event happens: duplicates at the producer,
deferrals and lost locks in the worker (the session's in-process worker, so its receivers
here see them)."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis

from celery_unique import DuplicateTaskError, signals
from celery_unique.celery.store import backend_for
from tests.celery import app as t
from tests.conftest import lock_key
from tests.helpers import wait_until

pytestmark = pytest.mark.usefixtures("worker")

Received = list[dict[str, Any]]


@pytest.fixture
def received() -> Iterator[Callable[[Any], Received]]:
    """Connects a recording receiver to a signal for the test's duration."""
    connected: list[tuple[Any, Callable[..., None]]] = []
    lock = threading.Lock()

    def connect(signal: Any) -> Received:
        seen: Received = []

        def receiver(sender: Any = None, **kwargs: Any) -> None:
            with lock:
                seen.append({"sender": sender, **kwargs})

        signal.connect(receiver, weak=False)
        connected.append((signal, receiver))
        return seen

    yield connect
    for signal, receiver in connected:
        signal.disconnect(receiver)


def test_a_duplicate_is_signalled_where_it_is_called(
    received: Callable[[Any], Received],
) -> None:
    seen = received(signals.task_duplicate)
    tag = uuid.uuid4().hex
    first = t.raising.delay(tag)
    with pytest.raises(DuplicateTaskError):
        t.raising.delay(tag)
    (event,) = seen
    assert event["sender"].name == t.raising.name and event["task_id"] == first.id
    assert 0 < event["ttl"] <= 3600
    assert event["signal"] is signals.task_duplicate
    first.get(timeout=30)


def test_deferrals_are_signalled_in_the_worker_with_their_reason(
    received: Callable[[Any], Received],
) -> None:
    seen = received(signals.task_deferred)
    tag = uuid.uuid4().hex
    results = [t.concurrent.delay(tag, 0.3) for _ in range(8)]
    for result in results:
        result.get(timeout=60)
    ids = {r.id for r in results}
    mine = [e for e in seen if e["sender"].name == t.concurrent.name and e["task_id"] in ids]
    assert mine and all(e["reason"] == "concurrency" and e["countdown"] > 0 for e in mine)
    # Six runs had to wait for two slots: each came back about once, at its turn in the queue,
    # not over and over (a herd would be deferred many times each).
    assert len(mine) <= 2 * 6, len(mine)


def test_a_lost_lock_is_signalled_from_the_renewal(
    received: Callable[[Any], Received], client: redis.Redis
) -> None:
    seen = received(signals.task_lock_lost)
    tag = uuid.uuid4().hex
    result = t.loses_its_lock.delay(tag)
    wait_until(lambda: t.runs(tag) >= 1)
    client.delete(lock_key("cut:", t.loses_its_lock.unique_key((tag,))))  # cleared by hand
    wait_until(lambda: any(e["task_id"] == result.id for e in seen), timeout=10)
    (event,) = [e for e in seen if e["task_id"] == result.id]
    assert event["sender"].name == t.loses_its_lock.name
    result.get(timeout=30)  # the run itself goes on


def test_signals_are_celerys_own_type() -> None:
    from celery.utils.dispatch import Signal

    for name in ("task_duplicate", "task_deferred", "task_lock_lost"):
        assert isinstance(getattr(signals, name), Signal)
    assert backend_for(t.app) is backend_for(t.app)  # one backend per app, as the CLI reads
