"""token_bucket.lua against its contract, called directly."""

from __future__ import annotations

import math
import random
from collections.abc import Iterator, Sequence
from fractions import Fraction
from typing import Any

import pytest
import redis

from celery_unique.core.scripts import TOKEN_BUCKET
from tests.helpers import wait_until

Limit = tuple[int, int, int]  # N tokens per P microseconds, burst B


@pytest.fixture
def r(redis_url: str) -> Iterator[redis.Redis]:
    with redis.Redis.from_url(redis_url) as client:
        yield client


def bucket(r: redis.Redis, keys: list[str], cost: int, *limits: Limit, wait: int = 0) -> Any:
    """One call: ``wait`` is the max wait in microseconds (0: admit now or deny)."""
    args = [cost, wait] + [x for limit in limits for x in limit]
    return r.eval(TOKEN_BUCKET.source, len(keys), *keys, *args)


def redis_us(r: redis.Redis) -> int:
    seconds, micros = r.time()
    return int(seconds) * 1_000_000 + int(micros)


def state(r: redis.Redis, key: str) -> tuple[int, int]:
    """A bucket's stored ``(debt, last)``."""
    debt, last = r.get(key).split()  # type: ignore[union-attr]
    return int(debt), int(last)


HOURLY = (3, 3_600_000_000, 3)  # 3 per hour, burst 3: nothing refills during a test
HOUR = 3_600_000_000
TOKEN = 1_200_000_000  # one HOURLY token comes back every 20 minutes (us)


def test_the_contract_opens_the_script() -> None:
    head = TOKEN_BUCKET.source.split("\n\n")[0]
    for needle in ("-- token_bucket:", "KEYS[i]", "ARGV[1]", "ARGV[2]", "max wait", "returns"):
        assert needle in head


# -- max wait 0: the plain check, as it always was ----------------------------------------------


def test_admits_the_burst_then_denies_without_taking_anything(r: redis.Redis, prefix: str) -> None:
    key = f"{prefix}b"
    assert [bucket(r, [key], 1, HOURLY) for _ in range(3)] == [
        [1, 2, 0, 0],
        [1, 1, 0, 0],
        [1, 0, 0, 0],
    ]
    before = r.get(key)
    denied = bucket(r, [key], 1, HOURLY)
    assert denied[:2] == [0, 0]
    assert TOKEN - 1_000_000 < denied[2] <= TOKEN  # one token comes back in 20 min
    assert denied[3] == 0
    assert r.get(key) == before  # a denied request writes nothing


def test_cost_takes_several_tokens_at_once(r: redis.Redis, prefix: str) -> None:
    key = f"{prefix}b"
    assert bucket(r, [key], 2, HOURLY)[:2] == [1, 1]
    assert bucket(r, [key], 2, HOURLY)[0] == 0
    assert bucket(r, [key], 1, HOURLY)[:2] == [1, 0]


def test_every_limit_must_admit_and_none_is_charged_otherwise(r: redis.Redis, prefix: str) -> None:
    roomy, tight = f"{prefix}{{k}}:roomy", f"{prefix}{{k}}:tight"
    # The roomy limit's spent token takes 6 min to come back, so its bucket (which expires
    # once full again) is still there to show that the denial left it alone.
    ten_per_hour = (10, HOUR, 10)
    one_per_hour = (1, HOUR, 1)
    assert bucket(r, [roomy, tight], 1, ten_per_hour, one_per_hour)[:2] == [1, 0]
    roomy_state = r.get(roomy)
    assert bucket(r, [roomy, tight], 1, ten_per_hour, one_per_hour)[0] == 0
    assert r.get(roomy) == roomy_state  # the roomy bucket was not charged either


def test_refills_and_expires_once_full_again(r: redis.Redis, prefix: str) -> None:
    key = f"{prefix}b"
    fast = (1000, 1_000_000, 10)  # 1000/s: refilled within milliseconds
    # One transaction, so the PTTL is read right after the last hit, however busy the box:
    # a client descheduled for the bucket's 10 ms would find it gone.
    with r.pipeline(transaction=True) as pipe:
        for _ in range(10):
            pipe.eval(TOKEN_BUCKET.source, 1, key, 1, 0, *fast)
        pipe.pttl(key)
        *hits, ttl = pipe.execute()
    assert [hit[0] for hit in hits] == [1] * 10
    assert 0 < ttl <= 10  # full again within 10 ms, then gone
    wait_until(lambda: not r.exists(key))  # on Redis's own clock
    assert bucket(r, [key], 10, fast)[0] == 1  # a full bucket again


