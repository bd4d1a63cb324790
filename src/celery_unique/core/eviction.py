"""Whether the lock store may evict keys: Redis with a ``volatile-*`` or ``allkeys-*``
``maxmemory-policy`` can drop a held lock under memory pressure, and nothing would tell.

:data:`POLICY_CHECK` reads the policy (one ``CONFIG GET``, which an executor sends once, off
its callers' path); :func:`eviction_warning` is what it logs when the policy can evict.
A server that refuses ``CONFIG`` (an ACL without it, a renamed command, a managed service)
gets no warning: there is nothing to go on.
"""

from __future__ import annotations

from typing import Any

from .steps import Call, Op, decode

__all__ = ["POLICY_CHECK", "evicting_policy", "eviction_warning"]


def evicting_policy(reply: Any) -> str | None:
    """The policy in a ``CONFIG GET maxmemory-policy`` reply if it can evict keys, else
    ``None`` (``noeviction``, or a reply without the policy)."""
    if isinstance(reply, dict):  # RESP3, or redis-py's parsed reply
        values = list(reply.values())
    elif isinstance(reply, list | tuple):  # RESP2: [name, value]
        values = list(reply[1::2])
    else:
        return None
    if not values or not isinstance(values[0], bytes | str):
        return None
    policy = decode(values[0])
    return policy if policy.startswith(("volatile-", "allkeys-")) else None


#: One round trip: the server's eviction policy, if it can evict (see :func:`evicting_policy`).
POLICY_CHECK: Op[str | None] = Op(Call(("CONFIG", "GET", "maxmemory-policy")), evicting_policy)


def eviction_warning(policy: str) -> str:
    """The warning for a lock store whose ``maxmemory-policy`` is ``policy``."""
    return (
        f"the Redis that holds the locks has maxmemory-policy {policy}: under memory pressure "
        "it can evict a held lock or unique key, and a second holder would then get it. Set "
        "maxmemory-policy noeviction (writes then fail with an error instead), or keep the "
        "locks on a Redis server of their own"
    )
