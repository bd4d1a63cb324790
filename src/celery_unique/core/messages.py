"""What a unique or rate-limited task's message carries for this library, in its headers.

Part of the message format (a rolling upgrade runs two versions against one queue): a header
is added, never renamed, and a missing one always has a meaning (a message sent around
``apply_async``, by ``send_task`` or beat, has none of them).
"""

from __future__ import annotations

__all__ = [
    "BOOKED_HEADER",
    "DEFERRED_HEADER",
    "HOLD_HEADER",
    "KEY_HEADER",
    "SLOT_HEADER",
    "STATE_HEADER",
    "UNREACHABLE_HEADER",
    "WAITED_HEADER",
]

#: The unique key, so the worker never re-derives it from arguments that serialisation may
#: have changed (tuples to lists, datetimes to strings).
KEY_HEADER = "celery_unique_key"
#: Where the instance stands with its key as the message leaves (a ``KeyState`` value):
#: ``queued`` from ``apply_async``, ``handed back`` from a retry, a deferral or a requeue.
#: Missing: ``queued``.
STATE_HEADER = "celery_unique_state"
#: Epoch seconds when the instance's ``unique_ttl`` ends: until then
#: ``unique_until="expired"`` keeps the key, and a hard TTL never renews past it.
HOLD_HEADER = "celery_unique_hold_until"
#: A copy deferred because another delivery of it was running.
DEFERRED_HEADER = "celery_unique_deferred"
#: How often a queued instance waited for a running one (``unique_while_running``): each
#: wait is longer.
WAITED_HEADER = "celery_unique_waited"
#: A copy whose rate-limit slot is booked: the retry count it was booked for (a retry of the
#: run is a new request, which books its own slot).
BOOKED_HEADER = "celery_unique_rate_booked"
#: How often a delivery found its lock store unreachable as it started and was put back (the
#: waits grow with it).
UNREACHABLE_HEADER = "celery_unique_unreachable"
#: A copy whose rate-limit slot is booked: the slot's moment, epoch seconds (a float). A copy
#: that reaches a worker before it waits, or goes back to the queue: a booked slot never runs
#: early, whatever the transport did to the countdown.
SLOT_HEADER = "celery_unique_rate_slot_at"
