"""The layers hold: the core does no I/O and knows no framework.

Read from the sources (every import statement, lazy ones inside functions included), since
importing ``celery_unique.core`` runs the package's ``__init__``, which brings redis-py in.
"""

from __future__ import annotations

import ast
from pathlib import Path

import celery_unique

PACKAGE = Path(celery_unique.__file__).parent
FORBIDDEN = ("redis", "anyio", "asyncio", "celery", "kombu", "billiard", "socket", "threading")
# What the core may reach outside itself: the error tree, which imports nothing of ours.
ALLOWED_SIBLINGS = {"errors"}


def imports_of(path: Path) -> list[tuple[int, str]]:
    """(level, module) of every import in ``path``: level 0 for absolute ones."""
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(0, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            found.append((node.level, node.module or ""))
    return found


def test_the_core_imports_no_io_and_no_framework() -> None:
    checked = [*sorted((PACKAGE / "core").glob("*.py")), PACKAGE / "errors.py"]
    offending = []
    for path in checked:
        in_core = path.parent.name == "core"
        for level, module in imports_of(path):
            top = module.split(".")[0]
            if level == 0 and top in FORBIDDEN:
                offending.append(f"{path.name} imports {module}")
            # From the core, ``..x`` leaves it: only the error tree may be reached so; the
            # error tree itself reaches nothing of ours.
            leaves = level >= 2 if in_core else level >= 1
            if leaves and not (in_core and level == 2 and top in ALLOWED_SIBLINGS):
                offending.append(f"{path.name} imports {'.' * level}{module}")
    assert offending == []
    assert len(checked) > 10  # the glob found the core
