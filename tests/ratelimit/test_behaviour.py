"""What every limiter backend must do, run against the memory and the Redis backend alike.

Time is driven by the explicit ``now`` each call takes; nothing here sleeps.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from redis.asyncio import Redis

from hubgate.errors import RateLimited, TokenRateLimited, TooManyConnections, TooManyStreams
from hubgate.ratelimit import Admission, LimitPolicy, MemoryLimiter, RedisLimiter
from hubgate.ratelimit.base import Limiter
from tests.support.redis_server import RedisServer

NOW = 1_700_000_000.0
TTL = 30.0


@pytest.fixture(params=["memory", "redis"])
async def limiter(request: pytest.FixtureRequest, redis_server: RedisServer) -> AsyncIterator[Limiter]:
    if request.param == "memory":
        memory = MemoryLimiter(TTL)
        yield memory
        await memory.aclose()
        return
    client = Redis.from_url(redis_server.url)
    await client.flushdb()
    shared = RedisLimiter(client, lease_ttl=TTL, owns_client=True)
    yield shared
    await shared.aclose()


class Leases:
    """Unique lease strings, shaped like the gateway's."""

    def __init__(self) -> None:
        self.n = 0

    def __call__(self) -> str:
        self.n += 1
        return f"inst-a:conn-1:req-{self.n}"


async def admit(
    limiter: Limiter, policy: LimitPolicy, now: float, *, user: str = "alice", tokens: int = 0, lease: str
) -> Admission:
    return await limiter.admit("acme", user, policy, lease=lease, estimate_tokens=tokens, now=now)


async def test_burst_then_steady_rate(limiter: Limiter) -> None:
    policy = LimitPolicy(requests_per_minute=60, request_burst=5)  # one per second, five at once
    lease = Leases()
    remaining = [(await admit(limiter, policy, NOW, lease=lease())).remaining_requests for _ in range(5)]
    assert remaining == [4, 3, 2, 1, 0]
    with pytest.raises(RateLimited) as refused:
        await admit(limiter, policy, NOW, lease=lease())
    assert refused.value.retry_after == 1.0
    # Then exactly one per second: ten more over the next ten seconds, never two in one second.
    for second in range(1, 11):
        await admit(limiter, policy, NOW + second, lease=lease())
        with pytest.raises(RateLimited):
            await admit(limiter, policy, NOW + second + 0.5, lease=lease())


@pytest.mark.parametrize("per_minute", [7, 60, 1000, 90_000])
async def test_retry_after_is_exact(limiter: Limiter, per_minute: int) -> None:
    policy = LimitPolicy(requests_per_minute=per_minute, request_burst=1)
    lease = Leases()
    now = NOW + 0.123  # not on a whole millisecond boundary of anything
    await admit(limiter, policy, now, lease=lease())
    with pytest.raises(RateLimited) as refused:
        await admit(limiter, policy, now, lease=lease())
    retry_after = refused.value.retry_after
    assert retry_after is not None and retry_after > 0
    # A millisecond early is still refused; on time is admitted.
    with pytest.raises(RateLimited):
        await admit(limiter, policy, now + retry_after - 0.001, lease=lease())
    await admit(limiter, policy, now + retry_after, lease=lease())


async def test_token_retry_after_is_exact(limiter: Limiter) -> None:
    policy = LimitPolicy(tokens_per_minute=6000)  # 100 tokens per second
    lease = Leases()
    await admit(limiter, policy, NOW, tokens=5950, lease=lease())
    with pytest.raises(TokenRateLimited) as refused:
        await admit(limiter, policy, NOW, tokens=125, lease=lease())
    assert refused.value.retry_after == 0.75  # 75 more tokens at 100/s
    with pytest.raises(TokenRateLimited):
        await admit(limiter, policy, NOW + 0.749, tokens=125, lease=lease())
    await admit(limiter, policy, NOW + 0.75, tokens=125, lease=lease())


