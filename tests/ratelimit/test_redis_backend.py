"""What only a real Redis can show: keys and TTLs, script reloading, two gateways sharing state,
and the Lua arithmetic agreeing with the Python arithmetic on the same inputs."""

from __future__ import annotations

import random
import struct
from collections.abc import AsyncIterator, Iterator

import pytest
import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from redis.asyncio import Redis
from redis.crc import key_slot

from hubgate.errors import GatewayError, RateLimited
from hubgate.ratelimit import LimitPolicy, MemoryLimiter, RedisLimiter
from hubgate.ratelimit import buckets as pure
from hubgate.ratelimit.base import Admission, Limiter
from hubgate.ratelimit.buckets import UNITS_PER_TOKEN, Bucket
from hubgate.ratelimit.redis_backend import BUCKET_SLACK_MS, LUA_BUCKETS
from tests.support.redis_server import RedisServer

NOW = 1_700_000_000.0


@pytest.fixture
async def client(redis_server: RedisServer) -> AsyncIterator[Redis]:
    client = Redis.from_url(redis_server.url)
    await client.flushdb()
    yield client
    await client.aclose()


@pytest.fixture
def sync_client(redis_server: RedisServer) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_server.url)
    client.flushdb()
    yield client
    client.close()


async def test_keys_carry_the_tenant_hash_tag_and_expire(client: Redis) -> None:
    limiter = RedisLimiter(client, lease_ttl=30)
    policy = LimitPolicy(
        requests_per_minute=60,
        tokens_per_minute=6000,
        per_user_requests_per_minute=10,
        max_connections=5,
        max_concurrent_streams=5,
    )
    await limiter.acquire_connection("acme", policy, lease="i:c:1", now=NOW)
    await limiter.admit("acme", "alice", policy, lease="i:c:1:r:1", estimate_tokens=600, now=NOW)
    keys = sorted(k.decode() if isinstance(k, bytes) else k for k in await client.keys("*"))
    assert keys == [
        "{t:acme}:conn",
        "{t:acme}:rq",
        "{t:acme}:streams",
        "{t:acme}:tk",
        "{t:acme}:u:alice:rq",
    ]
    assert len({key_slot(k.encode()) for k in keys}) == 1
    ttls = {k: await client.pttl(k) for k in keys}
    assert all(ttl > 0 for ttl in ttls.values()), ttls
    # A bucket key lives until the bucket would be full again (plus a little slack).
    assert 1000 < ttls["{t:acme}:rq"] <= 1000 + BUCKET_SLACK_MS  # one request at 1/s
    assert 6000 < ttls["{t:acme}:tk"] <= 6000 + BUCKET_SLACK_MS  # 600 tokens at 100/s
    assert 6000 < ttls["{t:acme}:u:alice:rq"] <= 6000 + BUCKET_SLACK_MS  # 1 of 10/minute
    assert 30_000 < ttls["{t:acme}:streams"] <= 60_000


async def test_idle_tenants_leave_nothing_behind(client: Redis) -> None:
    limiter = RedisLimiter(client, lease_ttl=30)
    policy = LimitPolicy(tokens_per_minute=6000)
    admission = await limiter.admit("acme", "alice", policy, lease="i:c:1:r:1", estimate_tokens=100, now=NOW)
    await limiter.settle(admission, policy, used_tokens=0, now=NOW)  # full again at once
    assert await client.pttl("{t:acme}:tk") <= BUCKET_SLACK_MS
    assert await client.exists("{t:acme}:streams") == 0  # the last lease left with the settle


async def test_noscript_is_recovered_transparently(client: Redis) -> None:
    await client.script_flush()  # scripts outlive FLUSHDB; start from a Redis that knows none
    limiter = RedisLimiter(client)
    policy = LimitPolicy(requests_per_minute=60, request_burst=3)
    await limiter.admit("acme", "alice", policy, lease="i:c:1", estimate_tokens=0, now=NOW)
    assert limiter.script_loads == 1  # first use: the script was not known yet
    await client.script_flush()
    second = await limiter.admit("acme", "alice", policy, lease="i:c:2", estimate_tokens=0, now=NOW)
    assert second.remaining_requests == 1  # state kept, script reloaded, nothing charged twice
    assert limiter.script_loads == 2
    await limiter.admit("acme", "alice", policy, lease="i:c:3", estimate_tokens=0, now=NOW)
    assert limiter.script_loads == 2  # EVALSHA from then on


async def test_two_gateways_with_skewed_clocks_mint_nothing(redis_server: RedisServer) -> None:
    """Gateway B's clock runs 5 s behind A's; they share one Redis."""
    clients = [Redis.from_url(redis_server.url) for _ in range(2)]
    await clients[0].flushdb()
    a, b = (RedisLimiter(c, owns_client=True) for c in clients)
    policy = LimitPolicy(requests_per_minute=60, request_burst=3)
    skew = 5.0
    try:
        admitted = 0
        lease = 0
        # Both gateways hammer the bucket every 100 ms of real time for 20 s.
        for step in range(200):
            real = NOW + step / 10
            for limiter, clock in ((a, real), (b, real - skew)):
                lease += 1
                try:
                    await limiter.admit("acme", "u", policy, lease=f"l{lease}", estimate_tokens=0, now=clock)
                    admitted += 1
                except RateLimited as refused:
                    assert refused.retry_after is not None and refused.retry_after <= 1.0
        # At most the burst plus one per second of real time: B's slow clock added nothing.
        assert admitted == 3 + 19
    finally:
        await a.aclose()
        await b.aclose()


# -- Lua and Python agree ---------------------------------------------------------------------

