"""The shared limiter: state in Redis, every decision one Lua script run with EVALSHA.

One round trip per call, and each script is atomic, so gateway processes sharing a Redis never
race each other. The scripts repeat ``hubgate.ratelimit.buckets`` (and the decision order of
``hubgate.ratelimit.memory``) in Lua; the two must agree, and the parity tests run both on the
same inputs. Things the scripts deliberately avoid:

* ``redis.call('TIME')``: ElastiCache Serverless refuses it, and the caller's clock is the one
  the buckets must follow anyway (``now`` is passed in; the bucket never goes backwards).
* keys outside one tenant's hash tag: a script's keys must share a slot in cluster mode.
* floating-point state: levels and times are integers (see ``buckets``). A bucket is one string
  key holding two big-endian int64 (level in units, ms), written with ``SET ... PX``: one call
  for value and expiry, and ``struct`` (C) rather than string patterns (Lua) to read it back.

This is the bare adapter: redis-py errors propagate. The gateway uses it through
``ResilientLimiter``, which owns timeouts, retries, the breaker and the fallback.
"""

from __future__ import annotations

import asyncio
import logging
import struct
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from redis.asyncio import Redis

from hubgate.errors import TooManyConnections
from hubgate.keys import Claim
from hubgate.ratelimit.base import (
    Admission,
    BoundedCache,
    Rate,
    Rates,
    Snapshot,
    TenantKeys,
    Verdict,
    build_admission,
    build_snapshot,
    check_count,
    rates,
    refusal,
    refuse_closed_connections,
    refuse_closed_doors,
    tenant_keys,
)
from hubgate.ratelimit.buckets import UNITS_PER_TOKEN, Bucket, to_ms
from hubgate.ratelimit.policy import LimitPolicy
from hubgate.scripts import Script, ScriptRunner

log = logging.getLogger("hubgate.ratelimit")

# A bucket key expires this long after the bucket would be full again. Expiring exactly then
# would be correct for one clock; the slack covers gateways whose clocks run slightly behind,
# so none of them sees a key vanish while its own arithmetic still says "not yet full".
BUCKET_SLACK_MS = 1000

# Lease sets are kept for twice the lease TTL after their last write: every member expires
# within one TTL of it by its writer's clock, and the margin absorbs clock skew.
LEASE_KEY_FACTOR = 2

# Lua versions of buckets.ceil_div, refill, wait_ms, and the store that bounds a key's life.
LUA_BUCKETS = f"""
local U = {UNITS_PER_TOKEN}

-- Exact ceiling of a / b for integers below 2^53 (the division itself may round).
local function ceil_div(a, b)
  local q = math.floor(a / b)
  while q * b < a do q = q + 1 end
  while q > 0 and (q - 1) * b >= a do q = q - 1 end
  return q
end

-- buckets.refill on a stored value (false: no key, a full bucket): the level (units) as of
-- max(now, stored time).
local function refill_value(v, burst, rate, now)
  local cap = burst * U
  if not v then return cap, now end
  local level, at = struct.unpack('>i8i8', v)
  local t = math.max(now, at)
  level = level + (t - at) * rate
  if level > cap then level = cap end
  return level, t
end

local function refill(key, burst, rate, now)
  return refill_value(redis.call('GET', key), burst, rate, now)
end

-- buckets.wait_ms
local function wait_ms(level, need, rate)
  if level >= need then return 0 end
  return ceil_div(need - level, rate)
end

-- One SET with PX: the state (level, ms) and its expiry in a single call.
local function store(key, level, t, burst, rate)
  local ttl = wait_ms(level, burst * U, rate) + {BUCKET_SLACK_MS}
  redis.call('SET', key, struct.pack('>i8i8', level, t), 'PX', ttl)
end
"""

