"""Unique tasks whose locks live on a Redis Cluster with replicas, run by a real worker."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from subprocess import Popen
from typing import Any

import pytest
import redis

from celery_unique.celery.store import backends
from celery_unique.core.keys import KeySpace
from celery_unique.testing import ClusterServers, running_cluster
from tests.celery import app as t
from tests.celery.conftest import worker_process


@pytest.fixture(scope="module")
def cluster() -> Iterator[ClusterServers]:
    with running_cluster(3, 1) as running:
        yield running


@pytest.fixture(scope="module")
def on_cluster(cluster: ClusterServers, celery_app: Any) -> Iterator[None]:
    """The test app keeps its locks on the cluster, here and in the worker."""
    conf = t.app.conf
    saved = conf.get("unique_backend_url"), conf.get("unique_backend_options")

    def reset() -> None:
        backends.close(t.app)
        # A task reads its settings (and backend) once: let it read them again.
        t.slow.__dict__.pop("unique_config", None)

    reset()
    conf.update(unique_backend_url=cluster.url, unique_backend_options={"cluster": True})
    try:
        yield
    finally:
        conf.update(unique_backend_url=saved[0], unique_backend_options=saved[1])
        reset()


@pytest.fixture(scope="module")
def cluster_worker(
    redis_url: str, cluster: ClusterServers, on_cluster: None
) -> Iterator[tuple[Popen[bytes], str]]:
    env = {"CELERY_UNIQUE_TEST_CLUSTER_URL": cluster.url}
    with worker_process(redis_url, concurrency=2, env=env) as running:
        yield running


def held(cluster: ClusterServers, task: Any, *args: Any) -> bool:
    key = KeySpace("cut:").lock(task.unique_key(args))
    client = redis.RedisCluster.from_url(cluster.url)
    try:
        return bool(client.exists(key))
    finally:
        client.disconnect_connection_pools()  # type: ignore[no-untyped-call]
        client.close()


def test_a_unique_task_runs_once_with_its_lock_on_the_cluster(
    cluster: ClusterServers, cluster_worker: tuple[Popen[bytes], str]
) -> None:
    _, queue = cluster_worker
    tags = [uuid.uuid4().hex for _ in range(6)]  # keys on several primaries
    firsts = [t.slow.apply_async((tag, 0.5), queue=queue) for tag in tags]
    for tag, first in zip(tags, firsts, strict=True):
        assert held(cluster, t.slow, tag, 0.5)  # taken on the cluster before the publish
        assert t.slow.apply_async((tag, 0.5), queue=queue).id == first.id  # a duplicate
    for first in firsts:
        first.get(timeout=30)
    deadline = time.monotonic() + 10
    for tag in tags:
        while held(cluster, t.slow, tag, 0.5):  # released on success, by the worker
            assert time.monotonic() < deadline, "the lock outlived its run"
            time.sleep(0.02)
        assert t.runs(tag) == 1
