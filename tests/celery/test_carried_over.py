"""Without unique_backend_url the lock store is Celery's own Redis, and Celery's settings for
it carry over: Sentinel's master name and sentinels' password, TLS files and certificate
checks; unique_backend_options win over them. Django's CELERY_ namespace works throughout."""

from __future__ import annotations

import asyncio
import os
import signal
import ssl
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from celery_unique import RateLimit, RateLimitedTask, RedisBackend, UniqueTask
from celery_unique.celery.store import async_backend_for, backend_for, backends
from celery_unique.compat.singleton import singleton_backend
from celery_unique.testing import SentinelServers, TLSFiles, redis_sentinel, running_redis
from tests.celery.conftest import MakeApp
from tests.helpers import wait_until

SENTINEL_PW = "sentinel-pw"


@pytest.fixture(scope="module")
def sentinel_setup() -> Iterator[SentinelServers]:
    with redis_sentinel(password="data-pw", sentinel_password=SENTINEL_PW) as setup:
        yield setup


def sentinel_options(name: str = "mymaster") -> dict[str, Any]:
    return {"master_name": name, "sentinel_kwargs": {"password": SENTINEL_PW}}


def works(backend: RedisBackend) -> None:
    name = uuid.uuid4().hex
    assert backend.acquire_or_owner(name, "me", 10).acquired
    assert backend.owner(name) == "me"
    assert backend.release(name, "me")


def works_async(app: Any) -> None:
    async def use() -> None:
        backend = async_backend_for(app)
        name = uuid.uuid4().hex
        try:
            assert (await backend.acquire_or_owner(name, "me", 10)).acquired
            assert await backend.release(name, "me")
        finally:
            await backends.aclose(app)

    asyncio.run(use())


def test_a_sentinel_result_backend_carries_its_transport_options_over(
    make_app: MakeApp, sentinel_setup: SentinelServers
) -> None:
    app = make_app(
        broker_url="memory://",
        result_backend=sentinel_setup.url,
        result_backend_transport_options=sentinel_options(),
    )
    works(backend_for(app))
    works_async(app)
    works(singleton_backend(app))  # the compat layer's own backend, built the same way


def test_a_sentinel_broker_carries_its_transport_options_over(
    make_app: MakeApp, sentinel_setup: SentinelServers
) -> None:
    app = make_app(
        broker_url=sentinel_setup.url,
        broker_transport_options=sentinel_options(),
        result_backend="cache+memory://",
    )
    works(backend_for(app))
    works(singleton_backend(app))


def test_unique_backend_options_win_over_what_is_carried_over(
    make_app: MakeApp, sentinel_setup: SentinelServers
) -> None:
    app = make_app(
        broker_url="memory://",
        result_backend=sentinel_setup.url,
        result_backend_transport_options=sentinel_options("no-such-master"),
        unique_backend_options={"master_name": "mymaster", "socket_timeout": 1.5},
        singleton_backend_kwargs={"master_name": "mymaster"},
    )
    backend = backend_for(app)
    assert backend.timeout == 1.5
    works(backend)
    works(singleton_backend(app))


@pytest.fixture(scope="module")
def tls_server(tls: TLSFiles) -> Iterator[str]:
    with running_redis(tls=tls, tls_auth_clients="yes") as server:
        yield server.url


def ssl_options(tls: TLSFiles) -> dict[str, Any]:
    return {"ssl_cert_reqs": "required", **tls.client_kwargs()}


@pytest.mark.parametrize(
    ("query", "use_ssl"),
    [
        ("?ssl_cert_reqs=CERT_REQUIRED", {}),
        ("?ssl_cert_reqs=required", {}),
        ("", {}),
        # As Celery's docs write it: redis_backend_use_ssl={"ssl_cert_reqs": ssl.CERT_REQUIRED}.
        ("", {"ssl_cert_reqs": ssl.CERT_REQUIRED}),
    ],
    ids=["query CERT_REQUIRED", "query required", "no check given", "ssl constant"],
)
def test_a_tls_result_backend_carries_its_ssl_settings_over(
    make_app: MakeApp, tls_server: str, tls: TLSFiles, query: str, use_ssl: dict[str, Any]
) -> None:
    app = make_app(
        broker_url="memory://",
        result_backend=tls_server + query,
        redis_backend_use_ssl={**use_ssl, **tls.client_kwargs()},
    )
    works(backend_for(app))
    works_async(app)


def test_a_tls_broker_carries_broker_use_ssl_over(
    make_app: MakeApp, tls_server: str, tls: TLSFiles
) -> None:
    # redis:// with broker_use_ssl is TLS to Celery and kombu: to the lock store as well.
    app = make_app(
        broker_url=tls_server.replace("rediss://", "redis://"),
        broker_use_ssl=ssl_options(tls),
        result_backend="cache+memory://",
    )
    works(backend_for(app))
    works(singleton_backend(app))