# KEYS: requests, user requests, tokens, streams.
# ARGV: now_ms, lease, estimate_tokens, and the plan: nine big-endian int64, lease_ttl_ms,
#       lease_key_ttl_ms, max_streams, then burst and rate of the request, user and token buckets
#       (max_streams -1: unlimited; burst 0: bucket not in use). The plan is packed once per policy:
#       nine separate arguments cost more to encode in redis-py (and to convert in Lua) than one
#       struct.unpack.
# Returns "verdict:wait_ms:request level:user level:token level" (see base.Verdict), one string
#       for the same reason: the pure-Python RESP parser pays per element of an array reply.
ADMIT_LUA = (
    LUA_BUCKETS
    + """
local now = tonumber(ARGV[1])
local lease = ARGV[2]
local estimate = tonumber(ARGV[3])
local p = {struct.unpack('>i8i8i8i8i8i8i8i8i8', ARGV[4])}
local expiry = now + p[1]
local key_ttl = p[2]
local max_streams = p[3]
local spec = {
  {KEYS[1], p[4], p[5], 1, 2},
  {KEYS[2], p[6], p[7], 1, 3},
  {KEYS[3], p[8], p[9], estimate, 4},
}
local levels, ats = {0, 0, 0}, {0, 0, 0}
local stored = redis.call('MGET', KEYS[1], KEYS[2], KEYS[3])  -- one call for the three buckets
local function reply(verdict, wait)
  return string.format('%d:%d:%d:%d:%d', verdict, wait, levels[1], levels[2], levels[3])
end

-- Purge first: a lease expired by the latest clock seen stays expired for a caller whose clock
-- is behind (as the buckets never go back in time), and the memory backend behaves the same.
redis.call('ZREMRANGEBYSCORE', KEYS[4], '-inf', ARGV[1])
if redis.call('ZSCORE', KEYS[4], lease) then
  -- A retry whose first attempt was applied: renew the lease, charge nothing.
  redis.call('ZADD', KEYS[4], 'XX', expiry, lease)
  redis.call('PEXPIRE', KEYS[4], key_ttl)
  for i, b in ipairs(spec) do
    if b[2] > 0 then levels[i] = refill_value(stored[i], b[2], b[3], now) end
  end
  return reply(0, 0)
end
-- KEYS[5], when given, names the request (see Claim): it must not exist yet, or hold this owner.
if KEYS[5] then
  local held = redis.call('GET', KEYS[5])
  if held and held ~= ARGV[6] then
    return reply(5, 0)
  end
end
if max_streams >= 0 and redis.call('ZCARD', KEYS[4]) >= max_streams then
  return reply(1, 0)
end

-- Check every bucket before charging any: all or nothing. Report the longest wait.
local verdict, longest = 0, 0
for i, b in ipairs(spec) do
  if b[2] > 0 then
    levels[i], ats[i] = refill_value(stored[i], b[2], b[3], now)
    local w = wait_ms(levels[i], math.min(b[4], b[2]) * U, b[3])
    if w > longest then verdict, longest = b[5], w end
  end
end
if verdict ~= 0 then return reply(verdict, longest) end

for i, b in ipairs(spec) do
  if b[2] > 0 then
    levels[i] = levels[i] - b[4] * U
    store(b[1], levels[i], ats[i], b[2], b[3])
  end
end
redis.call('ZADD', KEYS[4], expiry, lease)
redis.call('PEXPIRE', KEYS[4], key_ttl)
if KEYS[5] then
  redis.call('SET', KEYS[5], ARGV[6], 'PX', ARGV[5])
end
return reply(0, 0)
"""
)

# KEYS: tokens, streams. ARGV: now_ms, lease, token burst (0: not in use), token rate, delta tokens.
# Returns 1 when the lease was live and settled, 0 when it was already gone (settled or expired).
SETTLE_LUA = (
    LUA_BUCKETS
    + """
local now = tonumber(ARGV[1])
local score = redis.call('ZSCORE', KEYS[2], ARGV[2])
if not score then return 0 end
redis.call('ZREM', KEYS[2], ARGV[2])
if tonumber(score) <= now then return 0 end
local burst, rate, delta = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
if burst > 0 and delta ~= 0 then
  local level, t = refill(KEYS[1], burst, rate, now)
  level = level + delta * U
  if level > burst * U then level = burst * U end
  store(KEYS[1], level, t, burst, rate)
end
return 1
"""
)

