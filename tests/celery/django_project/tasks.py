"""The project's Celery app and tasks, as a Django project's ``celery.py`` spells them.

With ``DJANGO_SETTINGS_MODULE`` set when the app is made, Celery's Django fixup makes
``celery.contrib.django.task.DjangoTask`` (``delay_on_commit``, ``apply_async_on_commit``)
the default task class: a task with ``base=UniqueTask`` replaces that default, so a unique
task that should wait for the commit takes both classes.
"""

from __future__ import annotations

import os

from celery import Celery
from celery.contrib.django.task import DjangoTask

from celery_unique import UniqueTask

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tests.celery.django_project.settings")

app = Celery("django_project")
app.config_from_object("django.conf:settings", namespace="CELERY")


class UniqueDjangoTask(DjangoTask, UniqueTask):  # type: ignore[misc]
    """A unique task with Django's ``delay_on_commit`` / ``apply_async_on_commit``."""


@app.task(base=UniqueDjangoTask, name="dj.send_receipt", unique_on=["order_id"])
def send_receipt(order_id: int, note: str = "") -> None:
    """Never runs here (no worker): the test looks at the key and the queue."""


@app.task(base=UniqueDjangoTask, name="dj.strict_receipt", on_duplicate="raise")
def strict_receipt(order_id: int) -> None:
    """``on_duplicate="raise"``: the duplicate's error comes out of the commit."""


@app.task(name="dj.plain")
def plain() -> None:
    """The app's default task class: the fixup's DjangoTask."""


@app.task(base=UniqueTask, name="dj.unique_only")
def unique_only() -> None:
    """``base=UniqueTask`` alone: no ``delay_on_commit``."""
