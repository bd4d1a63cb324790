"""A real ``celery beat`` firing a unique task every second whose run lasts 3 s, beside a real
worker of two processes: runs never overlap, and the firings while one is queued or running
are answered as duplicates (nothing is published for them), not run."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import pytest

from tests.celery import app as t
from tests.celery.conftest import celery_process, worker_process
from tests.helpers import wait_until

pytestmark = pytest.mark.usefixtures("celery_app")

RUN_SECONDS = 3.0


def test_beat_every_second_with_a_3s_task_never_overlaps(redis_url: str, tmp_path: Path) -> None:
    tag = uuid.uuid4().hex
    # Two worker processes: without the key, a second run could start beside the first.
    with worker_process(redis_url, concurrency=2) as (_, queue):
        beat = {"CELERY_UNIQUE_TEST_BEAT": t.beat_setting(tag, queue, RUN_SECONDS)}
        schedule, pidfile = tmp_path / "beat-schedule", tmp_path / "beat.pid"
        args = ["beat", "-s", str(schedule), "--pidfile", str(pidfile), "-l", "warning"]
        with celery_process(redis_url, *args, env=beat) as (process, log):
            try:
                wait_until(lambda: t.runs(tag) >= 3, timeout=60)
            except AssertionError:
                raise AssertionError(f"beat did not fire as expected: {log()}") from None
            assert process.poll() is None, log()
        # Beat is stopped: whatever it published runs (or has run) now.
        published = wait_until(lambda: _all_ran(tag))
    _, duplicates = t.beat_fired(tag)
    assert t.peak(tag) == 1  # never two runs at once
    assert t.runs(tag) == published  # each published firing ran once; duplicates did not
    # Beat fires every second and each run holds the key for 3 s: between two runs' starts
    # at least one firing found the key held.
    assert duplicates >= t.runs(tag) - 1 >= 2


def _all_ran(tag: str) -> Any:
    published, _ = t.beat_fired(tag)
    return published if t.runs(tag) == published and not _running(tag) else None


def _running(tag: str) -> bool:
    return int(t.store().get(f"running:{tag}") or 0) > 0