# KEYS: connections. ARGV: now_ms, lease, lease_ttl_ms, lease_key_ttl_ms, max (-1: unlimited).
# Returns 1 when the lease is held (new or already held), 0 when the cap refuses it.
ACQUIRE_LUA = """
local now = tonumber(ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[1])
local max = tonumber(ARGV[5])
if max >= 0 and not redis.call('ZSCORE', KEYS[1], ARGV[2]) and redis.call('ZCARD', KEYS[1]) >= max then
  return 0
end
redis.call('ZADD', KEYS[1], string.format('%d', now + tonumber(ARGV[3])), ARGV[2])
redis.call('PEXPIRE', KEYS[1], ARGV[4])
return 1
"""

# KEYS: connections, streams. ARGV: now_ms, lease_ttl_ms, lease_key_ttl_ms, lease...
# Extends leases still live in either set; never re-adds one that was released or expired.
RENEW_LUA = """
local now = tonumber(ARGV[1])
local expiry = string.format('%d', now + tonumber(ARGV[2]))
local renewed = 0
for k = 1, 2 do
  redis.call('ZREMRANGEBYSCORE', KEYS[k], '-inf', ARGV[1])
  local here = 0
  for i = 4, #ARGV do
    if redis.call('ZSCORE', KEYS[k], ARGV[i]) then
      redis.call('ZADD', KEYS[k], 'XX', expiry, ARGV[i])
      here = here + 1
    end
  end
  if here > 0 then redis.call('PEXPIRE', KEYS[k], ARGV[3]) end
  renewed = renewed + here
end
return renewed
"""

# KEYS: requests, tokens, connections, streams. ARGV: now_ms, request burst, rate, token burst, rate.
# Read only. Returns {request level, token level, live connections, live streams}.
SNAPSHOT_LUA = (
    LUA_BUCKETS
    + """
local now = tonumber(ARGV[1])
local out = {0, 0, 0, 0}
if tonumber(ARGV[2]) > 0 then out[1] = refill(KEYS[1], tonumber(ARGV[2]), tonumber(ARGV[3]), now) end
if tonumber(ARGV[4]) > 0 then out[2] = refill(KEYS[2], tonumber(ARGV[4]), tonumber(ARGV[5]), now) end
out[3] = redis.call('ZCOUNT', KEYS[3], '(' .. ARGV[1], '+inf')
out[4] = redis.call('ZCOUNT', KEYS[4], '(' .. ARGV[1], '+inf')
return out
"""
)


def _bucket_args(limit: Rate | None) -> tuple[int, int]:
    return (0, 0) if limit is None else (limit.burst, limit.per_minute)


def _ints(reply: bytes | str) -> list[int]:
    """A reply of colon-separated integers (bytes, or str on a client with decode_responses)."""
    return [int(part) for part in (reply.split(b":") if isinstance(reply, bytes) else reply.split(":"))]


@dataclass(frozen=True, slots=True)
class _Plan:
    """A policy as the scripts take it, built once per distinct policy."""

    rates: Rates
    admit_plan: bytes  # ADMIT_LUA's ARGV[4]
    token_args: tuple[int, int]
    request_args: tuple[int, int]

    @classmethod
    def of(cls, policy: LimitPolicy, *, lease_ttl_ms: int, lease_key_ttl_ms: int) -> _Plan:
        limits = rates(policy)
        streams_cap = -1 if policy.max_concurrent_streams is None else policy.max_concurrent_streams
        figures = (
            lease_ttl_ms,
            lease_key_ttl_ms,
            streams_cap,
            *_bucket_args(limits.requests),
            *_bucket_args(limits.user_requests),
            *_bucket_args(limits.tokens),
        )
        return cls(
            rates=limits,
            admit_plan=struct.pack(">9q", *figures),
            token_args=_bucket_args(limits.tokens),
            request_args=_bucket_args(limits.requests),
        )


