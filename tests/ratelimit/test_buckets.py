"""The pure token-bucket arithmetic, without any backend."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from hubgate.ratelimit import buckets
from hubgate.ratelimit.buckets import UNITS_PER_TOKEN, Bucket

NOW_MS = 1_700_000_000_000

bursts = st.integers(min_value=1, max_value=1_000_000)
rates = st.integers(min_value=1, max_value=10_000_000)
levels = st.integers(min_value=-(10**6) * UNITS_PER_TOKEN, max_value=10**6 * UNITS_PER_TOKEN)
elapsed = st.integers(min_value=0, max_value=10**9)


def test_missing_bucket_is_full() -> None:
    assert buckets.refill(None, burst=5, per_minute=60, now_ms=NOW_MS) == Bucket(5 * UNITS_PER_TOKEN, NOW_MS)


def test_refill_is_per_minute_rate() -> None:
    empty = Bucket(0, NOW_MS)
    # 60 per minute is one token per second.
    assert buckets.refill(empty, burst=5, per_minute=60, now_ms=NOW_MS + 1000).level == UNITS_PER_TOKEN
    assert buckets.refill(empty, burst=5, per_minute=60, now_ms=NOW_MS + 500).level == UNITS_PER_TOKEN // 2
    # Capped at the burst.
    assert buckets.refill(empty, burst=5, per_minute=60, now_ms=NOW_MS + 60_000).level == 5 * UNITS_PER_TOKEN


def test_clock_going_backwards_mints_nothing() -> None:
    state = Bucket(UNITS_PER_TOKEN, NOW_MS)
    earlier = buckets.refill(state, burst=5, per_minute=60, now_ms=NOW_MS - 5000)
    assert earlier == state  # same level, and the stored time does not move back


def test_check_reports_exact_wait() -> None:
    state = Bucket(0, NOW_MS)
    outcome = buckets.check(state, cost=1, burst=10, per_minute=7, now_ms=NOW_MS)
    # One token at 7/minute takes 60000/7 = 8571.43 ms: rounded up to 8572.
    assert outcome.wait_ms == 8572
    later = buckets.check(state, cost=1, burst=10, per_minute=7, now_ms=NOW_MS + 8572)
    assert later.wait_ms == 0
    assert buckets.check(state, cost=1, burst=10, per_minute=7, now_ms=NOW_MS + 8571).wait_ms == 1


def test_cost_above_burst_needs_full_bucket_and_leaves_debt() -> None:
    full = buckets.full(100, NOW_MS)
    assert buckets.check(full, cost=250, burst=100, per_minute=6000, now_ms=NOW_MS).wait_ms == 0
    after = buckets.take(full, 250)
    assert buckets.whole_tokens(after) == -150
    # 6000/minute = 100/s: 2.5 s until full again.
    assert buckets.time_to_full_ms(after, burst=100, per_minute=6000) == 2500


def test_adjust_caps_refund_at_capacity() -> None:
    state = Bucket(90 * UNITS_PER_TOKEN, NOW_MS)
    assert buckets.adjust(state, delta_tokens=50, burst=100).level == 100 * UNITS_PER_TOKEN
    assert buckets.adjust(state, delta_tokens=-200, burst=100).level == -110 * UNITS_PER_TOKEN


def test_to_ms_rounds_to_nearest() -> None:
    assert buckets.to_ms(1000.3) == 1_000_300
    # 1000.0 + 0.3 is 1000.2999999999 in binary floating point; flooring would lose a millisecond.
    assert buckets.to_ms(1000.0 + 0.3) == 1_000_300


@given(level=levels, burst=bursts, rate=rates, a=elapsed, b=elapsed)
def test_refill_composes(level: int, burst: int, rate: int, a: int, b: int) -> None:
    state = Bucket(min(level, buckets.capacity(burst)), NOW_MS)
    stepwise = buckets.refill(
        buckets.refill(state, burst=burst, per_minute=rate, now_ms=NOW_MS + a),
        burst=burst,
        per_minute=rate,
        now_ms=NOW_MS + a + b,
    )
    assert stepwise == buckets.refill(state, burst=burst, per_minute=rate, now_ms=NOW_MS + a + b)


@given(level=levels, burst=bursts, rate=rates, back=elapsed)
def test_refill_never_goes_back_in_time(level: int, burst: int, rate: int, back: int) -> None:
    state = Bucket(min(level, buckets.capacity(burst)), NOW_MS)
    refilled = buckets.refill(state, burst=burst, per_minute=rate, now_ms=NOW_MS - back)
    assert refilled == state


@given(level=levels, burst=bursts, rate=rates, a=elapsed)
def test_refill_never_exceeds_capacity_and_is_monotonic(level: int, burst: int, rate: int, a: int) -> None:
    state = Bucket(min(level, buckets.capacity(burst)), NOW_MS)
    refilled = buckets.refill(state, burst=burst, per_minute=rate, now_ms=NOW_MS + a)
    assert state.level <= refilled.level <= buckets.capacity(burst)


@given(level=levels, burst=bursts, rate=rates, cost=st.integers(min_value=0, max_value=2_000_000))
def test_wait_is_exact_to_the_millisecond(level: int, burst: int, rate: int, cost: int) -> None:
    state = Bucket(min(level, buckets.capacity(burst)), NOW_MS)
    wait = buckets.check(state, cost=cost, burst=burst, per_minute=rate, now_ms=NOW_MS).wait_ms
    on_time = buckets.check(state, cost=cost, burst=burst, per_minute=rate, now_ms=NOW_MS + wait)
    assert on_time.wait_ms == 0
    if wait > 0:
        early = buckets.check(state, cost=cost, burst=burst, per_minute=rate, now_ms=NOW_MS + wait - 1)
        assert early.wait_ms > 0


@given(level=levels, burst=bursts, rate=rates)
def test_time_to_full_is_exact(level: int, burst: int, rate: int) -> None:
    state = Bucket(min(level, buckets.capacity(burst)), NOW_MS)
    ttf = buckets.time_to_full_ms(state, burst=burst, per_minute=rate)
    assert buckets.refill(state, burst=burst, per_minute=rate, now_ms=NOW_MS + ttf).level == buckets.capacity(
        burst
    )
    if ttf > 0:
        almost = buckets.refill(state, burst=burst, per_minute=rate, now_ms=NOW_MS + ttf - 1)
        assert almost.level < buckets.capacity(burst)


@given(
    burst=st.integers(min_value=1, max_value=50),
    rate=st.integers(min_value=1, max_value=600),
    gaps=st.lists(st.integers(min_value=0, max_value=5000), min_size=1, max_size=200),
)
def test_long_run_rate_is_bounded(burst: int, rate: int, gaps: list[int]) -> None:
    """Taking one token whenever allowed never admits more than burst + rate * elapsed."""
    state: Bucket | None = None
    now = NOW_MS
    admitted = 0
    for gap in gaps:
        now += gap
        outcome = buckets.check(state, cost=1, burst=burst, per_minute=rate, now_ms=now)
        state = outcome.bucket
        if outcome.wait_ms == 0:
            state = buckets.take(state, 1)
            admitted += 1
    elapsed_ms = now - NOW_MS
    assert admitted * UNITS_PER_TOKEN <= buckets.capacity(burst) + elapsed_ms * rate


def test_ceil_div() -> None:
    assert buckets.ceil_div(0, 7) == 0
    assert buckets.ceil_div(7, 7) == 1
    assert buckets.ceil_div(8, 7) == 2
