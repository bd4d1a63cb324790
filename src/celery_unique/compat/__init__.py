"""Migration layers: the spellings of the libraries celery-unique replaces.

* :mod:`celery_unique.compat.singleton` for celery-singleton;
* :mod:`celery_unique.compat.heimdall` for celery-heimdall.

Each translates its library's options onto :class:`~celery_unique.UniqueTask` and
:class:`~celery_unique.RateLimitedTask`; neither has a lock of its own. Code that imports the
old package name keeps working through a two-line shim module, see ``install_as`` in each.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from types import ModuleType

__all__ = ["install_modules"]


def install_modules(name: str, modules: Mapping[str, ModuleType]) -> None:
    """Register ``modules`` in ``sys.modules`` as ``name`` (key ``""``) and ``name.<key>``.

    Called from a shim module named ``name`` while it is being imported: the import system
    then hands out ``modules[""]`` for ``import name``, and ``import name.sub`` finds the
    module registered for ``"sub"`` (never a second copy of its classes).
    """
    for sub, module in modules.items():
        sys.modules[f"{name}.{sub}" if sub else name] = module
