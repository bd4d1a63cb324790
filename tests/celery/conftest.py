"""A real Celery worker on the test Redis: in-process (threads) for most tests."""

from __future__ import annotations

import gc
import os
import signal
import subprocess
import sys
import tempfile
import uuid
import warnings
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from subprocess import STDOUT, Popen, TimeoutExpired
from typing import Any

import pytest
from celery import Celery
from celery.contrib.testing.worker import start_worker

from tests.celery import app as test_app


@pytest.fixture(scope="session")
def celery_app(redis_url: str) -> Iterator[Any]:
    test_app.configure(redis_url)
    yield test_app.app
    # An AsyncResult unsubscribes from its result channel when collected: let that happen
    # now, while Redis still runs, not at interpreter exit after it has stopped. Celery's
    # Redis result backend has no close(), so what it leaves is collected here unclosed, as
    # in ``make_app`` (seen about one run in three, a socket of the session's Redis).
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        gc.collect()


@pytest.fixture(scope="session")
def worker(celery_app: Any) -> Iterator[Any]:
    with start_worker(
        celery_app, pool="threads", concurrency=4, perform_ping_check=False, shutdown_timeout=30
    ) as running:
        yield running


MakeApp = Callable[..., Celery]


@pytest.fixture
def make_app() -> Iterator[MakeApp]:
    """Throwaway Celery apps, closed afterwards with their lock backends (no stray sockets)."""
    from celery_unique.celery.store import backends

    made: list[Celery] = []

    def make(**conf: Any) -> Celery:
        # Not made current: shared tasks (the compat READMEs use them) resolve to the test app.
        app = Celery(f"cfg{uuid.uuid4().hex[:6]}", set_as_current=False)
        app.conf.update(broker_connection_retry_on_startup=True, **conf)
        made.append(app)
        return app

    yield make
    for app in made:
        backends.close(app)
        app.close()
    made.clear()
    # Celery's Redis result backend has no close(): collect what these apps leave now, rather
    # than at some later test's garbage collection, where its unclosed sockets would warn.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        gc.collect()


def run_with_shim(directory: Path, old_name: str, layer: str, code: str) -> str:
    """Run ``code`` in a fresh interpreter beside the documented shim module ``old_name``.py
    (which installs ``celery_unique.compat.<layer>`` under that name); returns its stdout."""
    (directory / f"{old_name}.py").write_text(
        f"from celery_unique.compat.{layer} import install_as\n\ninstall_as(__name__)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=directory,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


ROOT = Path(__file__).resolve().parents[2]


@contextmanager
def celery_process(
    redis_url: str, *args: str, env: Mapping[str, str] | None = None
) -> Iterator[tuple[Popen[bytes], Callable[[], str]]]:
    """``celery -A tests.celery.app <args>`` (a worker, beat) in a subprocess on the test
    Redis, in a process group of its own; yields it and a function that returns the end of
    its log. When the block ends, that group alone is stopped (SIGTERM, then SIGKILL)."""
    env = {**os.environ, "CELERY_UNIQUE_TEST_REDIS_URL": redis_url, **(env or {})}
    with tempfile.TemporaryFile() as log:

        def tail() -> str:
            log.seek(0)
            return log.read().decode(errors="replace")[-3000:]

        process = Popen(
            [sys.executable, "-m", "celery", "-A", "tests.celery.app", *args],
            env=env,
            cwd=ROOT,
            start_new_session=True,
            stdout=log,
            stderr=STDOUT,
        )
        try:
            yield process, tail
        finally:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
                try:
                    process.wait(15)
                except TimeoutExpired:
                    os.killpg(process.pid, signal.SIGKILL)
                    process.wait()


@contextmanager
def worker_process(
    redis_url: str,
    *,
    concurrency: int = 1,
    env: Mapping[str, str] | None = None,
    pool: str = "prefork",
) -> Iterator[tuple[Popen[bytes], str]]:
    """A worker (prefork unless ``pool`` says otherwise) in a subprocess (its own process
    group) on a queue of its own."""
    queue = f"q-{uuid.uuid4().hex[:8]}"
    args = [
        "worker",
        f"--pool={pool}",
        f"--concurrency={concurrency}",
        "-Q",
        queue,
        "-n",
        f"{queue}@%h",
        "--without-gossip",
        "--without-mingle",
        "--without-heartbeat",
        "-l",
        "warning",
    ]
    with celery_process(redis_url, *args, env=env) as (process, tail):
        ready = test_app.slow.apply_async((uuid.uuid4().hex, 0.0), queue=queue)
        try:
            ready.get(timeout=60)
        except Exception:
            raise RuntimeError(f"worker did not start: {tail()}") from None
        yield process, queue
