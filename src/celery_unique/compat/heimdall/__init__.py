"""celery-heimdall's spellings on celery-unique's tasks.

Switch by changing the import::

    from celery_unique.compat.heimdall import HeimdallTask, AlreadyQueuedError, RateLimit

    @app.task(base=HeimdallTask, heimdall={"unique": True, "rate_limit": RateLimit((2, 60))})
    def generate_report(customer_id): ...

Code that imports ``celery_heimdall`` (and ``celery_heimdall.task``, ``.errors``,
``.config``) keeps working with a two-line module ``celery_heimdall.py`` on the import path::

    from celery_unique.compat.heimdall import install_as

    install_as(__name__)
"""

from __future__ import annotations

import sys

from .. import install_modules
from . import config, errors, task
from .errors import AlreadyQueuedError
from .task import HeimdallTask, RateLimit, Strategy

__all__ = ["AlreadyQueuedError", "HeimdallTask", "RateLimit", "Strategy", "install_as"]


def install_as(name: str = "celery_heimdall") -> None:
    """Serve this package as ``name``, with ``name.task``, ``name.errors``, ``name.config``.

    For a shim module ``celery_heimdall.py``: ``from celery_unique.compat.heimdall import
    install_as; install_as(__name__)``.
    """
    install_modules(
        name,
        {"": sys.modules[__name__], "task": task, "errors": errors, "config": config},
    )