def test_a_wrong_certificate_check_spelling_is_a_configuration_error(
    make_app: MakeApp, tls_server: str
) -> None:
    from celery_unique import ConfigurationError

    app = make_app(broker_url="memory://", result_backend=tls_server + "?ssl_cert_reqs=maybe")
    with pytest.raises(ConfigurationError, match="ssl_cert_reqs must be one of"):
        backend_for(app)


# -- Django's CELERY_ namespace ---------------------------------------------------------------

SETTINGS: dict[str, Any] = {
    "unique_key_prefix": "dj:",
    "unique_ttl": 77,
    "unique_lease": 11,
    "unique_until": "started",
    "unique_on_duplicate": "raise",
    "unique_json_encoder": "json.JSONEncoder",
    "unique_fail_open": True,
    "unique_global_rate_limit": "5/s",
    "unique_rate_limit_max_wait": 9,
    "unique_backend_options": {"socket_timeout": 1.25},
}


def test_every_unique_setting_is_read_in_djangos_namespace(
    make_app: MakeApp, redis_url: str
) -> None:
    namespaced = {f"CELERY_{name.upper()}": value for name, value in SETTINGS.items()}
    namespaced |= {"CELERY_UNIQUE_BACKEND_URL": redis_url, "CELERY_BROKER_URL": "memory://"}
    settings = type("DjangoSettings", (), namespaced)
    app = make_app()
    app.config_from_object(settings, namespace="CELERY")
    for name, value in {**SETTINGS, "unique_backend_url": redis_url}.items():
        assert app.conf.get(name) == value, name
    backend = backend_for(app)
    assert backend.key_prefix == "dj:" and backend.timeout == 1.25
    works(backend)

    @app.task(base=UniqueTask, shared=False, name=f"dj-{uuid.uuid4().hex[:6]}")
    def job(x: int) -> None: ...

    config = job.unique_config
    assert (config.policy.ttl, config.policy.lease, config.policy.until) == (77.0, 11.0, "started")
    assert config.on_duplicate == "raise" and config.fail_open is True
    assert config.backend is backend

    @app.task(base=RateLimitedTask, shared=False, name=f"dj-{uuid.uuid4().hex[:6]}")
    def limited(x: int) -> None: ...

    rate = limited.rate_config
    assert rate.static == (RateLimit(5, per=1),) and rate.max_wait == 9.0
    assert rate.lease == 11.0 and rate.backend is backend


# -- settings as Celery resolves them ---------------------------------------------------------


ENV_APP = """
from celery import Celery

from celery_unique import UniqueTask

app = Celery("envapp")  # nothing configured: CELERY_BROKER_URL comes from the environment


@app.task(base=UniqueTask, name="envapp.double")
def double(x):
    return x * 2
"""


def test_a_broker_given_in_the_environment_is_the_lock_store(
    make_app: MakeApp, redis_url: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Docker and twelve-factor apps: CELERY_BROKER_URL, nothing in the app's settings; the
    producer here, a worker configured the same way in a process of its own."""
    monkeypatch.setenv("CELERY_BROKER_URL", redis_url)
    queue = f"env-{uuid.uuid4().hex}"
    app = make_app(result_backend=None, task_default_queue=queue)
    assert app.conf.get("broker_url") is None  # the raw settings do not have it

    @app.task(base=UniqueTask, shared=False, name="envapp.double")
    def double(x: int) -> int:
        return x * 2

    backend = backend_for(app)
    works(backend)
    first = double.delay(21)
    assert double.delay(21).id == first.id  # a duplicate, answered from that lock store
    key = double.unique_key((21,), {})
    assert backend.owner(key) == first.id
    (tmp_path / "envapp.py").write_text(ENV_APP)
    command = [sys.executable, "-m", "celery", "-A", "envapp", "worker", "--pool=solo"]
    command += ["-Q", queue, "--without-gossip", "--without-mingle", "-l", "warning"]
    path = os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])
    worker = subprocess.Popen(
        command,
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": path},
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_until(lambda: backend.owner(key) is None, timeout=60)  # it ran, and freed it
    finally:
        os.killpg(worker.pid, signal.SIGTERM)
        worker.wait(30)
    assert double.delay(21).id != first.id  # freed on success: a new instance


def test_the_first_url_of_a_broker_failover_list_is_the_lock_store(
    make_app: MakeApp, redis_url: str
) -> None:
    unreachable = "redis://127.0.0.1:1/0"
    for listed in ([redis_url, unreachable], f"{redis_url};{unreachable}"):
        app = make_app(broker_url=listed)
        works(backend_for(app))
