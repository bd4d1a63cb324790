"""Transactions around ``delay_on_commit``, committed and rolled back; prints what it saw.

``python -m tests.celery.django_project.commit`` (the environment names the database file,
Redis, the queue and the key prefix: see settings.py) prints one JSON object: for each step,
who held the unique key (the backend's ``owner``) and the ids of the messages in the queue.
tests/celery/test_django.py runs it and checks every step.
"""

from __future__ import annotations

import json
import os
from typing import Any

import django
import redis
from celery.contrib.django.task import DjangoTask
from django.db import connection, transaction

from celery_unique import DuplicateTaskError
from celery_unique import signals as unique_signals
from tests.celery.django_project.tasks import (
    UniqueDjangoTask,
    app,
    plain,
    send_receipt,
    strict_receipt,
    unique_only,
)


class RolledBack(Exception):
    """Raised inside ``atomic()`` to roll the transaction back."""


def main() -> dict[str, Any]:
    django.setup()
    queue = os.environ["DJANGO_TEST_QUEUE"]
    broker = redis.Redis.from_url(os.environ["CELERY_UNIQUE_TEST_REDIS_URL"])
    seen: dict[str, Any] = {"duplicates": []}

    @unique_signals.task_duplicate.connect(weak=False)
    def _duplicate(sender: Any = None, task_id: str | None = None, **_: Any) -> None:
        seen["duplicates"].append(task_id)

    def owner(task: UniqueDjangoTask, *args: Any) -> str | None:
        backend = task.unique_config.backend
        return backend.owner(task.unique_key(args))

    def queued() -> list[str]:  # oldest first (kombu pushes on the left)
        return [json.loads(raw)["headers"]["id"] for raw in reversed(broker.lrange(queue, 0, -1))]

    def orders() -> list[int]:
        with connection.cursor() as cursor:
            cursor.execute("SELECT id FROM orders ORDER BY id")
            return [row[0] for row in cursor.fetchall()]

    def step(task: UniqueDjangoTask, *args: Any) -> dict[str, Any]:
        return {"owner": owner(task, *args), "queued": queued(), "orders": orders()}

    seen["classes"] = {
        "app_default_is_django": issubclass(app.Task, DjangoTask),
        "plain_has_on_commit": hasattr(plain, "delay_on_commit"),
        "unique_only_has_on_commit": hasattr(unique_only, "delay_on_commit"),
        "conf_prefix": app.conf.unique_key_prefix,
    }
    with connection.cursor() as cursor:
        cursor.execute("CREATE TABLE orders (id INTEGER PRIMARY KEY)")

    # 1. Committed: no key and no message until the commit, then both.
    with transaction.atomic():
        with connection.cursor() as cursor:
            cursor.execute("INSERT INTO orders (id) VALUES (1)")
        seen["returned"] = send_receipt.delay_on_commit(1)
        seen["inside"] = step(send_receipt, 1)
    seen["committed"] = step(send_receipt, 1)

    # 2. A second call in another committed transaction: a duplicate, nothing published.
    with transaction.atomic():
        with connection.cursor() as cursor:
            cursor.execute("INSERT INTO orders (id) VALUES (2)")
        send_receipt.apply_async_on_commit(kwargs={"order_id": 1, "note": "again"})
        seen["inside_again"] = step(send_receipt, 1)
    seen["duplicate"] = step(send_receipt, 1)

    # 3. Rolled back: the on_commit callback never runs, no key is taken, nothing published.
    try:
        with transaction.atomic():
            with connection.cursor() as cursor:
                cursor.execute("INSERT INTO orders (id) VALUES (3)")
            send_receipt.delay_on_commit(3)
            raise RolledBack
    except RolledBack:
        pass
    seen["rolled_back"] = step(send_receipt, 3)

    # 4. on_duplicate="raise": the error comes out of atomic()'s exit, after the commit.
    with transaction.atomic():
        strict_receipt.delay_on_commit(4)
    try:
        with transaction.atomic():
            with connection.cursor() as cursor:
                cursor.execute("INSERT INTO orders (id) VALUES (4)")
            strict_receipt.delay_on_commit(4)
        seen["raised"] = None
    except DuplicateTaskError as error:
        seen["raised"] = error.task_id
    seen["strict"] = step(strict_receipt, 4)

    # Leave nothing behind in the shared Redis: the messages and the keys.
    broker.delete(queue)
    send_receipt.clear_locks()
    strict_receipt.clear_locks()
    broker.close()
    return seen


if __name__ == "__main__":
    print(json.dumps(main()))
