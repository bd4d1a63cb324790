"""A Django project as users lay one out, for tests/celery/test_django.py: a settings module
(the Celery settings under the ``CELERY_`` namespace), a Celery app configured from it, and
a script that commits and rolls back transactions around ``delay_on_commit``. It runs in a
subprocess, so Django's global settings never reach the rest of the test session."""
