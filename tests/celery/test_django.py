"""A unique task's ``delay_on_commit`` in a Django project: the key is taken when the
transaction commits, never before, and a rolled-back transaction takes none.

The project (tests/celery/django_project: settings with ``CELERY_*`` names, a sqlite file
database, a Celery app configured from them) runs in a subprocess, so Django's global
settings stay out of this session.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("django", reason="Django is in the test extra: pip install -e '.[test]'")

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def seen(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """What the project's transactions did, step by step (see django_project/commit.py)."""
    env = {
        **os.environ,
        "CELERY_UNIQUE_TEST_REDIS_URL": redis_url,
        "DJANGO_TEST_DB": str(tmp_path_factory.mktemp("django") / "db.sqlite3"),
        "DJANGO_TEST_QUEUE": f"dj-{uuid.uuid4().hex[:8]}",
        "DJANGO_TEST_PREFIX": f"dj{uuid.uuid4().hex[:8]}:",
    }
    env.pop("DJANGO_SETTINGS_MODULE", None)  # the project's tasks module sets its own
    done = subprocess.run(
        [sys.executable, "-m", "tests.celery.django_project.commit"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    result["prefix"] = env["DJANGO_TEST_PREFIX"]
    return result


def test_the_django_fixup_and_the_namespaced_settings_are_in_force(seen: dict[str, Any]) -> None:
    classes = seen["classes"]
    # Celery's Django fixup made DjangoTask the default, so a plain task has delay_on_commit;
    # base=UniqueTask alone replaces that default: a unique task takes both classes.
    assert classes["app_default_is_django"] is True
    assert classes["plain_has_on_commit"] is True
    assert classes["unique_only_has_on_commit"] is False
    assert classes["conf_prefix"] == seen["prefix"]  # CELERY_UNIQUE_KEY_PREFIX was read


def test_delay_on_commit_takes_the_key_when_the_transaction_commits(
    seen: dict[str, Any],
) -> None:
    assert seen["returned"] is None  # on_commit returns nothing
    inside = seen["inside"]
    assert inside["owner"] is None and inside["queued"] == []  # not before the commit
    committed = seen["committed"]
    assert committed["orders"] == [1]
    (message,) = committed["queued"]
    assert committed["owner"] == message  # held by the id that was published


def test_a_second_commit_is_a_duplicate_and_publishes_nothing(seen: dict[str, Any]) -> None:
    first = seen["committed"]["owner"]
    assert seen["inside_again"]["queued"] == [first]
    duplicate = seen["duplicate"]
    assert duplicate["orders"] == [1, 2]  # its transaction did commit
    assert duplicate["owner"] == first
    assert duplicate["queued"] == [first]  # one message, the first's
    assert seen["duplicates"][0] == first  # task_duplicate named the holder


def test_a_rolled_back_transaction_takes_no_key_and_publishes_nothing(
    seen: dict[str, Any],
) -> None:
    rolled_back = seen["rolled_back"]
    assert rolled_back["orders"] == [1, 2]  # the row of the rolled-back transaction is gone
    assert rolled_back["owner"] is None
    assert rolled_back["queued"] == [seen["committed"]["owner"]]


def test_on_duplicate_raise_comes_out_of_the_commit(seen: dict[str, Any]) -> None:
    strict = seen["strict"]
    assert strict["owner"] is not None
    assert seen["raised"] == strict["owner"]  # DuplicateTaskError named the holder
    assert strict["orders"] == [1, 2, 4]  # raised after the commit: the row is there
    assert strict["queued"][-1] == strict["owner"] and len(strict["queued"]) == 2
