"""The Celery layer: glue from Celery's hooks and signals to the core's decisions.

:class:`~.unique.UniqueTask`, :class:`~.ratelimited.RateLimitedTask` and the settings they
read (:mod:`.settings`). The only place, with :mod:`celery_unique.compat`, that imports Celery.
"""
