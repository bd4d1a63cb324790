"""Unique tasks inside canvases, through a real worker: a duplicate member of a group or a
chord follows its holder under its own id, so nothing waits for ever and no callback is lost,
while the work still runs once."""

from __future__ import annotations

import uuid

import pytest
import redis
from celery import chord, group

from tests.celery import app as t
from tests.celery.observe import publishes
from tests.conftest import lock_key
from tests.helpers import wait_until

pytestmark = pytest.mark.usefixtures("worker")


@pytest.fixture
def tag() -> str:
    return uuid.uuid4().hex


def test_a_duplicate_group_member_yields_the_holders_result_under_its_own_id(tag: str) -> None:
    with publishes("t.slow", tag) as sent:
        grouped = group(t.slow.s(tag, 0.3), t.slow.s(tag, 0.3)).apply_async()
    assert grouped.get(timeout=30) == [tag, tag]
    assert sent == [grouped.results[0].id]  # the work was published once...
    assert t.runs(tag) == 1  # ...and ran once
    assert grouped.results[1].id != grouped.results[0].id


def test_a_chord_whose_header_holds_duplicates_completes(tag: str) -> None:
    other = uuid.uuid4().hex
    header = [t.slow.s(tag, 0.3), t.slow.s(tag, 0.3), t.slow.s(other, 0.0), t.slow.s(tag, 0.3)]
    result = chord(header)(t.collect.s())
    assert result.get(timeout=30) == [tag, tag, other, tag]
    assert (t.runs(tag), t.runs(other)) == (1, 1)


def test_a_duplicate_chord_body_follows_the_running_holder(tag: str) -> None:
    holder = t.by_name_slow.apply_async(kwargs={"tag": tag, "seconds": 1.0})
    wait_until(lambda: t.runs(tag) == 1)  # running: the body will be its duplicate
    other = uuid.uuid4().hex
    result = chord([t.slow.s(other, 0.0)])(t.by_name_slow.s(tag=tag))
    assert result.get(timeout=30) == tag  # the holder's result, under the chord's own id
    assert result.id != holder.id
    assert t.runs(tag) == 1


def test_a_duplicates_callbacks_run_once_on_the_holders_outcome(tag: str) -> None:
    holder = t.slow.apply_async((tag, 0.5))
    duplicate = t.slow.apply_async((tag, 0.5), link=t.called_back.s(tag))
    assert duplicate.id != holder.id  # a follower of its own, carrying the callback
    assert duplicate.get(timeout=30) == holder.get(timeout=30) == tag
    wait_until(lambda: t.calls(tag) == [tag])
    assert t.runs(tag) == 1


def test_a_plain_duplicate_still_gets_the_holders_result_and_publishes_nothing(tag: str) -> None:
    holder = t.slow.apply_async((tag, 0.3))
    with publishes("celery_unique.follow", holder.id) as followers:
        assert t.slow.apply_async((tag, 0.3)).id == holder.id
    assert followers == []


def test_an_applied_instance_that_lost_its_key_follows_the_holder(
    tag: str, client: redis.Redis
) -> None:
    """Its key went to another instance before it started (its queued key expired, or its
    worker died after the take-over): callers were answered with its id, so it yields the
    holder's result instead of none, and the work still runs once."""
    key = lock_key("cut:", t.by_name_slow.unique_key((), {}))
    late = t.by_name_slow.apply_async(kwargs={"tag": tag, "seconds": 0.1}, countdown=1.0)
    client.delete(key)  # as if it had expired
    holder = t.by_name_slow.apply_async(kwargs={"tag": tag, "seconds": 3.0})  # runs 3 s
    assert holder.id != late.id
    assert late.get(timeout=30) == holder.get(timeout=30) == tag
    assert t.runs(tag) == 1


def test_an_applied_instance_whose_holder_never_runs_runs_the_work_itself(
    tag: str, client: redis.Redis
) -> None:
    """The holder it found was never published (a producer whose take Redis answered too
    late told its caller so, and its clean-up freed the key later): once that holder holds
    no key and has no result, the follower applies the work under its own id."""
    key = lock_key("cut:", t.by_name_slow.unique_key((), {}))
    late = t.by_name_slow.apply_async(kwargs={"tag": tag, "seconds": 0.1}, countdown=1.0)
    phantom = uuid.uuid4().hex
    client.set(key, f"1:{phantom}", px=3000)  # as if a phantom's take replaced its expired key
    assert late.get(timeout=30) == tag  # the work ran under the follower's (its own) id
    assert t.runs(tag) == 1
    assert client.get(key) is None  # and the run freed its key


def test_a_follower_waits_for_a_retrying_holder(tag: str) -> None:
    """A holder in RETRY runs again: its follower waits for that run, not fails."""
    holder = t.retrying.apply_async((tag, 2, 0.5))
    wait_until(lambda: t.runs(tag) >= 1)  # it has run once, and retries
    duplicate = t.retrying.apply_async((tag, 2, 0.5), link=t.called_back.s(tag))
    assert duplicate.id != holder.id  # a follower, for the callback
    assert duplicate.get(timeout=30) == holder.get(timeout=30)
    wait_until(lambda: t.calls(tag) == [holder.get(timeout=1)])
