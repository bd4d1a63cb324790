"""The docs' Python examples: found in the Markdown pages (and the README), and run one page
per process.

A page's ```python blocks run in order in one namespace, as one session would run them:
a block may use what an earlier block of its page defined. A block is preceded (last
non-blank line before its fence) by at most one directive, an HTML comment the site does
not show:

* ``<!-- not-run: reason -->``: shown only, never run; the reason is the test's skip reason;
* ``<!-- needs: module[, module] -->``: run once these modules import (a feature on its way),
  skipped with that reason until then;
* ``<!-- worker -->``: from this block on, an in-process Celery worker (threads) serves the
  page's ``app``, as ``celery -A proj worker`` would (one worker per process: Celery's worker
  state is process-wide).

A block with top-level ``await`` or ``async with`` runs on the page's event loop (as in
``python -m asyncio``); the others run in a worker thread, so they may block. Examples say
``redis://localhost:6379/<db>`` (db 0 or 1); :func:`run_page` points them at the given server.

``python -m tests.docs.examples PAGE URL0 URL1`` runs one page with db 0 at URL0 and db 1 at
URL1, every warning an error (as pytest's ``filterwarnings = error``); it exits non-zero with
the traceback, whose lines name the page and line, if a block fails.
"""

from __future__ import annotations

import ast
import gc
import inspect
import re
import sys
import textwrap
import threading
import traceback
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"

_FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})[ \t]*(?P<info>[^`]*?)[ \t]*$")
_COMMENT = re.compile(r"^\s*<!--\s*(?P<body>.*?)\s*-->\s*$")
_DIRECTIVE = re.compile(r"^(?P<name>[a-z-]+)(?::\s*(?P<value>.*))?$")
DIRECTIVES = ("not-run", "needs", "worker")
#: What the examples spell as their Redis server: ``redis://localhost:6379/<db>``.
EXAMPLE_URL = re.compile(r"redis://localhost:6379(?:/(?P<db>\d+))?(?![\d/])")


@dataclass(frozen=True)
class Block:
    """One ```python block of a page."""

    page: str  # relative to the repository root, e.g. "docs/locks.md"
    line: int  # line number of its first code line
    code: str  # dedented; ``line`` is the code's first line in the page
    directive: str | None = None
    value: str = ""

    @property
    def id(self) -> str:
        return f"{self.page}:{self.line}"

    def skip_reason(self) -> str | None:
        """Why the block does not run here, or ``None`` when it runs."""
        if self.directive == "not-run":
            return f"not run: {self.value}"
        if self.directive == "needs":
            missing = [name for name in _names(self.value) if not _importable(name)]
            if missing:
                return f"needs {', '.join(missing)} (not importable yet)"
        return None


def _names(value: str) -> list[str]:
    return [name.strip() for name in value.split(",") if name.strip()]


def _importable(name: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:  # a missing parent package
        return False


def pages() -> list[Path]:
    """Every Markdown page of the site, and the README."""
    return [*sorted(DOCS.rglob("*.md")), ROOT / "README.md"]


def blocks(page: Path) -> list[Block]:
    """The page's ```python blocks, with their directives; ``ValueError`` on a malformed one."""
    rel = page.relative_to(ROOT).as_posix()
    lines = page.read_text().splitlines()
    found: list[Block] = []
    i = 0
    while i < len(lines):
        opening = _FENCE.match(lines[i])
        if opening is None:
            i += 1
            continue
        indent, fence = opening["indent"], opening["fence"]
        language = opening["info"].split()[0] if opening["info"] else ""
        end = i + 1
        while end < len(lines):
            closing = _FENCE.match(lines[end])
            if (
                closing is not None
                and closing["fence"][0] == fence[0]
                and len(closing["fence"]) >= len(fence)
                and not closing["info"]
            ):
                break
            end += 1
        else:
            raise ValueError(f"{rel}:{i + 1}: the fence opened here is never closed")
        if language == "python":
            body = [line[len(indent) :] if line.startswith(indent) else line for line in lines]
            code = textwrap.dedent("\n".join(body[i + 1 : end]))
            directive, value = _directive_before(lines, i, rel)
            found.append(Block(rel, i + 2, code + "\n", directive, value))
        i = end + 1
    return found


def _directive_before(lines: list[str], fence: int, rel: str) -> tuple[str | None, str]:
    before = fence - 1
    while before >= 0 and not lines[before].strip():
        before -= 1
    comment = _COMMENT.match(lines[before]) if before >= 0 else None
    if comment is None:
        return None, ""
    directive = _DIRECTIVE.match(comment["body"])
    if directive is None or directive["name"] not in DIRECTIVES:
        raise ValueError(
            f"{rel}:{before + 1}: a comment before a python block must be one of "
            f"{', '.join(DIRECTIVES)}, got {comment['body']!r}"
        )
    name, value = directive["name"], (directive["value"] or "").strip()
    if name in ("not-run", "needs") and not value:
        raise ValueError(f"{rel}:{before + 1}: {name} needs a value (a reason, modules)")
    return name, value


def substitute(code: str, url0: str, url1: str) -> str:
    """The example's Redis URLs pointed at the test server's two databases."""

    def replace(match: re.Match[str]) -> str:
        db = match["db"] or "0"
        if db not in ("0", "1"):
            raise ValueError(f"examples use databases 0 and 1 of localhost:6379, not {db}")
        return url0 if db == "0" else url1

    return EXAMPLE_URL.sub(replace, code)


# -- running a page (in a process of its own) ------------------------------------------------


class ExampleFailed(Exception):
    """A block raised: the message is its traceback from the block's own frame on."""

    def __init__(self, block: Block, error: Exception) -> None:
        tb = error.__traceback__
        while tb is not None and tb.tb_frame.f_code.co_filename != block.page:
            tb = tb.tb_next  # the harness's frames tell the reader nothing
        shown = "".join(traceback.format_exception(type(error), error, tb or error.__traceback__))
        super().__init__(f"the example at {block.id} failed:\n{shown}")


def _compile(block: Block, url0: str, url1: str) -> Any:
    source = "\n" * (block.line - 1) + substitute(block.code, url0, url1)
    return compile(
        source, block.page, "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT, dont_inherit=True
    )


def _close(namespace: dict[str, Any]) -> Any:
    """Close what the examples left open: backends, and the Celery apps' lock stores."""
    from celery import Celery

    from celery_unique import AsyncRedisBackend, RedisBackend
    from celery_unique.celery.store import backends

    async def close() -> None:
        for value in list(namespace.values()):
            if isinstance(value, RedisBackend):
                value.close()
            elif isinstance(value, AsyncRedisBackend):
                await value.aclose()
            elif isinstance(value, Celery):
                await backends.aclose(value)
                backends.close(value)
                value.close()

    return close()


async def run_page(page: Path, url0: str, url1: str) -> None:
    """Run the page's blocks in order in one namespace (see the module docstring)."""
    import anyio.to_thread
    from celery.contrib.testing.worker import start_worker

    runnable = [block for block in blocks(page) if block.skip_reason() is None]
    # As a script run as `python proj.py` would be: tasks are named after the app (proj.task).
    namespace: dict[str, Any] = {"__name__": "__main__"}
    worker: Any = None
    try:
        for block in runnable:
            code = _compile(block, url0, url1)
            if block.directive == "worker":
                if worker is not None:
                    raise ValueError(f"{block.id}: a second worker directive on one page")
                worker = start_worker(
                    namespace["app"],
                    pool="threads",
                    concurrency=4,
                    perform_ping_check=False,
                    shutdown_timeout=30,
                )
                worker.__enter__()
            try:
                if code.co_flags & inspect.CO_COROUTINE:
                    await eval(code, namespace)
                else:
                    await anyio.to_thread.run_sync(exec, code, namespace)
            except Exception as exc:
                raise ExampleFailed(block, exc) from None
    finally:
        if worker is not None:
            worker.__exit__(None, None, None)
        await _close(namespace)


def main(argv: list[str]) -> int:
    import anyio

    page, url0, url1 = Path(argv[0]).resolve(), argv[1], argv[2]
    unraisable: list[str] = []

    def hook(info: Any) -> None:
        unraisable.append(f"{info.err_msg or 'Exception ignored in'}: {info.exc_value!r}")

    sys.unraisablehook = hook
    threading.excepthook = lambda info: unraisable.append(f"in a thread: {info.exc_value!r}")
    warnings.simplefilter("error")
    # As pyproject.toml's pytest filterwarnings: Celery's Redis result backend still calls
    # commands redis-py 8 deprecates (setex ...).
    warnings.filterwarnings("ignore", "Call to deprecated", DeprecationWarning)
    try:
        anyio.run(run_page, page, url0, url1, backend="asyncio")
    except ExampleFailed as failed:
        print(failed, file=sys.stderr)
        return 1
    # Celery's Redis result backend has no close(): what it leaves is collected unclosed,
    # as the Celery tests' fixtures do too; anything else left behind is an error.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        gc.collect()
    if unraisable:
        print("\n".join(unraisable), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
