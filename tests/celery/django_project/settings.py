"""Django settings, written the way a project writes them: the Celery app reads the
``CELERY_*`` names (``app.config_from_object("django.conf:settings", namespace="CELERY")``).
Where Redis is and where the database file goes come from the environment the test sets."""

from __future__ import annotations

import os

SECRET_KEY = "tests-only, never deployed"
DEBUG = False
INSTALLED_APPS: list[str] = []
DATABASES = {
    "default": {
        "ENGINE": "django.db.backends.sqlite3",
        "NAME": os.environ["DJANGO_TEST_DB"],  # a file in the test's temporary directory
    }
}
USE_TZ = True
TIME_ZONE = "UTC"

CELERY_BROKER_URL = os.environ["CELERY_UNIQUE_TEST_REDIS_URL"]
CELERY_RESULT_BACKEND = CELERY_BROKER_URL
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True
CELERY_TASK_DEFAULT_QUEUE = os.environ["DJANGO_TEST_QUEUE"]  # no worker consumes it
CELERY_UNIQUE_KEY_PREFIX = os.environ["DJANGO_TEST_PREFIX"]
CELERY_UNIQUE_TTL = 600
