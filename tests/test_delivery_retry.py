"""Tests for gateway.delivery.retry: backoff growth, cap, jitter bounds, give-up rules, bad input."""
from __future__ import annotations

import math
import random
from datetime import datetime, timezone

import pytest

from gateway.delivery.retry import RetryPolicy, retry_after

DRAWS = 2000


def _rand(seed: int = 20260401):
    return random.Random(seed).random


def test_defaults_are_the_documented_ones():
    """The default policy is base 1 s, factor 2, cap 300 s, full jitter, no give-up limit."""
    policy = RetryPolicy()
    assert (policy.base, policy.factor, policy.cap, policy.jitter) == (1.0, 2.0, 300.0, "full")
    assert policy.max_attempts is None and policy.max_age is None


def test_without_jitter_delays_grow_geometrically_then_stop_at_the_cap():
    """With jitter "none" the delays are base·factor^(n-1): 1, 2, 4, … until the cap."""
    policy = RetryPolicy(base=1.0, factor=2.0, cap=60.0, jitter="none")
    delays = [policy.delay(n, _rand()) for n in range(1, 10)]
    assert delays == [1, 2, 4, 8, 16, 32, 60, 60, 60]


def test_factor_one_gives_a_constant_delay():
    """A factor of 1 is a fixed retry interval."""
    policy = RetryPolicy(base=5.0, factor=1.0, cap=5.0, jitter="none")
    assert {policy.delay(n, _rand()) for n in range(1, 50)} == {5.0}


def test_huge_attempt_numbers_stay_at_the_cap_without_overflow():
    """factor ** attempt overflowing a float still yields the cap (a message retried for years)."""
    policy = RetryPolicy(base=1.0, factor=10.0, cap=300.0, jitter="none")
    assert policy.delay(10_000, _rand()) == 300.0
    assert policy.delay(10**9, _rand()) == 300.0


def test_none_jitter_does_not_call_rand():
    """Jitter "none" is deterministic: rand is never consulted."""
    def no_rand():
        raise AssertionError("rand called")

    assert RetryPolicy(jitter="none").delay(3, no_rand) == 4.0


@pytest.mark.parametrize("attempt", [1, 2, 5, 9, 20])
def test_full_jitter_stays_within_zero_and_the_ceiling(attempt):
    """Full jitter draws in [0, ceiling): never negative, never above the capped delay."""
    policy = RetryPolicy(base=1.0, factor=2.0, cap=300.0, jitter="full")
    ceiling = min(300.0, 2.0 ** (attempt - 1))
    rand = _rand(attempt)
    draws = [policy.delay(attempt, rand) for _ in range(DRAWS)]
    assert all(0 <= d < ceiling for d in draws)
    # Spread over the whole window, not clustered: both ends are reached.
    assert min(draws) < 0.05 * ceiling and max(draws) > 0.95 * ceiling
    assert abs(sum(draws) / DRAWS - ceiling / 2) < 0.05 * ceiling


@pytest.mark.parametrize("attempt", [1, 2, 5, 9, 20])
def test_equal_jitter_stays_within_half_and_the_ceiling(attempt):
    """Equal jitter draws in [ceiling/2, ceiling): always at least half the backoff."""
    policy = RetryPolicy(base=0.5, factor=3.0, cap=120.0, jitter="equal")
    ceiling = min(120.0, 0.5 * 3.0 ** (attempt - 1))
    rand = _rand(100 + attempt)
    draws = [policy.delay(attempt, rand) for _ in range(DRAWS)]
    assert all(ceiling / 2 <= d < ceiling for d in draws)
    assert min(draws) < 0.55 * ceiling and max(draws) > 0.95 * ceiling


def test_jitter_uses_the_rand_given_and_is_reproducible():
    """The same seed gives the same schedule: no hidden global random state."""
    policy = RetryPolicy()
    first = [policy.delay(n, _rand(7)) for n in range(1, 12)]
    second = [policy.delay(n, _rand(7)) for n in range(1, 12)]
    assert first == second
    assert policy.delay(4, lambda: 0.0) == 0.0
    assert policy.delay(4, lambda: 0.5) == 4.0
    assert RetryPolicy(jitter="equal").delay(4, lambda: 0.0) == 4.0


