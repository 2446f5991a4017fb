"""Failure policy: Redis killed, paused, erroring and restarted, under each failure mode.

The breaker's clock is a fake advanced by hand; Redis is a private server this test may kill.
Every call is bounded (``quick``) so that a hang fails the test instead of stalling it.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from collections.abc import AsyncIterator, Awaitable
from typing import TypeVar

import pytest
from redis.asyncio import BlockingConnectionPool, Redis

from hubgate.errors import LimiterUnavailable, RateLimited, TooManyConnections, TooManyStreams
from hubgate.ratelimit import (
    CircuitBreaker,
    LimiterStats,
    LimitPolicy,
    MemoryLimiter,
    RedisLimiter,
    ResilientLimiter,
    build_limiter,
)
from hubgate.settings import FailureMode
from tests.support.redis_server import RedisServer

T = TypeVar("T")
NOW = 1_700_000_000.0
TIMEOUT = 0.05
RESET = 2.0


class FakeClock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


async def quick(aw: Awaitable[T], limit: float = 1.0) -> T:
    """Await ``aw`` and fail if it takes a second or more: no call may hang on a dead Redis."""
    return await asyncio.wait_for(aw, timeout=limit)


def make(url: str, mode: FailureMode, clock: FakeClock, *, instances: int = 2) -> ResilientLimiter:
    limiter = build_limiter(
        url, mode=mode, expected_instances=instances, timeout_ms=int(TIMEOUT * 1000), max_connections=8
    )
    assert isinstance(limiter, ResilientLimiter)
    # The factory's limiter, with the breaker's clock swapped for the fake one.
    return ResilientLimiter(
        limiter.primary,
        mode=mode,
        expected_instances=instances,
        timeout=TIMEOUT,
        reset_timeout=RESET,
        clock=clock,
    )


def state(holder: CircuitBreaker | LimiterStats) -> str:
    """The breaker state, read through a call so the type checker does not pin it to a literal."""
    return str(holder.breaker_state if isinstance(holder, LimiterStats) else holder.state)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
async def closed(fresh_redis_server: RedisServer, clock: FakeClock) -> AsyncIterator[ResilientLimiter]:
    limiter = make(fresh_redis_server.url, "closed", clock)
    yield limiter
    await limiter.aclose()


@pytest.fixture
async def local(fresh_redis_server: RedisServer, clock: FakeClock) -> AsyncIterator[ResilientLimiter]:
    limiter = make(fresh_redis_server.url, "local", clock)
    yield limiter
    await limiter.aclose()


# -- the breaker on its own ---------------------------------------------------------------------


def test_breaker_opens_after_consecutive_failures_and_probes_once() -> None:
    breaker = CircuitBreaker(failure_threshold=3, reset_timeout=2.0)
    assert breaker.allow(0.0)
    assert not breaker.record_failure(0.0)
    assert not breaker.record_failure(0.1)
    breaker.record_success()  # a success resets the count
    assert not breaker.record_failure(0.2)
    assert not breaker.record_failure(0.3)
    assert breaker.record_failure(0.4)
    assert breaker.state == "open"
    assert not breaker.allow(2.3)
    assert breaker.allow(2.4)  # half-open: one probe...
    assert state(breaker) == "half_open"
    assert not breaker.allow(2.4)  # ...and only one
    assert breaker.record_failure(2.5)  # the probe failed: open again, for another full pause
    assert not breaker.allow(4.4)
    assert breaker.allow(4.5)
    assert breaker.record_success()
    assert state(breaker) == "closed"
    assert breaker.allow(4.5)


def test_an_abandoned_probe_lets_the_next_call_probe() -> None:
    breaker = CircuitBreaker(failure_threshold=1, reset_timeout=1.0)
    breaker.record_failure(0.0)
    assert breaker.allow(1.0)
    assert not breaker.allow(1.0)
    breaker.record_abandoned()
    assert breaker.allow(1.0)


# -- closed -------------------------------------------------------------------------------------


async def test_closed_mode_refuses_while_redis_is_down_and_resumes_after_restart(
    closed: ResilientLimiter,
    fresh_redis_server: RedisServer,
    clock: FakeClock,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="hubgate.ratelimit")
    policy = LimitPolicy(requests_per_minute=60, request_burst=5, max_connections=10)
    before = await quick(closed.admit("acme", "u", policy, lease="i:c:0", estimate_tokens=0, now=NOW))
    assert before.backend == "redis"

    fresh_redis_server.kill()
    for n in range(3):
        with pytest.raises(LimiterUnavailable):
            await quick(closed.admit("acme", "u", policy, lease=f"i:c:{n + 1}", estimate_tokens=0, now=NOW))
    assert closed.stats.breaker_state == "open"
    assert closed.stats.breaker_opens == 1
    attempts = closed.stats.redis_failures
    assert attempts == 6  # three calls, each tried twice

    # While open, nothing touches Redis: each refusal is immediate.
    started = time.monotonic()
    for n in range(100):
        with pytest.raises(LimiterUnavailable):
            await closed.admit("acme", "u", policy, lease=f"i:c:x{n}", estimate_tokens=0, now=NOW)
    assert time.monotonic() - started < 0.5  # no timeouts: 100 calls at ~50 µs each
    assert closed.stats.redis_failures == attempts
    assert closed.stats.short_circuits == 100
    with pytest.raises(LimiterUnavailable):
        await quick(closed.acquire_connection("acme", policy, lease="i:c", now=NOW))
    # Bookkeeping calls never raise for Redis trouble; they are counted.
    await quick(closed.settle(before, policy, used_tokens=0, now=NOW))
    await quick(closed.renew("acme", ["i:c:0"], now=NOW))
    await quick(closed.release_connection("acme", lease="i:c"))
    assert closed.stats.lost_updates == 3
    assert closed.stats.fallbacks == closed.stats.unavailable == 104

    # A probe while Redis is still down fails once and re-opens the breaker.
    clock.t += RESET
    with pytest.raises(LimiterUnavailable):
        await quick(closed.admit("acme", "u", policy, lease="i:c:p", estimate_tokens=0, now=NOW))
    assert closed.stats.redis_failures == attempts + 1
    assert closed.stats.breaker_state == "open"

    fresh_redis_server.start()  # same port, empty: scripts and state are gone
    loads = closed.primary.script_loads
    with pytest.raises(LimiterUnavailable):  # the breaker has not let a probe through yet
        await quick(closed.admit("acme", "u", policy, lease="i:c:q", estimate_tokens=0, now=NOW))
    clock.t += RESET
    after = await quick(closed.admit("acme", "u", policy, lease="i:c:r", estimate_tokens=0, now=NOW + 1))
    assert after.backend == "redis"
    assert state(closed.stats) == "closed"
    assert closed.primary.script_loads == loads + 1  # NOSCRIPT after the restart, reloaded

    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 2, [r.getMessage() for r in warnings]  # unreachable, breaker open: once each
    assert any("resumed after 106 fallback decisions" in r.getMessage() for r in caplog.records)


async def test_closed_mode_maps_other_redis_errors(closed: ResilientLimiter) -> None:
    policy = LimitPolicy(requests_per_minute=60)
    # A key of the wrong type makes the script fail with WRONGTYPE, a ResponseError.
    await closed.primary.client.set("{t:acme}:streams", "not a lease set")
    with pytest.raises(LimiterUnavailable) as refused:
        await quick(closed.admit("acme", "u", policy, lease="i:c:1", estimate_tokens=0, now=NOW))
    assert "WRONGTYPE" in str(refused.value.__cause__)
    assert closed.stats.redis_failures == 2


async def test_refusals_from_redis_are_answers_not_failures(closed: ResilientLimiter) -> None:
    policy = LimitPolicy(requests_per_minute=60, request_burst=1)
    await quick(closed.admit("acme", "u", policy, lease="i:c:1", estimate_tokens=0, now=NOW))
    for n in range(5):
        with pytest.raises(RateLimited):
            await quick(closed.admit("acme", "u", policy, lease=f"i:c:{n + 2}", estimate_tokens=0, now=NOW))
    assert closed.stats.redis_failures == 0
    assert closed.stats.breaker_state == "closed"


# -- local --------------------------------------------------------------------------------------


async def test_local_mode_decides_with_a_share_of_the_limits(
    local: ResilientLimiter, fresh_redis_server: RedisServer, clock: FakeClock
) -> None:
    policy = LimitPolicy(requests_per_minute=10, max_concurrent_streams=4, max_connections=4)
    fresh_redis_server.kill()
    # Two expected instances: each enforces half of every figure; never unlimited.
    first = await quick(local.admit("acme", "u", policy, lease="i:c:1", estimate_tokens=0, now=NOW))
    assert first.backend == "local"
    assert first.remaining_requests == 4  # a bucket of 5, one taken
    await quick(local.admit("acme", "u", policy, lease="i:c:2", estimate_tokens=0, now=NOW))
    with pytest.raises(TooManyStreams):
        await quick(local.admit("acme", "u", policy, lease="i:c:3", estimate_tokens=0, now=NOW))
    await quick(local.settle(first, policy, used_tokens=0, now=NOW))  # settles locally
    for n in range(3):
        admission = await quick(
            local.admit("acme", "u", policy, lease=f"i:c:{n + 4}", estimate_tokens=0, now=NOW)
        )
        await quick(local.settle(admission, policy, used_tokens=0, now=NOW))
    with pytest.raises(RateLimited) as refused:
        await quick(local.admit("acme", "u", policy, lease="i:c:9", estimate_tokens=0, now=NOW))
    assert refused.value.retry_after == 12.0  # 5 per minute locally
    await quick(local.acquire_connection("acme", policy, lease="c1", now=NOW))
    await quick(local.acquire_connection("acme", policy, lease="c2", now=NOW))
    with pytest.raises(TooManyConnections):
        await quick(local.acquire_connection("acme", policy, lease="c3", now=NOW))
    await quick(local.release_connection("acme", lease="c1"))
    await quick(local.acquire_connection("acme", policy, lease="c3", now=NOW))
    snap = await quick(local.snapshot("acme", policy, now=NOW))
    assert snap["requests_remaining"] == 0 and snap["streams_limit"] == 2
    assert local.stats.local_decisions == 11
    assert local.stats.unavailable == 0

    fresh_redis_server.start()
    clock.t += RESET
    back = await quick(local.admit("acme", "u", policy, lease="i:c:10", estimate_tokens=0, now=NOW))
    assert back.backend == "redis"
    assert back.remaining_requests == 9  # Redis limits again (its state was lost with the restart)
    # An admission made during the outage still settles where it was made.
    await quick(local.settle(admission, policy, used_tokens=0, now=NOW))
    assert local.stats.breaker_state == "closed"


async def test_a_paused_redis_costs_two_timeouts_then_nothing(
    local: ResilientLimiter, fresh_redis_server: RedisServer
) -> None:
    policy = LimitPolicy(requests_per_minute=6000)
    await quick(local.admit("acme", "u", policy, lease="i:c:0", estimate_tokens=0, now=NOW))
    process = fresh_redis_server.process
    assert process is not None
    process.send_signal(signal.SIGSTOP)  # accepts TCP, never answers: a black hole
    try:
        started = time.monotonic()
        admission = await quick(local.admit("acme", "u", policy, lease="i:c:1", estimate_tokens=0, now=NOW))
        elapsed = time.monotonic() - started
        assert admission.backend == "local"
        assert 2 * TIMEOUT * 0.9 <= elapsed < 1.0  # one try and one retry, each cut at the timeout
        assert local.stats.retries == 1
        for n in range(2):
            await quick(local.admit("acme", "u", policy, lease=f"i:c:{n + 2}", estimate_tokens=0, now=NOW))
        assert local.stats.breaker_state == "open"
        started = time.monotonic()
        for n in range(50):
            await local.admit("acme", "u", policy, lease=f"i:c:x{n}", estimate_tokens=0, now=NOW)
        assert time.monotonic() - started < 0.5  # no timeouts: 50 calls decided locally at once
    finally:
        process.send_signal(signal.SIGCONT)


async def test_a_busy_event_loop_is_not_a_redis_outage(local: ResilientLimiter) -> None:
    """Calls that wait behind a busy loop before they leave still get Redis's answer: the time
    Redis has to answer starts when a call leaves."""
    policy = LimitPolicy(requests_per_minute=6000, max_concurrent_streams=100)
    await quick(local.admit("acme", "u", policy, lease="i:c:warm", estimate_tokens=0, now=NOW))
    calls = [
        asyncio.create_task(local.admit("acme", "u", policy, lease=f"i:c:b{n}", estimate_tokens=0, now=NOW))
        for n in range(20)
    ]
    await asyncio.sleep(0)  # every call is made and waits for the runner to send it
    time.sleep(4 * TIMEOUT)  # noqa: ASYNC251  (the loop is busy for longer than Redis has to answer)
    results = await quick(asyncio.gather(*calls))
    assert {a.backend for a in results} == {"redis"}
    assert local.stats.redis_failures == 0 and local.stats.fallbacks == 0


async def test_concurrent_calls_during_an_outage_do_not_pile_up(
    local: ResilientLimiter, fresh_redis_server: RedisServer, clock: FakeClock
) -> None:
    policy = LimitPolicy(requests_per_minute=6000)
    fresh_redis_server.kill()
    results = await quick(
        asyncio.gather(
            *(
                local.admit("acme", "u", policy, lease=f"i:c:{n}", estimate_tokens=0, now=NOW)
                for n in range(200)
            )
        )
    )
    assert {a.backend for a in results} == {"local"}
    assert local.stats.breaker_state == "open"
    # Half-open: one probe goes to Redis, the others decide locally without waiting for it.
    clock.t += RESET
    failures = local.stats.redis_failures
    await quick(
        asyncio.gather(
            *(
                local.admit("acme", "u", policy, lease=f"i:c:p{n}", estimate_tokens=0, now=NOW)
                for n in range(50)
            )
        )
    )
    assert local.stats.redis_failures == failures + 1


# -- the factory --------------------------------------------------------------------------------


async def test_factory_without_url_is_in_memory() -> None:
    limiter = build_limiter(None, lease_ttl=12)
    assert isinstance(limiter, MemoryLimiter)
    assert limiter.lease_ttl == 12


async def test_factory_configures_a_bounded_blocking_pool(redis_server: RedisServer) -> None:
    limiter = build_limiter(
        redis_server.url, mode="closed", expected_instances=3, timeout_ms=40, max_connections=7, lease_ttl=20
    )
    try:
        assert isinstance(limiter, ResilientLimiter)
        assert limiter.mode == "closed"
        primary = limiter.primary
        assert isinstance(primary, RedisLimiter) and primary.lease_ttl == 20
        pool = primary.client.connection_pool
        assert isinstance(pool, BlockingConnectionPool)
        assert pool.max_connections == 7
        assert pool.timeout == 0.04
        assert pool.connection_kwargs["socket_timeout"] == 0.5
        assert pool.connection_kwargs["socket_connect_timeout"] == 0.5
        assert pool.connection_kwargs["health_check_interval"] == 30
        assert pool.connection_kwargs["retry"].get_retries() == 0
        await primary.client.flushdb()
        admission = await quick(
            limiter.admit(
                "acme", "u", LimitPolicy(requests_per_minute=5), lease="l", estimate_tokens=0, now=NOW
            )
        )
        assert admission.backend == "redis" and admission.remaining_requests == 4
    finally:
        await limiter.aclose()
    assert isinstance(primary.client, Redis)