async def test_retry_after_is_the_longest_wait(limiter: Limiter) -> None:
    policy = LimitPolicy(requests_per_minute=60, request_burst=1, tokens_per_minute=600)  # 10 tokens/s
    lease = Leases()
    await admit(limiter, policy, NOW, tokens=600, lease=lease())
    # The request bucket needs 1 s, the token bucket 5 s for 50 tokens: report the token limit.
    with pytest.raises(TokenRateLimited) as refused:
        await admit(limiter, policy, NOW, tokens=50, lease=lease())
    assert refused.value.retry_after == 5.0
    with pytest.raises(RateLimited) as refused_requests:
        await admit(limiter, policy, NOW, tokens=5, lease=lease())
    assert refused_requests.value.retry_after == 1.0


async def test_reservation_refund_on_settle(limiter: Limiter) -> None:
    policy = LimitPolicy(tokens_per_minute=1000)
    admission = await admit(limiter, policy, NOW, tokens=600, lease="i:c:1")
    assert admission.reserved_tokens == 600
    assert admission.remaining_tokens == 400
    await limiter.settle(admission, policy, used_tokens=150, now=NOW)
    snap = await limiter.snapshot("acme", policy, now=NOW)
    assert snap["tokens_remaining"] == 850
    assert snap["streams"] == 0


async def test_excess_is_charged_and_debt_makes_later_requests_wait(limiter: Limiter) -> None:
    policy = LimitPolicy(tokens_per_minute=6000)  # 100/s
    admission = await admit(limiter, policy, NOW, tokens=100, lease="i:c:1")
    await limiter.settle(admission, policy, used_tokens=6500, now=NOW)
    snap = await limiter.snapshot("acme", policy, now=NOW)
    assert snap["tokens_remaining"] == -500  # in debt
    with pytest.raises(TokenRateLimited) as refused:
        await admit(limiter, policy, NOW, tokens=100, lease="i:c:2")
    assert refused.value.retry_after == 6.0  # 500 of debt plus 100 needed, at 100/s
    await admit(limiter, policy, NOW + 6, tokens=100, lease="i:c:3")


async def test_settle_is_applied_once(limiter: Limiter) -> None:
    policy = LimitPolicy(tokens_per_minute=1000)
    admission = await admit(limiter, policy, NOW, tokens=500, lease="i:c:1")
    await limiter.settle(admission, policy, used_tokens=0, now=NOW)
    await limiter.settle(admission, policy, used_tokens=0, now=NOW)  # a retried settle
    other = await admit(limiter, policy, NOW, tokens=500, lease="i:c:2")
    assert other.remaining_tokens == 500


async def test_settle_after_the_lease_expired_changes_nothing(limiter: Limiter) -> None:
    policy = LimitPolicy(tokens_per_minute=60)  # one token per second
    admission = await admit(limiter, policy, NOW, tokens=60, lease="i:c:1")
    await limiter.settle(admission, policy, used_tokens=0, now=NOW + TTL)
    snap = await limiter.snapshot("acme", policy, now=NOW + TTL)
    assert snap["tokens_remaining"] == 30  # refilled for 30 s, no refund of the expired reservation


async def test_estimate_above_burst_is_admitted_when_full(limiter: Limiter) -> None:
    policy = LimitPolicy(tokens_per_minute=6000, token_burst=1000)
    admission = await admit(limiter, policy, NOW, tokens=2500, lease="i:c:1")
    assert admission.remaining_tokens == 0
    snap = await limiter.snapshot("acme", policy, now=NOW)
    assert snap["tokens_remaining"] == -1500
    with pytest.raises(TokenRateLimited) as refused:
        await admit(limiter, policy, NOW, tokens=2500, lease="i:c:2")
    assert refused.value.retry_after == 25.0  # back to a full 1000 at 100/s


async def test_per_user_buckets(limiter: Limiter) -> None:
    policy = LimitPolicy(requests_per_minute=60, request_burst=4, per_user_requests_per_minute=2)
    lease = Leases()
    first = await admit(limiter, policy, NOW, user="alice", lease=lease())
    assert first.remaining_requests == 1  # the user's bucket is the tighter one
    await admit(limiter, policy, NOW, user="alice", lease=lease())
    with pytest.raises(RateLimited) as refused:
        await admit(limiter, policy, NOW, user="alice", lease=lease())
    assert refused.value.retry_after == 30.0  # 2 per minute
    # Bob has his own bucket, but shares the tenant's: two left of four.
    bob = await admit(limiter, policy, NOW, user="bob", lease=lease())
    assert bob.remaining_requests == 1
    await admit(limiter, policy, NOW, user="carol", lease=lease())
    with pytest.raises(RateLimited) as tenant_refused:
        await admit(limiter, policy, NOW, user="dave", lease=lease())
    assert tenant_refused.value.retry_after == 1.0  # the tenant's 60/minute