def test_next_attempt_is_now_plus_delay():
    """Without limits, next_attempt is now + delay, for ever."""
    policy = RetryPolicy(jitter="none", cap=30.0)
    assert policy.next_attempt(1000.0, 1, 999.0, _rand()) == 1001.0
    assert policy.next_attempt(1000.0, 3, 990.0, _rand()) == 1004.0
    assert policy.next_attempt(1e9, 10_000, 0.0, _rand()) == 1e9 + 30.0


def test_max_attempts_counts_every_attempt_including_the_first():
    """With max_attempts=3: retries after failures 1 and 2, dead letter after failure 3."""
    policy = RetryPolicy(jitter="none", max_attempts=3)
    assert policy.next_attempt(10.0, 1, 10.0, _rand()) == 11.0
    assert policy.next_attempt(11.0, 2, 10.0, _rand()) == 13.0
    assert policy.next_attempt(13.0, 3, 10.0, _rand()) is None
    assert policy.next_attempt(13.0, 4, 10.0, _rand()) is None


def test_max_attempts_one_never_retries():
    """max_attempts=1: the first failure is final."""
    assert RetryPolicy(max_attempts=1).next_attempt(5.0, 1, 5.0, _rand()) is None


def test_max_age_gives_up_at_the_deadline_and_clamps_the_last_retry_to_it():
    """A retry that would fall after first_attempt_at + max_age is moved to the deadline;
    a failure at or after the deadline gives up."""
    policy = RetryPolicy(base=10.0, factor=2.0, cap=300.0, jitter="none", max_age=100.0)
    assert policy.next_attempt(50.0, 1, 0.0, _rand()) == 60.0
    assert policy.next_attempt(95.0, 3, 0.0, _rand()) == 100.0  # 95 + 40 clamped
    assert policy.next_attempt(100.0, 4, 0.0, _rand()) is None
    assert policy.next_attempt(250.0, 5, 0.0, _rand()) is None


def test_max_age_tolerates_a_first_attempt_recorded_slightly_in_the_future():
    """Clock skew between nodes (first_attempt_at > now) does not raise."""
    policy = RetryPolicy(jitter="none", max_age=60.0)
    assert policy.next_attempt(100.0, 1, 100.5, _rand()) == 101.0


def test_both_limits_apply_whichever_comes_first():
    """max_attempts and max_age together: the first limit reached ends the retries."""
    policy = RetryPolicy(jitter="none", max_attempts=5, max_age=1000.0)
    assert policy.next_attempt(10.0, 5, 0.0, _rand()) is None  # attempts
    assert policy.next_attempt(1000.0, 2, 0.0, _rand()) is None  # age


def test_a_full_schedule_with_seeded_jitter_is_monotonic_and_bounded():
    """Simulating a delivery failing every time: attempts are increasing, gaps within the cap,
    and it gives up exactly at max_attempts."""
    policy = RetryPolicy(base=1.0, factor=2.0, cap=20.0, jitter="full", max_attempts=12)
    rand = _rand(3)
    now, first, times = 0.0, 0.0, [0.0]
    for attempt in range(1, 100):
        at = policy.next_attempt(now, attempt, first, rand)
        if at is None:
            break
        assert now <= at <= now + 20.0
        now = at
        times.append(at)
    assert len(times) == 12
    assert times == sorted(times)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(base=0), "base must be positive"),
        (dict(base=-1.0), "base must be positive"),
        (dict(base=math.nan), "base must be a finite number"),
        (dict(base=math.inf), "base must be a finite number"),
        (dict(base="1"), "base must be a finite number"),
        (dict(base=True), "base must be a finite number"),
        (dict(factor=0.5), "factor must be at least 1"),
        (dict(factor=math.inf), "factor must be a finite number"),
        (dict(cap=0), "cap must be positive"),
        (dict(base=10.0, cap=5.0), r"cap \(5.0\) must not be below base \(10.0\)"),
        (dict(jitter="random"), "jitter must be one of full, equal, none"),
        (dict(jitter=None), "jitter must be one of"),
        (dict(max_attempts=0), "max_attempts must be a whole number of at least 1"),
        (dict(max_attempts=2.5), "max_attempts must be a whole number"),
        (dict(max_attempts=True), "max_attempts must be a whole number"),
        (dict(max_age=0), "max_age must be positive"),
        (dict(max_age=-5), "max_age must be positive"),
        (dict(max_age=math.nan), "max_age must be a finite number"),
    ],
)
def test_invalid_constructor_arguments_raise_clear_value_errors(kwargs, message):
    """Every bad argument raises ValueError naming the argument and the value."""
    with pytest.raises(ValueError, match=message):
        RetryPolicy(**kwargs)


