"""unique_while_running: at most one queued and one running instance per key, through a real
worker; the queued one starts only once the running one has ended."""

from __future__ import annotations

import uuid

import pytest

from celery_unique import ConfigurationError, UniqueTask
from tests.celery import app as t
from tests.celery.conftest import MakeApp
from tests.helpers import wait_until

pytestmark = pytest.mark.usefixtures("worker")


def test_a_call_while_one_runs_queues_one_more_and_no_more() -> None:
    key, tag = uuid.uuid4().hex, uuid.uuid4().hex
    first = t.queued_and_running.delay(key, tag)
    wait_until(lambda: t.runs(tag) >= 1)  # the first runs now (its queued key is free again)
    second = t.queued_and_running.delay(key, tag)
    assert second.id != first.id  # a change made now is not lost: one more is queued
    third = t.queued_and_running.delay(key, tag)
    assert third.id == second.id  # further calls are duplicates of the queued one
    assert first.get(timeout=30) == 0
    assert second.get(timeout=30) == 0  # deferred while the first ran, not failed nor retried
    assert t.runs(tag) == 2
    assert t.peak(tag) == 1  # never two running
    spans = t.spans(tag)
    assert [kind for kind, _ in spans] == ["start", "end", "start", "end"]
    assert spans[2][1] >= spans[1][1]  # the second started after the first ended


def test_it_needs_unique_until_started(make_app: MakeApp, redis_url: str) -> None:
    app = make_app(broker_url=redis_url)

    @app.task(base=UniqueTask, unique_while_running=True, shared=False)
    def job() -> None: ...

    with pytest.raises(ConfigurationError, match="unique_until='started'"):
        _ = job.unique_config
