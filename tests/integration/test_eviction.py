"""A lock store that can evict keys gets one warning at first use; one that cannot, or that
refuses CONFIG, none, and no error either."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest

from celery_unique.testing import RedisServer, running_cluster, running_redis
from tests.conftest import MakeBackend

pytestmark = pytest.mark.anyio


def warnings_of(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "celery_unique" and "maxmemory-policy" in r.getMessage()
    ]


async def use(backend: object) -> None:
    for i in range(3):
        assert (await backend.acquire_or_owner(f"job{i}", "me", 10)).acquired  # type: ignore[attr-defined]
    assert await backend.lock("other", ttl=10).acquire()  # type: ignore[attr-defined]


@pytest.fixture
def server(request: pytest.FixtureRequest) -> Iterator[RedisServer]:
    with running_redis(**request.param) as running:
        yield running


@pytest.mark.parametrize(
    "server",
    [
        {"args": ["--maxmemory-policy", "volatile-lru"]},
        {"args": ["--maxmemory-policy", "allkeys-lfu"]},
    ],
    indirect=True,
    ids=["volatile-lru", "allkeys-lfu"],
)
async def test_an_evicting_policy_is_warned_about_once_per_backend(
    make_backend: MakeBackend, server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="celery_unique")
    await use(make_backend(server.url))
    (warning,) = warnings_of(caplog)
    policy = str(server.command("CONFIG", "GET", "maxmemory-policy")[1])  # type: ignore[index]
    assert f"maxmemory-policy {policy}" in warning
    assert "noeviction" in warning and "of their own" in warning  # what to do about it
    await use(make_backend(server.url, key_prefix="again:"))  # another backend checks itself
    assert len(warnings_of(caplog)) == 2


NO_WARNING = [
    {},  # noeviction, the default
    # CONFIG refused: a user without it, and a server that renamed it away.
    {
        "args": ["--maxmemory-policy", "allkeys-lru"],
        "users": ["default off", "app on >pw ~* +@all -config"],
        "auth": ("app", "pw"),
    },
    {"args": ["--maxmemory-policy", "allkeys-lru", "--rename-command", "CONFIG", ""]},
]


@pytest.mark.parametrize(
    "server", NO_WARNING, indirect=True, ids=["noeviction", "noperm", "renamed"]
)
async def test_no_warning_and_no_error_without_an_evicting_policy_to_read(
    make_backend: MakeBackend, server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="celery_unique")
    await use(make_backend(server.url))
    assert warnings_of(caplog) == []


@pytest.mark.parametrize("flavour", ["sync", "async"])  # a cluster is refused under trio
async def test_a_cluster_whose_nodes_refuse_config_gives_no_warning_and_no_error(
    make_backend: MakeBackend, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="celery_unique")
    args = ["--maxmemory-policy", "allkeys-lru", "--rename-command", "CONFIG", ""]
    with running_cluster(3, 0, args=args) as cluster:
        await use(make_backend(cluster.url, cluster=True))
    assert warnings_of(caplog) == []