@pytest.mark.parametrize("attempt", [0, -1, 1.5, "2", None, True])
def test_invalid_attempt_numbers_raise(attempt):
    """Attempts are counted from 1; anything else is a caller bug and raises ValueError."""
    policy = RetryPolicy()
    with pytest.raises(ValueError, match="attempt must be a whole number of at least 1"):
        policy.delay(attempt, _rand())
    with pytest.raises(ValueError, match="attempt must be a whole number of at least 1"):
        policy.next_attempt(0.0, attempt, 0.0, _rand())


@pytest.mark.parametrize("value", [1.0, -0.1, 2, math.nan, None, "0.5"])
def test_rand_outside_the_unit_interval_raises(value):
    """A rand returning something outside [0, 1) is refused, not silently stretched."""
    with pytest.raises(ValueError, match=r"rand\(\) must return a number in \[0, 1\)"):
        RetryPolicy(jitter="full").delay(2, lambda: value)


@pytest.mark.parametrize("name", ["now", "first_attempt_at"])
@pytest.mark.parametrize("value", [math.nan, math.inf, None, "12"])
def test_non_finite_times_raise(name, value):
    """Times must be finite numbers."""
    args = dict(now=10.0, first_attempt_at=0.0)
    args[name] = value
    with pytest.raises(ValueError, match=f"{name} must be a finite number"):
        RetryPolicy().next_attempt(args["now"], 1, args["first_attempt_at"], _rand())


def test_a_pause_the_peer_asks_for_is_honoured_up_to_the_cap():
    """Retry-After: the retry comes no earlier than the peer asks, and no later than `cap`
    after the failure, whatever it asks; a shorter pause than the backoff changes nothing."""
    policy = RetryPolicy(base=1.0, factor=2.0, cap=300.0, jitter="none")
    assert policy.next_attempt(1000.0, 1, 1000.0, lambda: 0.5, pause=120.0) == 1120.0
    assert policy.next_attempt(1000.0, 1, 1000.0, lambda: 0.5, pause=86400.0) == 1300.0
    assert policy.next_attempt(1000.0, 5, 1000.0, lambda: 0.5, pause=3.0) == 1016.0
    aged = RetryPolicy(base=1.0, cap=300.0, jitter="none", max_age=60.0)
    assert aged.next_attempt(1000.0, 1, 1000.0, lambda: 0.5, pause=120.0) == 1060.0


@pytest.mark.parametrize("value, pause", [
    ("120", 120.0),
    (" 5 ", 5.0),
    ("0", 0.0),
    ("Sun, 22 Nov 2026 10:02:00 GMT", 120.0),  # an HTTP-date: from now
    ("Sun, 22 Nov 2026 09:00:00 GMT", 0.0),  # already past
    ("9" * 5000, 1e9),  # absurdly long: bounded (the policy's cap bounds it again)
    ("-5", None), ("soon", None), ("", None), (None, None), ("\u0663", None),
])
def test_retry_after_reads_seconds_or_an_http_date(value, pause):
    now = datetime(2026, 11, 22, 10, 0, tzinfo=timezone.utc).timestamp()
    assert retry_after(value, now) == pause
