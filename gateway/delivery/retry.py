"""When to try a failed delivery again, and when to give up: exponential backoff with jitter.

Pure: no reactor, no clock reads, no global random state. The caller passes the current time
(seconds, any epoch, the same one for every argument) and a `rand` function returning a float
in [0, 1) (`random.Random(seed).random` in tests, `random.random` in production).

The schedule after the n-th failed attempt (n = 1 after the first failure):

    ceiling(n) = min(cap, base * factor ** (n - 1))
    delay(n)   = ceiling(n)                              jitter "none"
               = uniform(0, ceiling(n))                  jitter "full"  (the default)
               = ceiling(n) / 2 + uniform(0, ceiling(n) / 2)   jitter "equal"

"Full" jitter spreads retries of many deliveries that failed together (a peer outage) over
the whole window, so they do not come back in one burst; "equal" keeps at least half the
ceiling, for peers that need a minimum pause.

A peer may ask for a pause (HTTP Retry-After on a 429 or 503, `retry_after`): the retry then
comes no earlier than it asks, and no later than `cap` after the failure, whatever it asks.

Giving up (`next_attempt` returns None, the delivery becomes a dead letter):
- `max_attempts`: after that many attempts in total (the first one included) have failed;
- `max_age`: once `now - first_attempt_at >= max_age`. Before that, a retry that would fall
  after the deadline is moved to the deadline itself, so the last attempt happens at the age
  limit rather than the delivery giving up early with time left.
Both None (the default): retry for ever, at most `cap` seconds apart.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from datetime import timezone
from email.utils import parsedate_to_datetime
from dataclasses import dataclass
from typing import Any

JITTER_MODES = ("full", "equal", "none")

Rand = Callable[[], float]


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with jitter, a cap, and optional give-up limits (see module doc)."""

    base: float = 1.0
    factor: float = 2.0
    cap: float = 300.0
    jitter: str = "full"
    max_attempts: int | None = None
    max_age: float | None = None

    def __post_init__(self) -> None:
        _check_positive("base", self.base)
        _check_finite("factor", self.factor)
        if self.factor < 1:
            raise ValueError(f"factor must be at least 1 (no shrinking backoff), not {self.factor!r}")
        _check_positive("cap", self.cap)
        if self.cap < self.base:
            raise ValueError(f"cap ({self.cap!r}) must not be below base ({self.base!r})")
        if self.jitter not in JITTER_MODES:
            raise ValueError(
                f"jitter must be one of {', '.join(JITTER_MODES)}, not {self.jitter!r}"
            )
        if self.max_attempts is not None:
            if not _is_int(self.max_attempts) or self.max_attempts < 1:
                raise ValueError(
                    f"max_attempts must be a whole number of at least 1 or None, "
                    f"not {self.max_attempts!r}"
                )
        if self.max_age is not None:
            _check_positive("max_age", self.max_age)

    def ceiling(self, attempt: int) -> float:
        """The delay after failed attempt number `attempt` before jitter: base·factor^(n-1), capped."""
        _check_attempt(attempt)
        try:
            raw = self.base * self.factor ** (attempt - 1)
        except OverflowError:  # factor ** huge: long past the cap
            return self.cap
        return min(self.cap, raw)

    def delay(self, attempt: int, rand: Rand) -> float:
        """Seconds to wait after failed attempt number `attempt` (1 = the first failure).

        Raises ValueError for an attempt below 1 or a `rand` result outside [0, 1).
        """
        ceiling = self.ceiling(attempt)
        if self.jitter == "none":
            return ceiling
        r = _draw(rand)
        if self.jitter == "full":
            return ceiling * r
        half = ceiling / 2
        return half + half * r

    def next_attempt(
        self, now: float, attempt: int, first_attempt_at: float, rand: Rand,
        pause: float | None = None,
    ) -> float | None:
        """When to try again after failed attempt number `attempt`, or None to give up.

        `now` is when the attempt failed and `first_attempt_at` when the first attempt was
        made (a clock skew between nodes that puts it slightly after `now` is tolerated).
        `pause`: the seconds the peer asked to be left alone (Retry-After), honoured up to
        `cap`.
        """
        _check_finite("now", now)
        _check_finite("first_attempt_at", first_attempt_at)
        _check_attempt(attempt)
        if self.max_attempts is not None and attempt >= self.max_attempts:
            return None
        delay = self.delay(attempt, rand)
        if pause is not None and pause > delay:
            delay = min(pause, self.cap)
        at = now + delay
        if self.max_age is not None:
            deadline = first_attempt_at + self.max_age
            if now >= deadline:
                return None
            at = min(at, deadline)
        return at


def retry_after(value: str | None, now: float) -> float | None:
    """The pause an HTTP Retry-After header value asks for, in seconds from `now` (epoch
    seconds): delay-seconds or an HTTP-date (RFC 9110, 10.2.3); None when absent or unreadable."""
    if not value:
        return None
    value = value.strip()
    if value.isascii() and value.isdigit():
        return float(min(int(value[:12]), 10 ** 9))
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if when.tzinfo is None:  # RFC 9110 dates are GMT
        when = when.replace(tzinfo=timezone.utc)
    return max(0.0, when.timestamp() - now)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_finite(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, not {value!r}")


def _check_positive(name: str, value: Any) -> None:
    _check_finite(name, value)
    if value <= 0:
        raise ValueError(f"{name} must be positive, not {value!r}")


def _check_attempt(attempt: Any) -> None:
    if not _is_int(attempt) or attempt < 1:
        raise ValueError(f"attempt must be a whole number of at least 1, not {attempt!r}")


def _draw(rand: Rand) -> float:
    r = rand()
    if isinstance(r, bool) or not isinstance(r, (int, float)) or not 0 <= r < 1:
        raise ValueError(f"rand() must return a number in [0, 1), returned {r!r}")
    return float(r)