PROBE = (
    LUA_BUCKETS
    + """
local burst, rate, now, need = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local level, t = refill(KEYS[1], burst, rate, now)
local w = wait_ms(level, need, rate)
return {string.format('%d', level), string.format('%d', t), w, ceil_div(tonumber(ARGV[5]), tonumber(ARGV[6]))}
"""
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    burst=st.integers(min_value=1, max_value=10**8),
    rate=st.integers(min_value=1, max_value=10**8),
    level=st.integers(min_value=-(10**8) * UNITS_PER_TOKEN, max_value=10**8 * UNITS_PER_TOKEN),
    stored_at=st.integers(min_value=1_600_000_000_000, max_value=1_800_000_000_000),
    offset=st.integers(min_value=-(10**7), max_value=10**10),
    cost=st.integers(min_value=0, max_value=10**9),
    stored=st.booleans(),
    dividend=st.integers(min_value=0, max_value=2**52),
    divisor=st.integers(min_value=1, max_value=2**30),
)
def test_lua_bucket_functions_match_python(
    sync_client: redis.Redis,
    burst: int,
    rate: int,
    level: int,
    stored_at: int,
    offset: int,
    cost: int,
    stored: bool,
    dividend: int,
    divisor: int,
) -> None:
    level = min(level, pure.capacity(burst))
    key = "{t:parity}:rq"
    sync_client.delete(key)
    state: Bucket | None = None
    if stored:
        sync_client.set(key, struct.pack(">qq", level, stored_at))
        state = Bucket(level, stored_at)
    now = stored_at + offset
    need = pure.need_units(cost, burst)
    reply = sync_client.eval(PROBE, 1, key, burst, rate, now, need, dividend, divisor)
    expected = pure.refill(state, burst=burst, per_minute=rate, now_ms=now)
    assert (int(reply[0]), int(reply[1])) == (expected.level, expected.at_ms)
    assert reply[2] == pure.wait_ms(expected, need_units=need, per_minute=rate)
    assert reply[3] == pure.ceil_div(dividend, divisor)


async def _outcome(limiter: Limiter, op: tuple[object, ...], admissions: dict[str, Admission]) -> object:
    kind = op[0]
    try:
        if kind == "admit":
            _, user, lease, estimate, now, policy = op
            assert isinstance(policy, LimitPolicy)
            admission = await limiter.admit(
                "acme",
                str(user),
                policy,
                lease=str(lease),
                estimate_tokens=int(str(estimate)),
                now=float(str(now)),
            )
            admissions[str(lease)] = admission
            return (
                "admitted",
                admission.remaining_requests,
                admission.remaining_tokens,
                admission.reset_seconds,
            )
        if kind == "settle":
            _, lease, used, now, policy = op
            assert isinstance(policy, LimitPolicy)
            if str(lease) in admissions:
                await limiter.settle(
                    admissions[str(lease)], policy, used_tokens=int(str(used)), now=float(str(now))
                )
            return ("settled",)
        if kind == "connect":
            _, lease, now, policy = op
            assert isinstance(policy, LimitPolicy)
            await limiter.acquire_connection("acme", policy, lease=str(lease), now=float(str(now)))
            return ("connected",)
        if kind == "renew":
            _, leases, now = op
            assert isinstance(leases, list)
            await limiter.renew("acme", leases, now=float(str(now)))
            return ("renewed",)
        _, now, policy = op
        assert isinstance(policy, LimitPolicy)
        return ("snapshot", await limiter.snapshot("acme", policy, now=float(str(now))))
    except GatewayError as refused:
        return ("refused", type(refused).__name__, refused.retry_after)  # type: ignore[attr-defined]


@pytest.mark.parametrize("seed", range(24))
async def test_redis_and_memory_decide_identically(client: Redis, seed: int) -> None:
    """Random sequences of calls, with clocks jumping and going backwards, give identical results."""
    rng = random.Random(seed)
    policies = [
        LimitPolicy(
            requests_per_minute=rng.randint(1, 600),
            request_burst=rng.choice([None, rng.randint(1, 20)]),
            tokens_per_minute=rng.choice([None, rng.randint(100, 20_000)]),
            per_user_requests_per_minute=rng.choice([None, rng.randint(1, 60)]),
            max_connections=rng.choice([None, rng.randint(1, 4)]),
            max_concurrent_streams=rng.choice([None, rng.randint(1, 6)]),
        )
        for _ in range(2)
    ]
    now = NOW + rng.random()
    ops: list[tuple[object, ...]] = []
    leases: list[str] = []
    for i in range(120):
        now += rng.choice(
            [0.0, 0.001, rng.random(), rng.random() * 20, -rng.random() * 3, -rng.random() * 40]
        )
        policy = rng.choice(policies)
        roll = rng.random()
        if roll < 0.55:
            lease = rng.choice(leases) if leases and rng.random() < 0.1 else f"l{i}"
            leases.append(lease)
            ops.append(("admit", rng.choice("abc"), lease, rng.randint(0, 5000), round(now, 4), policy))
        elif roll < 0.75 and leases:
            ops.append(("settle", rng.choice(leases), rng.randint(0, 9000), round(now, 4), policy))
        elif roll < 0.85:
            ops.append(("connect", f"c{rng.randint(0, 6)}", round(now, 4), policy))
        elif roll < 0.92:
            ops.append(("renew", rng.sample([*leases, "c1", "c2"], k=min(3, len(leases) + 2)), round(now, 4)))
        else:
            ops.append(("snapshot", round(now, 4), policy))

    memory, shared = MemoryLimiter(), RedisLimiter(client)
    memory_admissions: dict[str, Admission] = {}
    redis_admissions: dict[str, Admission] = {}
    for op in ops:
        expected = await _outcome(memory, op, memory_admissions)
        got = await _outcome(shared, op, redis_admissions)
        assert got == expected, op