def test_never_admits_more_than_burst_plus_rate_times_elapsed(r: redis.Redis, prefix: str) -> None:
    key = f"{prefix}b"
    limit = (3, 1_000_000, 1)  # 3 per second, burst 1: rounding would show up quickly
    start = r.time()
    admitted = sum(bucket(r, [key], 1, limit)[0] for _ in range(3000))
    end = r.time()
    elapsed = (end[0] - start[0]) + (end[1] - start[1]) / 1e6
    assert admitted <= 1 + 3 * elapsed


# -- bookings -----------------------------------------------------------------------------------


def test_a_booking_takes_the_next_slot_and_queues_the_following_ones(
    r: redis.Redis, prefix: str
) -> None:
    key = f"{prefix}b"
    n, p, _ = HOURLY
    for _ in range(3):
        bucket(r, [key], 1, HOURLY)
    first = bucket(r, [key], 1, HOURLY, wait=HOUR)
    assert first[:3] == [1, 0, 0]
    assert TOKEN - 1_000_000 < first[3] <= TOKEN  # when the first token comes back
    # Stored as of now: the wait until the slot, then a full bucket's debt (the burst owed),
    # exact but for the slot's rounding up to a whole microsecond (< n units).
    debt, last = state(r, key)
    assert n * first[3] + 3 * p - n < debt <= n * first[3] + 3 * p
    second = bucket(r, [key], 1, HOURLY, wait=HOUR)
    assert second[:3] == [1, 0, 0]
    assert state(r, key)[1] + second[3] - (last + first[3]) == TOKEN  # one token later
    # The key lives until the bucket is full again: the last slot plus the burst's time.
    assert -1 <= (second[3] + 3 * TOKEN) / 1000 - r.pttl(key) < 100  # counting down since
    # A plain check sees the slots taken: nothing before them.
    denied = bucket(r, [key], 1, HOURLY)
    assert denied[0] == 0
    assert denied[2] >= second[3] + TOKEN - 1_000_000


