"""Driving a core flow (:data:`~celery_unique.core.steps.Flow`), stated once for every
executor: each step's reply is sent into the flow, the :class:`BackendError` a step caused is
thrown into it (where it may handle it), a :class:`~celery_unique.core.steps.Sleep` is waited
out, and the flow is closed however the drive ends. An executor supplies only how one step is
sent and how a sleep is waited."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from ..core.steps import Call, Eval, Flow, Sleep, Step
from ..errors import BackendError

__all__ = ["adrive", "drive"]

T = TypeVar("T")


def drive(flow: Flow[T], send: Callable[[Eval | Call], Any], sleep: Callable[[float], object]) -> T:
    """``flow``'s result, each step sent with ``send``."""
    try:
        step: Step = next(flow)
        while True:
            if isinstance(step, Sleep):
                sleep(step.seconds)
                step = flow.send(None)
                continue
            try:
                reply = send(step)
            except BackendError as exc:
                step = flow.throw(exc)
            else:
                step = flow.send(reply)
    except StopIteration as done:
        result: T = done.value
        return result
    finally:
        flow.close()


async def adrive(
    flow: Flow[T],
    send: Callable[[Eval | Call], Awaitable[Any]],
    sleep: Callable[[float], Awaitable[object]],
) -> T:
    """:func:`drive` for async executors: ``send`` and ``sleep`` are awaited."""
    try:
        step: Step = next(flow)
        while True:
            if isinstance(step, Sleep):
                await sleep(step.seconds)
                step = flow.send(None)
                continue
            try:
                reply = await send(step)
            except BackendError as exc:
                step = flow.throw(exc)
            else:
                step = flow.send(reply)
    except StopIteration as done:
        result: T = done.value
        return result
    finally:
        flow.close()
