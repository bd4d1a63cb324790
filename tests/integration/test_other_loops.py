"""The async objects on the event loops anyio runs: asyncio (redis.asyncio) and trio (anyio
streams), one backend object for either; outside any event loop, a ConfigurationError that
says what to do, never a bare RuntimeError from an event loop's insides. (The integration and
fault suites run every async test under trio as well: the ``trio`` flavour.)"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import pytest

from celery_unique import AsyncRedisBackend, ConfigurationError

pytest.importorskip("trio", reason="trio is in the test extra")

Use = Callable[[AsyncRedisBackend], Awaitable[Any]]

USES: dict[str, Use] = {
    "lock": lambda b: b.lock("x", ttl=5).acquire(blocking=False),
    "semaphore": lambda b: b.semaphore("s", 2, 5).acquire(blocking=False),
    "rate limiter": lambda b: b.rate_limiter("5/s").hit("k"),
    "owner": lambda b: b.owner("x"),
}


@pytest.mark.parametrize("use", list(USES))
def test_one_backend_object_serves_trio_runs_in_turn(redis_url: str, prefix: str, use: str) -> None:
    """Connections belong to the run that opened them: a later run opens its own, and the
    earlier run's are closed (with no ResourceWarning, which the tests make an error)."""
    backend = AsyncRedisBackend.from_url(redis_url, key_prefix=prefix)

    async def main() -> Any:
        return await USES[use](backend)

    first, second = (anyio.run(main, backend="trio") for _ in range(2))
    assert type(first) is type(second)
    anyio.run(backend.aclose, backend="trio")


@pytest.mark.parametrize("use", list(USES))
def test_outside_any_event_loop_is_a_configuration_error(redis_url: str, use: str) -> None:
    backend = AsyncRedisBackend.from_url(redis_url)
    coroutine = USES[use](backend)
    with pytest.raises(ConfigurationError, match="outside any event loop"):
        coroutine.send(None)  # type: ignore[attr-defined]  # driven by hand: no loop at all
