"""Token-bucket arithmetic, as pure functions on integers.

A bucket holds up to ``burst`` tokens and refills at ``per_minute`` tokens per minute. To make
the arithmetic exact (and identical in Python and in the Redis Lua scripts, whose numbers are
IEEE doubles) time is counted in whole milliseconds and a bucket's level in *units* of
1/60000 token: a bucket then refills by exactly ``per_minute`` units per millisecond, and
every value is an integer. Doubles represent integers exactly up to 2**53, so the two
implementations agree as long as ``burst * 60000`` and millisecond timestamps stay below it
(bursts up to ~1.5e11 tokens; wall-clock milliseconds are ~1.7e12).

``hubgate.ratelimit.redis_backend`` repeats these functions in Lua; the two must agree, and
``tests/ratelimit/test_lua_parity.py`` runs both on the same inputs.

Rules every caller relies on:

* The clock never goes backwards: a refill uses ``t = max(now, stored_t)``, so a gateway whose
  clock is behind cannot mint tokens by writing an older time.
* A request needs ``min(cost, burst)`` tokens present but is charged its full ``cost``: a cost
  larger than the whole bucket is admitted when the bucket is full and leaves it in debt
  (a negative level) that later requests wait out.
* ``retry_after`` is the exact number of milliseconds until enough tokens are present, rounded
  up: a retry at ``now + retry_after`` succeeds and one a millisecond earlier does not.
"""

from __future__ import annotations

from dataclasses import dataclass

UNITS_PER_TOKEN = 60_000  # milliseconds per minute: a bucket gains `per_minute` units each millisecond


@dataclass(frozen=True, slots=True)
class Bucket:
    """A bucket's level (units; negative while in debt) as of ``at_ms``."""

    level: int
    at_ms: int


def to_ms(seconds: float) -> int:
    """A wall-clock time or duration in seconds, as whole milliseconds (nearest)."""
    # Nearest rather than floor: `now + retry_after` computed in floating point lands a hair
    # below the intended millisecond often enough that flooring would refuse an on-time retry.
    return round(seconds * 1000)


def capacity(burst: int) -> int:
    """A bucket's capacity in units."""
    return burst * UNITS_PER_TOKEN


def full(burst: int, now_ms: int) -> Bucket:
    """A bucket nobody has touched (or whose key expired): full."""
    return Bucket(capacity(burst), now_ms)


def refill(state: Bucket | None, *, burst: int, per_minute: int, now_ms: int) -> Bucket:
    """The bucket as of ``now_ms`` (or of its stored time, if that is later)."""
    if state is None:
        return full(burst, now_ms)
    t = max(now_ms, state.at_ms)
    return Bucket(min(capacity(burst), state.level + (t - state.at_ms) * per_minute), t)


def ceil_div(numerator: int, denominator: int) -> int:
    """Ceiling of ``numerator / denominator`` for a non-negative numerator and positive denominator."""
    return -(-numerator // denominator)


def wait_ms(state: Bucket, *, need_units: int, per_minute: int) -> int:
    """Milliseconds until the bucket holds ``need_units`` (0 if it already does)."""
    if state.level >= need_units:
        return 0
    return ceil_div(need_units - state.level, per_minute)


def need_units(cost: int, burst: int) -> int:
    """Units that must be present to admit ``cost`` tokens (capped at a full bucket)."""
    return min(cost, burst) * UNITS_PER_TOKEN


def take(state: Bucket, cost: int) -> Bucket:
    """The bucket after charging ``cost`` tokens (may go negative)."""
    return Bucket(state.level - cost * UNITS_PER_TOKEN, state.at_ms)


def adjust(state: Bucket, *, delta_tokens: int, burst: int) -> Bucket:
    """The bucket after a refund (positive delta) or a further charge (negative), capped at full."""
    return Bucket(min(capacity(burst), state.level + delta_tokens * UNITS_PER_TOKEN), state.at_ms)


def time_to_full_ms(state: Bucket, *, burst: int, per_minute: int) -> int:
    """Milliseconds until the bucket is full again; its storage may expire then."""
    return wait_ms(state, need_units=capacity(burst), per_minute=per_minute)


def whole_tokens(state: Bucket) -> int:
    """Whole tokens in the bucket (negative while in debt)."""
    return state.level // UNITS_PER_TOKEN


@dataclass(frozen=True, slots=True)
class Check:
    """The outcome of checking one bucket for one request."""

    bucket: Bucket  # refilled to now; charged only if the whole admission goes ahead
    wait_ms: int  # 0 when the bucket allows the request


def check(state: Bucket | None, *, cost: int, burst: int, per_minute: int, now_ms: int) -> Check:
    """Refill a bucket to ``now_ms`` and say how long the request would have to wait."""
    bucket = refill(state, burst=burst, per_minute=per_minute, now_ms=now_ms)
    return Check(bucket, wait_ms(bucket, need_units=need_units(cost, burst), per_minute=per_minute))