def _level(value: Any, limit: Rate | None, now_ms: int) -> Bucket | None:
    return None if limit is None else Bucket(int(value), now_ms)


class RedisLimiter:
    """Token buckets and leases in Redis, shared by every gateway process.

    ``client`` should come from a deliberately sized pool (see ``build_limiter``); it is closed
    by ``aclose`` only when ``owns_client`` is true.
    """

    ADMIT = Script.of(ADMIT_LUA)
    SETTLE = Script.of(SETTLE_LUA)
    ACQUIRE = Script.of(ACQUIRE_LUA)
    RENEW = Script.of(RENEW_LUA)
    SNAPSHOT = Script.of(SNAPSHOT_LUA)
    # A trivial script: the floor the benchmark compares the real ones with.
    NOOP = Script.of("return 1")

    def __init__(
        self,
        client: Redis,
        *,
        lease_ttl: float = 30.0,
        owns_client: bool = False,
        runner: ScriptRunner | None = None,
        reply_within: float | None = None,
    ) -> None:
        if lease_ttl <= 0:
            raise ValueError(f"lease_ttl must be > 0, got {lease_ttl}")
        self._client = client
        self._owns_client = owns_client
        # Shared with the resume buffer and metering when given, so a request's last calls to
        # each leave in one pipeline; the runner must be on ``client``.
        self._runner = ScriptRunner(client) if runner is None else runner
        # Time Redis has to answer a call once it has left (scripts.py); None: as long as it takes.
        self.reply_within = reply_within
        self._undoing: set[asyncio.Task[None]] = set()
        self.undone = 0  # admissions made in Redis after their caller gave up, given back
        self._ttl_ms = to_ms(lease_ttl)
        self._key_ttl_ms = self._ttl_ms * LEASE_KEY_FACTOR
        # Per-call work kept off the hot path: key names per tenant, script arguments per policy.
        self._keys: BoundedCache[str, TenantKeys] = BoundedCache(tenant_keys)
        self._plans: BoundedCache[LimitPolicy, _Plan] = BoundedCache(
            lambda policy: _Plan.of(policy, lease_ttl_ms=self._ttl_ms, lease_key_ttl_ms=self._key_ttl_ms)
        )

    @property
    def lease_ttl(self) -> float:
        return self._ttl_ms / 1000

    @property
    def client(self) -> Redis:
        return self._client

    @property
    def script_loads(self) -> int:
        """NOSCRIPT recoveries (after a Redis restart, failover or SCRIPT FLUSH)."""
        return self._runner.script_loads

    async def run(self, script: Script, keys: Sequence[str], args: Sequence[str | bytes | int]) -> Any:
        """EVALSHA, loading the script once and retrying if Redis does not know it."""
        return await self._runner.run(script, keys, args, reply_within=self.reply_within)

    async def admit(
        self,
        tenant: str,
        user: str,
        policy: LimitPolicy,
        *,
        lease: str,
        estimate_tokens: int,
        now: float,
        claim: Claim | None = None,
    ) -> Admission:
        check_count("estimate_tokens", estimate_tokens)
        if policy.has_zero_limit:
            refuse_closed_doors(policy)
        now_ms = to_ms(now)
        keys = self._keys(tenant)
        plan = self._plans(policy)
        script_keys: tuple[str, ...] = (keys.requests, keys.user_requests(user), keys.tokens, keys.streams)
        args: tuple[str | bytes | int, ...] = (now_ms, lease, estimate_tokens, plan.admit_plan)
        if claim is not None:
            script_keys += (claim.key,)
            args += (claim.ttl_ms, claim.owner)

        def admission_of(reply: list[int]) -> Admission:
            limits = plan.rates
            return build_admission(
                tenant,
                user,
                policy,
                limits,
                lease=lease,
                estimate_tokens=estimate_tokens,
                requests=reply[2] if limits.requests is not None else None,
                user_requests=reply[3] if limits.user_requests is not None else None,
                tokens=reply[4] if limits.tokens is not None else None,
                backend="redis",
                claimed=claim is not None,
            )

        def late(raw: Any) -> None:
            # The caller timed out or was cancelled, so nobody will settle what Redis admitted:
            # give the stream slot and the reservation back now rather than at the lease's expiry.
            reply = _ints(raw)
            if reply[0] == 0:
                self._give_back(admission_of(reply), policy)

        raw = await self._runner.run(self.ADMIT, script_keys, args, reply_within=self.reply_within, late=late)
        reply = _ints(raw)
        verdict = reply[0]
        if verdict:
            raise refusal(Verdict(verdict), reply[1])
        return admission_of(reply)

    def _give_back(self, admission: Admission, policy: LimitPolicy) -> None:
        async def settle() -> None:
            try:
                # In the background: Redis may take its time, nobody waits for this.
                await self._settle(admission, policy, used_tokens=0, now=time.time(), reply_within=None)
                self.undone += 1
            except Exception:  # the lease then expires by itself within lease_ttl
                log.warning("could not give back an admission whose caller gave up", exc_info=True)

        task = asyncio.get_running_loop().create_task(settle())
        self._undoing.add(task)
        task.add_done_callback(self._undoing.discard)

    async def settle(
        self, admission: Admission, policy: LimitPolicy, *, used_tokens: int, now: float
    ) -> None:
        reply_within = self.reply_within
        await self._settle(admission, policy, used_tokens=used_tokens, now=now, reply_within=reply_within)

    async def _settle(
        self,
        admission: Admission,
        policy: LimitPolicy,
        *,
        used_tokens: int,
        now: float,
        reply_within: float | None,
    ) -> None:
        check_count("used_tokens", used_tokens)
        keys = self._keys(admission.tenant)
        await self._runner.run(
            self.SETTLE,
            (keys.tokens, keys.streams),
            (
                to_ms(now),
                admission.stream_lease,
                *self._plans(policy).token_args,
                admission.reserved_tokens - used_tokens,
            ),
            reply_within=reply_within,
        )

    async def acquire_connection(self, tenant: str, policy: LimitPolicy, *, lease: str, now: float) -> None:
        refuse_closed_connections(policy)
        cap = -1 if policy.max_connections is None else policy.max_connections
        held = await self.run(
            self.ACQUIRE,
            (self._keys(tenant).connections,),
            (to_ms(now), lease, self._ttl_ms, self._key_ttl_ms, cap),
        )
        if int(held) != 1:
            raise TooManyConnections("too many connections for this tenant")

    async def release_connection(self, tenant: str, *, lease: str) -> None:
        # A single ZREM is atomic already; no script needed.
        await self._client.zrem(self._keys(tenant).connections, lease)

    async def renew(self, tenant: str, leases: Sequence[str], *, now: float) -> None:
        if not leases:
            return
        keys = self._keys(tenant)
        await self.run(
            self.RENEW,
            (keys.connections, keys.streams),
            (to_ms(now), self._ttl_ms, self._key_ttl_ms, *leases),
        )

    async def snapshot(self, tenant: str, policy: LimitPolicy, *, now: float) -> Snapshot:
        now_ms = to_ms(now)
        keys = self._keys(tenant)
        plan = self._plans(policy)
        reply = await self.run(
            self.SNAPSHOT,
            (keys.requests, keys.tokens, keys.connections, keys.streams),
            (now_ms, *plan.request_args, *plan.token_args),
        )
        return build_snapshot(
            policy,
            requests=_level(reply[0], plan.rates.requests, now_ms),
            tokens=_level(reply[1], plan.rates.tokens, now_ms),
            connections=int(reply[2]),
            streams=int(reply[3]),
        )

    async def aclose(self) -> None:
        if self._undoing:
            await asyncio.gather(*self._undoing, return_exceptions=True)
        if self._owns_client:
            await self._client.aclose()
