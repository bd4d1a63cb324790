"""A real Celery worker on the test Redis: in-process (threads) for most tests."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from celery.contrib.testing.worker import start_worker

from tests.celery import app as test_app


@pytest.fixture(scope="session")
def celery_app(redis_url: str) -> Iterator[Any]:
    test_app.configure(redis_url)
    yield test_app.app


@pytest.fixture(scope="session")
def worker(celery_app: Any) -> Iterator[Any]:
    with start_worker(
        celery_app, pool="threads", concurrency=4, perform_ping_check=False, shutdown_timeout=30
    ) as running:
        yield running
