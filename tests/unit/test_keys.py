"""Key layout: one cluster slot per lock, whatever the name; prefixes validated."""

from __future__ import annotations

import hashlib
import inspect
import json
import uuid
from collections.abc import Callable
from typing import Any

import pytest
from redis.crc import key_slot

from celery_unique import ConfigurationError
from celery_unique.core.arguments import ArgumentKey, canonical_json
from celery_unique.core.keys import KeySpace

NAMES = ["report:42", "", "{", "}", "}{", "a{b}c", "{x}", "{}", "ünï cödé", "a" * 500, "}x{y}"]


@pytest.mark.parametrize("name", NAMES)
def test_a_names_lock_and_rate_keys_share_one_cluster_slot(name: str) -> None:
    space = KeySpace("app:")
    slots = {key_slot(key.encode()) for key in (space.lock(name), *space.rate(name, ["a", "b"]))}
    assert len(slots) == 1


def test_distinct_names_give_distinct_keys() -> None:
    space = KeySpace()
    locks = [space.lock(name) for name in NAMES]
    assert len(set(locks)) == len(NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_a_lock_key_reads_back_as_its_name(name: str) -> None:
    space = KeySpace("app:")
    assert space.lock_name(space.lock(name)) == name
    assert space.lock_name(space.lock(name).encode()) == name
    assert space.lock_name("other:lock:{x}") is None


def test_plain_names_stay_readable_in_the_key() -> None:
    assert KeySpace("app:").lock("report:42") == "app:lock:{report:42}"


def test_the_lock_pattern_matches_exactly_the_names_that_start_so() -> None:
    space = KeySpace("a*p:")
    assert space.lock_pattern("task:t[1]:") == r"a\*p:lock:{task:t\[1\]:*"
    assert space.lock_pattern() == r"a\*p:lock:{*"


@pytest.mark.parametrize("prefix", ["a{b:", "}:", 5])
def test_prefix_with_braces_or_of_wrong_type_is_refused(prefix: object) -> None:
    with pytest.raises(ConfigurationError, match="key_prefix"):
        KeySpace(prefix)  # type: ignore[arg-type]


def test_lock_name_must_be_text() -> None:
    with pytest.raises(ConfigurationError, match="lock name"):
        KeySpace().lock(b"x")  # type: ignore[arg-type]


def _task(a: int, b: str = "x", c: object = None) -> None: ...


def _varargs(a: int, *rest: int, flag: bool = False, **extra: object) -> None: ...


@pytest.mark.parametrize("func", [_task, _varargs])
def test_argument_keys_agree_with_signature_bind(func: Callable[..., None]) -> None:
    key = ArgumentKey("t", func)
    calls: list[tuple[tuple[Any, ...], dict[str, Any]]] = [
        ((1,), {}), ((1, "y"), {}), ((), {"a": 1}), ((1,), {"b": "x"}), ((1, "x", None), {}),
        ((1,), {"c": [1, 2]}),
    ]  # fmt: skip
    for args, kwargs in calls:
        bound = inspect.signature(func).bind(*args, **kwargs)
        bound.apply_defaults()
        expected = hashlib.blake2b(
            canonical_json(dict(bound.arguments)).encode(), digest_size=16
        ).hexdigest()
        assert key(args, kwargs) == f"task:t:{expected}"


def test_spellings_of_one_call_give_one_key() -> None:
    key = ArgumentKey("t", _task)
    assert key((1,), {}) == key((), {"a": 1}) == key((1, "x"), {}) == key((1,), {"c": None})
    assert key((1,), {}) != key((2,), {})
    assert key((1, "x", (1, 2)), {}) == key((1, "x", [1, 2]), {})  # JSON has no tuples


@pytest.mark.parametrize(
    ("args", "kwargs"), [((), {}), ((1, 2, 3, 4), {}), ((1,), {"a": 2}), ((1,), {"zzz": 2})]
)
def test_calls_that_do_not_bind_raise_type_error(
    args: tuple[Any, ...], kwargs: dict[str, Any]
) -> None:
    with pytest.raises(TypeError):
        ArgumentKey("t", _task)(args, kwargs)


def test_unique_on_picks_names_and_rejects_unknown_ones() -> None:
    key = ArgumentKey("t", _task, ["a"])
    assert key((1, "x"), {}) == key((1, "other"), {})
    with pytest.raises(ConfigurationError, match="zzz"):
        ArgumentKey("t", _task, ["zzz"])
    with pytest.raises(ConfigurationError, match="list of argument names"):
        ArgumentKey("t", _task, "a")


def test_a_custom_encoder_handles_what_json_cannot() -> None:
    class UUIDs(json.JSONEncoder):
        def default(self, o: object) -> object:
            return str(o) if isinstance(o, uuid.UUID) else super().default(o)

    value = uuid.uuid4()
    with pytest.raises(ConfigurationError, match="argument 'c' \\(UUID\\)"):
        ArgumentKey("t", _task)((1,), {"c": value})
    assert ArgumentKey("t", _task, encoder=UUIDs)((1,), {"c": value}) == ArgumentKey("t", _task)(
        (1,), {"c": str(value)}
    )
