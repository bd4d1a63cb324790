"""Under an event loop the async objects do not run on (trio), every one of them says so with
a ConfigurationError naming what to do, never a bare RuntimeError from asyncio's insides."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import pytest

from celery_unique import AsyncRedisBackend, ConfigurationError

pytest.importorskip("trio", reason="trio is in the test extra")

Use = Callable[[AsyncRedisBackend], Awaitable[Any]]

USES: dict[str, Use] = {
    "lock": lambda b: b.lock("x", ttl=5).acquire(),
    "semaphore": lambda b: b.semaphore("s", 2, 5).acquire(blocking=False),
    "rate limiter": lambda b: b.rate_limiter("5/s").hit("k"),
    "owner": lambda b: b.owner("x"),
}


@pytest.mark.parametrize("use", list(USES))
def test_an_async_object_under_trio_is_a_configuration_error(redis_url: str, use: str) -> None:
    async def main() -> None:
        backend = AsyncRedisBackend.from_url(redis_url)
        with pytest.raises(ConfigurationError, match="run on asyncio"):
            await USES[use](backend)

    anyio.run(main, backend="trio")