def test_beyond_the_max_wait_nothing_is_taken_and_the_slot_is_named(
    r: redis.Redis, prefix: str
) -> None:
    key = f"{prefix}b"
    for _ in range(3):
        bucket(r, [key], 1, HOURLY)
    before = r.get(key)
    denied = bucket(r, [key], 1, HOURLY, wait=TOKEN // 2)
    assert denied[0] == 0 and denied[3] == 0
    assert TOKEN - 1_000_000 < denied[2] <= TOKEN  # the slot it would have had
    assert r.get(key) == before
    # The same request with a max wait that reaches the slot books it.
    assert bucket(r, [key], 1, HOURLY, wait=TOKEN)[0] == 1


def test_a_cost_books_several_tokens_from_one_slot(r: redis.Redis, prefix: str) -> None:
    key = f"{prefix}b"
    bucket(r, [key], 3, HOURLY)
    reply = bucket(r, [key], 2, HOURLY, wait=HOUR)
    assert reply[:3] == [1, 0, 0]
    assert 2 * TOKEN - 1_000_000 < reply[3] <= 2 * TOKEN  # two tokens must come back


def slot_of(r: redis.Redis, key: str, reply: Sequence[int]) -> int:
    """A booked reply's slot on Redis's clock: the script's TIME, as stored, plus the delay."""
    return state(r, key)[1] + reply[3]


def test_the_slot_is_the_latest_limit_and_every_bucket_is_advanced_to_it(
    r: redis.Redis, prefix: str
) -> None:
    # A: 1 per 10 min, burst 2; B: 1 per hour, burst 1. Both full. One unit = 1 us here.
    a, b = f"{prefix}{{k}}:a", f"{prefix}{{k}}:b"
    ten_min = 600_000_000
    limit_a, limit_b = (1, ten_min, 2), (1, HOUR, 1)
    assert bucket(r, [a, b], 1, limit_a, limit_b, wait=HOUR) == [1, 0, 0, 0]
    first = state(r, b)[1]
    # A could admit now, B only in an hour: the slot is B's, and A is charged at that slot.
    booked = bucket(r, [a, b], 1, limit_a, limit_b, wait=HOUR)
    assert booked[:2] == [1, 0]
    assert slot_of(r, b, booked) == first + HOUR
    # At the slot A has repaid everything and owes one token: as of now, it owes the wait
    # until the slot plus that token.
    assert state(r, a) == (booked[3] + ten_min, state(r, b)[1])
    assert state(r, b)[0] == booked[3] + HOUR
    assert -1 <= (booked[3] + ten_min) / 1000 - r.pttl(a) < 100
    # Next: A has its second token 10 min before, B its next one only an hour after: B's.
    third = bucket(r, [a, b], 1, limit_a, limit_b, wait=3 * HOUR)
    assert third[0] == 1
    assert slot_of(r, b, third) == first + 2 * HOUR


def test_when_the_other_limit_binds_the_slot_moves_to_it(r: redis.Redis, prefix: str) -> None:
    # A: 1 per 10 min, burst 1; B: 2 per hour, burst 2 (a token per 30 min).
    a, b = f"{prefix}{{k}}:a", f"{prefix}{{k}}:b"
    ten_min, half_hour = 600_000_000, 1_800_000_000
    limit_a, limit_b = (1, ten_min, 1), (2, HOUR, 2)
    assert bucket(r, [a, b], 1, limit_a, limit_b)[:2] == [1, 0]
    first = state(r, a)[1]
    second = bucket(r, [a, b], 1, limit_a, limit_b, wait=HOUR)  # A binds: in 10 min
    assert second[0] == 1
    assert slot_of(r, a, second) == first + ten_min
    # A could go 10 min after that, but B spent both tokens, the first of which is back
    # 30 min after it was taken.
    third = bucket(r, [a, b], 1, limit_a, limit_b, wait=HOUR)
    assert third[0] == 1
    assert slot_of(r, a, third) == first + half_hour


# -- the arithmetic against an independent model ------------------------------------------------


class Model:
    """GCRA as a theoretical arrival time per limit, in exact fractions of a microsecond:
    request k may go at max(now, TAT_i - (B_i - cost) T_i) for every i, and then each
    TAT_i becomes max(TAT_i, slot) + cost T_i. Written apart from the script's integer debts."""

    def __init__(self, limits: Sequence[Limit]) -> None:
        self.limits = limits
        self.tat = [Fraction(0)] * len(limits)

    def slot(self, cost: int, now: int) -> int:
        earliest = max(
            tat - (b - cost) * Fraction(p, n)
            for tat, (n, p, b) in zip(self.tat, self.limits, strict=True)
        )
        return max(now, math.ceil(earliest))

    def book(self, cost: int, slot: int) -> int:
        left = []
        for i, (n, p, b) in enumerate(self.limits):
            self.tat[i] = max(self.tat[i], Fraction(slot)) + cost * Fraction(p, n)
            left.append(math.floor(b - (self.tat[i] - slot) / Fraction(p, n)))
        return min(left)


def test_random_requests_match_the_model_exactly(r: redis.Redis, prefix: str) -> None:
    rng = random.Random(7)
    limits = [(20, 1_000_000, 3), (100, 10_000_000, 5), (3, 1_000_000, 2)]
    keys = [f"{prefix}{{m}}:{i}" for i in range(len(limits))]
    now_, later, denied = 0, 0, 0
    model = Model(limits)
    for step in range(400):
        if step % 50 == 0:  # full buckets again now and then, so that some go at once
            r.delete(*keys)
            model = Model(limits)
        cost = rng.choice([1, 1, 1, 2])
        before = [r.get(key) for key in keys]
        start = redis_us(r)
        guess = model.slot(cost, start) - start
        # No wait, surely long enough, surely too short (unless the wait is short), or any.
        wait = rng.choice([0, guess + 50_000, guess // 2, rng.randrange(2_000_000)])
        reply = bucket(r, keys, cost, *limits, wait=wait)
        end = redis_us(r)
        if reply[0] == 1:
            now = state(r, keys[0])[1]  # the script's own TIME, as it stored it
            slot = model.slot(cost, now)
            assert reply[2:] == [0, slot - now] and slot - now <= wait
            assert reply[1] == model.book(cost, slot)
            for key, tat, (n, _, _) in zip(keys, model.tat, limits, strict=True):
                debt = n * (tat - now)
                assert debt.denominator == 1  # the model agrees the debts are whole
                assert state(r, key) == (int(debt), now)  # exact, as of now
                # The key lives until the bucket is full again (PTTL counts down meanwhile).
                ttl, read = r.pttl(key), redis_us(r)
                if ttl == -2:  # a client slower than the bucket finds it expired: full again
                    assert read >= tat
                else:
                    assert (tat - read) / 1000 - 1 <= ttl <= math.ceil((tat - now) / 1000)
            now_ += slot == now
            later += slot > now
        else:
            denied += 1
            # Nothing taken: every bucket is as it was, or gone because it was full again by
            # now (a bucket expires once repaid, which a slow client can see happen).
            for key, was, (n, _, _) in zip(keys, before, limits, strict=True):
                after = r.get(key)
                if was is not None and after is None:
                    owed, last = (int(x) for x in was.split())
                    assert last + owed / n <= redis_us(r)
                else:
                    assert after == was
            # The script ran between start and end: its slot lies between the model's.
            assert model.slot(cost, end) - end <= reply[2] <= model.slot(cost, start) - start
            assert reply[2] > wait and reply[3] == 0
    assert now_ >= 8 and later >= 50 and denied >= 50  # every path was exercised
