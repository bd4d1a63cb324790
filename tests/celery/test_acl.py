"""Unique tasks and clear_locks as the README's minimal ACL user."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest

from celery_unique import UniqueTask, clear_locks
from celery_unique.testing import RedisServer
from tests.celery.conftest import MakeApp
from tests.integration.test_tls_acl import RULE, acl_server, user_url


@pytest.fixture(scope="module")
def limited_server() -> Iterator[RedisServer]:
    with acl_server(RULE) as server:
        yield server


def test_unique_tasks_and_clear_locks_run_as_the_minimal_user(
    make_app: MakeApp, limited_server: RedisServer
) -> None:
    app = make_app(broker_url="memory://", unique_backend_url=user_url(limited_server))

    @app.task(base=UniqueTask, shared=False, name=f"acl-{uuid.uuid4().hex[:6]}")
    def job(x: int) -> None: ...

    first = job.apply_async((1,))
    assert job.apply_async((1,)).id == first.id  # the lock held it: a duplicate
    assert clear_locks(app) >= 1  # SCAN + UNLINK
    assert job.apply_async((1,)).id != first.id