async def test_all_or_nothing(limiter: Limiter) -> None:
    policy = LimitPolicy(
        requests_per_minute=60, request_burst=10, per_user_requests_per_minute=60, tokens_per_minute=100
    )
    await admit(limiter, policy, NOW, tokens=60, lease="i:c:1")
    with pytest.raises(TokenRateLimited):
        await admit(limiter, policy, NOW, tokens=60, lease="i:c:2")
    snap = await limiter.snapshot("acme", policy, now=NOW)
    assert snap["requests_remaining"] == 9  # the refused request took no request token
    assert snap["tokens_remaining"] == 40
    assert snap["streams"] == 1  # and no stream lease
    small = await admit(limiter, policy, NOW, tokens=40, lease="i:c:3")
    assert small.remaining_requests == 8
    assert small.remaining_tokens == 0


async def test_stream_cap(limiter: Limiter) -> None:
    policy = LimitPolicy(requests_per_minute=60, max_concurrent_streams=2)
    first = await admit(limiter, policy, NOW, lease="i:c:1")
    await admit(limiter, policy, NOW, lease="i:c:2")
    with pytest.raises(TooManyStreams) as refused:
        await admit(limiter, policy, NOW, lease="i:c:3")
    assert refused.value.retry_after is None
    assert (await limiter.snapshot("acme", policy, now=NOW))["requests_remaining"] == 58  # nothing taken
    await limiter.settle(first, policy, used_tokens=0, now=NOW)
    await admit(limiter, policy, NOW, lease="i:c:3")


async def test_connection_cap(limiter: Limiter) -> None:
    policy = LimitPolicy(max_connections=2)
    await limiter.acquire_connection("acme", policy, lease="i:c:1", now=NOW)
    await limiter.acquire_connection("acme", policy, lease="i:c:2", now=NOW)
    await limiter.acquire_connection("acme", policy, lease="i:c:2", now=NOW)  # same lease again: held once
    with pytest.raises(TooManyConnections) as refused:
        await limiter.acquire_connection("acme", policy, lease="i:c:3", now=NOW)
    assert refused.value.retry_after is None
    await limiter.acquire_connection("globex", policy, lease="i:c:3", now=NOW)  # another tenant
    await limiter.release_connection("acme", lease="i:c:1")
    await limiter.acquire_connection("acme", policy, lease="i:c:3", now=NOW)
    assert (await limiter.snapshot("acme", policy, now=NOW))["connections"] == 2


async def test_leases_of_a_crashed_instance_expire(limiter: Limiter) -> None:
    policy = LimitPolicy(max_connections=1, max_concurrent_streams=1)
    await limiter.acquire_connection("acme", policy, lease="dead:c:1", now=NOW)
    await admit(limiter, policy, NOW, lease="dead:c:1:r:1")
    # The instance dies: nothing renews its leases. Until they expire the caps hold...
    with pytest.raises(TooManyConnections):
        await limiter.acquire_connection("acme", policy, lease="live:c:1", now=NOW + TTL - 0.001)
    with pytest.raises(TooManyStreams):
        await admit(limiter, policy, NOW + TTL - 0.001, lease="live:c:1:r:1")
    # ...and once `now` passes their expiry the capacity is free again.
    await limiter.acquire_connection("acme", policy, lease="live:c:1", now=NOW + TTL)
    await admit(limiter, policy, NOW + TTL, lease="live:c:1:r:1")
    snap = await limiter.snapshot("acme", policy, now=NOW + TTL)
    assert (snap["connections"], snap["streams"]) == (1, 1)


