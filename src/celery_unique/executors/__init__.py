"""Executors: the I/O boundary between the sans-IO core and Redis.

:mod:`.protocol` states what an executor does; :class:`RedisExecutor` (sync) and
:class:`AsyncRedisExecutor` (asyncio, batching) do it on redis-py's public API.
"""

from __future__ import annotations

from .aio import AsyncRedisExecutor
from .protocol import AsyncExecutor, Executor
from .sync import RedisExecutor

__all__ = ["AsyncExecutor", "AsyncRedisExecutor", "Executor", "RedisExecutor"]
