"""Executors: the I/O boundary between the sans-IO core and Redis.

:mod:`.protocol` states what an executor does; :class:`RedisExecutor` (sync) and
:class:`AsyncRedisExecutor` (asyncio, batching) do it on redis-py's public API, and
:class:`~.streams.StreamExecutor` on anyio streams with the library's own RESP (what
:class:`AsyncRedisExecutor` hands its calls to under trio).
"""

from __future__ import annotations

from .aio import AsyncRedisExecutor
from .protocol import AsyncExecutor, Executor
from .streams import StreamExecutor
from .sync import RedisExecutor

__all__ = ["AsyncExecutor", "AsyncRedisExecutor", "Executor", "RedisExecutor", "StreamExecutor"]
