"""`celery -A proj unique ...`, run as a subprocess against the test Redis."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest
import redis

from celery_unique import RateLimit
from celery_unique.celery.store import backend_for
from celery_unique.core.lifecycle import run_token
from tests.celery import app as t

ROOT = Path(__file__).resolve().parents[2]


def celery(redis_url: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "CELERY_UNIQUE_TEST_REDIS_URL": redis_url}
    return subprocess.run(
        [sys.executable, "-m", "celery", "-A", "tests.celery.app", "unique", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=ROOT,
        env=env,
    )


def listed(redis_url: str, *args: str) -> list[dict[str, Any]]:
    done = celery(redis_url, "list", "--json", *args)
    assert done.returncode == 0, done.stderr
    rows: list[dict[str, Any]] = json.loads(done.stdout)
    return rows


@pytest.fixture
def held(celery_app: Any) -> tuple[str, list[str]]:
    """Two queued instances of t.slow (on a queue no worker reads) and their ids."""
    secret = f"secret-{uuid.uuid4().hex}"  # an argument value that must never be printed
    nowhere = f"nowhere-{uuid.uuid4().hex}"
    ids = [t.slow.apply_async((f"{secret}-{i}", 0.0), queue=nowhere).id for i in range(2)]
    return secret, ids


def test_list_shows_each_held_key_and_never_an_argument(
    redis_url: str, held: tuple[str, list[str]]
) -> None:
    secret, ids = held
    rows = [row for row in listed(redis_url, "--task", "t.slow") if row["holder"] in ids]
    assert len(rows) == 2
    for row in rows:
        assert row["task"] == "t.slow" and row["state"] == "queued"
        assert 3500 < row["ttl"] <= 3600
        assert set(row) >= {"task", "holder", "state", "ttl"}
    table = celery(redis_url, "list")
    assert table.returncode == 0 and ids[0] in table.stdout and "queued" in table.stdout
    assert secret not in table.stdout + json.dumps(listed(redis_url))
    assert listed(redis_url, "--task", "t.no-such-task") == []


def test_clear_refuses_without_yes_then_says_how_many(
    redis_url: str, held: tuple[str, list[str]], client: redis.Redis
) -> None:
    _, ids = held
    refused = celery(redis_url, "clear", "--task", "t.slow")
    assert refused.returncode != 0 and "--yes" in refused.stderr
    assert {row["holder"] for row in listed(redis_url, "--task", "t.slow")} >= set(ids)
    done = celery(redis_url, "clear", "--task", "t.slow", "--yes")
    assert done.returncode == 0
    count = int(done.stdout.split()[1])
    assert count >= 2 and f"deleted {count} locks" in done.stdout
    assert listed(redis_url, "--task", "t.slow") == []


def test_clear_holder_frees_only_the_key_that_task_id_holds(
    redis_url: str, held: tuple[str, list[str]]
) -> None:
    secret, ids = held
    done = celery(redis_url, "clear", "--holder", ids[0], "--json")  # no --yes: one named key
    assert done.returncode == 0, done.stderr
    (row,) = json.loads(done.stdout)
    assert row["holder"] == ids[0] and row["task"] == "t.slow" and row["state"] == "queued"
    assert set(row) == {"task", "holder", "state", "ttl", "lock"}  # list's fields
    holders = {row["holder"] for row in listed(redis_url, "--task", "t.slow")}
    assert ids[0] not in holders and ids[1] in holders  # the other holder's key stays
    table = celery(redis_url, "clear", "--holder", ids[1])
    assert table.returncode == 0
    assert f"freed 1 lock held by {ids[1]}" in table.stdout and "queued" in table.stdout
    assert secret not in done.stdout + table.stdout
    again = celery(redis_url, "clear", "--holder", ids[1])
    assert again.returncode == 0 and f"no lock held by {ids[1]}" in again.stdout
    assert json.loads(celery(redis_url, "clear", "--holder", ids[1], "--json").stdout) == []


def test_clear_holder_frees_a_running_instances_key_and_json_needs_it(redis_url: str) -> None:
    task_id, name = uuid.uuid4().hex, t.slow.unique_key((uuid.uuid4().hex, 0.0))
    backend = backend_for(t.app)  # a run's key, as a worker holds it: the id and a run id
    assert backend.acquire_or_owner(name, run_token(task_id, "r1"), 60).acquired
    done = celery(redis_url, "clear", "--holder", task_id, "--task", "t.slow", "--json")
    assert done.returncode == 0, done.stderr
    assert [(row["holder"], row["state"]) for row in json.loads(done.stdout)] == [
        (task_id, "running")
    ]
    assert backend.acquire_or_owner(name, "next", 60).acquired  # free again
    backend.release(name, "next")
    refused = celery(redis_url, "clear", "--json", "--yes")
    assert refused.returncode != 0 and "--holder" in refused.stderr


def test_limits_shows_rate_buckets_and_concurrency_slots_in_use(
    redis_url: str, celery_app: Any
) -> None:
    backend = backend_for(t.app)
    name = f"partner-{uuid.uuid4().hex[:8]}"
    backend.rate_limiter(RateLimit(5, per=3600)).hit(name)
    backend.rate_limiter(RateLimit(5, per=3600)).hit(name)
    slot = backend.semaphore(name, limit=3, ttl=60)
    assert slot.acquire()
    try:
        done = celery(redis_url, "limits", "--json")
        assert done.returncode == 0, done.stderr
        rows = [row for row in json.loads(done.stdout) if row["key"] == name]
        assert {row["kind"]: row.get("remaining", row.get("count")) for row in rows} == {
            "rate": 3,
            "concurrency": 1,
        }
        table = celery(redis_url, "limits")
        assert name in table.stdout and "concurrency" in table.stdout
    finally:
        slot.release()


def test_a_redis_that_does_not_answer_is_a_clear_error(tmp_path: Path) -> None:
    done = celery("redis://127.0.0.1:1/0", "list")
    assert done.returncode != 0
    assert "Redis did not answer" in done.stderr and "Traceback" not in done.stderr
