"""Key layout: one cluster slot per lock, whatever the name; prefixes validated."""

from __future__ import annotations

import pytest
from redis.crc import key_slot

from celery_unique import ConfigurationError
from celery_unique._keys import KeySpace

NAMES = ["report:42", "", "{", "}", "}{", "a{b}c", "{x}", "{}", "ünï cödé", "a" * 500, "}x{y}"]


@pytest.mark.parametrize("name", NAMES)
def test_lock_and_fence_share_one_cluster_slot(name: str) -> None:
    keys = KeySpace("app:").lock(name)
    assert keys.lock != keys.fence
    assert key_slot(keys.lock.encode()) == key_slot(keys.fence.encode())


def test_distinct_names_give_distinct_keys() -> None:
    space = KeySpace()
    locks = [space.lock(name).lock for name in NAMES]
    assert len(set(locks)) == len(NAMES)


def test_plain_names_stay_readable_in_the_key() -> None:
    assert KeySpace("app:").lock("report:42").lock == "app:lock:{report:42}"


@pytest.mark.parametrize("prefix", ["a{b:", "}:", 5])
def test_prefix_with_braces_or_of_wrong_type_is_refused(prefix: object) -> None:
    with pytest.raises(ConfigurationError, match="key_prefix"):
        KeySpace(prefix)  # type: ignore[arg-type]


def test_lock_name_must_be_text() -> None:
    with pytest.raises(ConfigurationError, match="lock name"):
        KeySpace().lock(b"x")  # type: ignore[arg-type]