async def test_renew_keeps_leases_alive(limiter: Limiter) -> None:
    policy = LimitPolicy(max_connections=1, max_concurrent_streams=1)
    await limiter.acquire_connection("acme", policy, lease="a:c:1", now=NOW)
    await admit(limiter, policy, NOW, lease="a:c:1:r:1")
    await limiter.renew("acme", ["a:c:1", "a:c:1:r:1"], now=NOW + 20)
    with pytest.raises(TooManyConnections):
        await limiter.acquire_connection("acme", policy, lease="b:c:1", now=NOW + 45)
    with pytest.raises(TooManyStreams):
        await admit(limiter, policy, NOW + 45, lease="b:c:1:r:1")
    await limiter.acquire_connection("acme", policy, lease="b:c:1", now=NOW + 50)
    await admit(limiter, policy, NOW + 50, lease="b:c:1:r:1")


async def test_renew_never_resurrects(limiter: Limiter) -> None:
    policy = LimitPolicy(max_connections=1)
    await limiter.acquire_connection("acme", policy, lease="a:c:1", now=NOW)
    await limiter.release_connection("acme", lease="a:c:1")
    await limiter.renew("acme", ["a:c:1", "never-held"], now=NOW + 1)
    await limiter.acquire_connection("acme", policy, lease="b:c:1", now=NOW + 1)
    # Expired before the renewal arrives: stays expired.
    await limiter.renew("acme", ["b:c:1"], now=NOW + 1 + TTL)
    await limiter.acquire_connection("acme", policy, lease="c:c:1", now=NOW + 1 + TTL)


async def test_admit_is_idempotent_per_lease(limiter: Limiter) -> None:
    policy = LimitPolicy(requests_per_minute=60, tokens_per_minute=1000, max_concurrent_streams=5)
    first = await admit(limiter, policy, NOW, tokens=100, lease="i:c:1")
    again = await admit(limiter, policy, NOW, tokens=100, lease="i:c:1")  # a retry of the same call
    assert again.remaining_requests == first.remaining_requests == 59
    assert again.remaining_tokens == first.remaining_tokens == 900
    assert (await limiter.snapshot("acme", policy, now=NOW))["streams"] == 1


async def test_clock_going_backwards_mints_nothing(limiter: Limiter) -> None:
    policy = LimitPolicy(requests_per_minute=60, request_burst=2)
    await admit(limiter, policy, NOW, lease="i:c:1")
    await admit(limiter, policy, NOW, lease="i:c:2")
    with pytest.raises(RateLimited) as refused:
        await admit(limiter, policy, NOW - 5, lease="i:c:3")
    assert refused.value.retry_after == 1.0  # measured from the latest time the bucket has seen


async def test_unlimited_policy(limiter: Limiter) -> None:
    admission = await admit(limiter, LimitPolicy(), NOW, tokens=10**6, lease="i:c:1")
    assert admission == Admission(
        tenant="acme",
        user="alice",
        stream_lease="i:c:1",
        reserved_tokens=0,
        remaining_requests=None,
        remaining_tokens=None,
        reset_seconds=0.0,
        backend=admission.backend,
    )
    await limiter.settle(admission, LimitPolicy(), used_tokens=10**7, now=NOW)
    snap = await limiter.snapshot("acme", LimitPolicy(), now=NOW)
    assert snap["requests_remaining"] is None and snap["tokens_remaining"] is None


async def test_reset_seconds_is_time_until_request_bucket_is_full(limiter: Limiter) -> None:
    policy = LimitPolicy(requests_per_minute=120, request_burst=10)  # 2 per second
    lease = Leases()
    for _ in range(3):
        admission = await admit(limiter, policy, NOW, lease=lease())
    assert admission.reset_seconds == 1.5


async def test_zero_limit_refuses_without_retry_after(limiter: Limiter) -> None:
    with pytest.raises(RateLimited) as refused:
        await admit(limiter, LimitPolicy(requests_per_minute=0), NOW, lease="i:c:1")
    assert refused.value.retry_after is None
    with pytest.raises(TooManyConnections):
        await limiter.acquire_connection("acme", LimitPolicy(max_connections=0), lease="i:c", now=NOW)


async def test_negative_token_counts_are_caller_bugs(limiter: Limiter) -> None:
    with pytest.raises(ValueError):
        await admit(limiter, LimitPolicy(), NOW, tokens=-1, lease="i:c:1")
