"""The in-process limiter: one gateway process, or the local fallback while Redis is away.

It keeps the same state as the Redis backend, under the same key names, and decides with the
same pure functions, step for step in the order the Lua scripts follow. Every method runs
without awaiting anything, so each decision is atomic on the event loop.
"""

from __future__ import annotations

from collections.abc import Sequence

from hubgate.errors import TooManyConnections
from hubgate.keys import Claim
from hubgate.ratelimit import buckets
from hubgate.ratelimit.base import (
    Admission,
    BoundedCache,
    Rate,
    Snapshot,
    Verdict,
    build_admission,
    build_snapshot,
    check_count,
    longest_wait,
    rates,
    refusal,
    refuse_closed_connections,
    refuse_closed_doors,
    tenant_keys,
)
from hubgate.ratelimit.buckets import Bucket, to_ms
from hubgate.ratelimit.policy import LimitPolicy

# Idle state is dropped by a sweep every this many calls, as Redis drops keys by their TTL;
# a sweep walks every key, so it runs rarely enough to cost nothing per call on average.
SWEEP_EVERY = 4096


class MemoryLimiter:
    """Token buckets and leases in a dict. Semantics identical to ``RedisLimiter``."""

    def __init__(self, lease_ttl: float = 30.0, *, backend: str = "memory") -> None:
        if lease_ttl <= 0:
            raise ValueError(f"lease_ttl must be > 0, got {lease_ttl}")
        self._ttl_ms = to_ms(lease_ttl)
        self._backend = backend
        self._buckets: dict[str, tuple[Bucket, int]] = {}  # key -> (bucket, ms when full again)
        self._leases: dict[str, dict[str, int]] = {}  # key -> {lease: expiry ms}
        self._calls = 0
        self._rates = BoundedCache(rates)

    @property
    def lease_ttl(self) -> float:
        return self._ttl_ms / 1000

    async def admit(
        self,
        tenant: str,
        user: str,
        policy: LimitPolicy,
        *,
        lease: str,
        estimate_tokens: int,
        now: float,
        claim: Claim | None = None,  # not kept here: the caller creates it (Admission.claimed false)
    ) -> Admission:
        check_count("estimate_tokens", estimate_tokens)
        if policy.has_zero_limit:
            refuse_closed_doors(policy)
        now_ms = to_ms(now)
        self._tick(now_ms)
        keys = tenant_keys(tenant)
        limits = self._rates(policy)
        user_key = keys.user_requests(user)
        streams = self._live(keys.streams, now_ms)

        def admission(
            requests: Bucket | None, user_requests: Bucket | None, tokens: Bucket | None
        ) -> Admission:
            return build_admission(
                tenant,
                user,
                policy,
                limits,
                lease=lease,
                estimate_tokens=estimate_tokens,
                requests=None if requests is None else requests.level,
                user_requests=None if user_requests is None else user_requests.level,
                tokens=None if tokens is None else tokens.level,
                backend=self._backend,
            )

        if lease in streams:
            # The same lease again: a retry whose first attempt was applied. Renew, charge nothing.
            streams[lease] = now_ms + self._ttl_ms
            return admission(
                self._current(keys.requests, limits.requests, now_ms),
                self._current(user_key, limits.user_requests, now_ms),
                self._current(keys.tokens, limits.tokens, now_ms),
            )
        if policy.max_concurrent_streams is not None and len(streams) >= policy.max_concurrent_streams:
            raise refusal(Verdict.STREAMS, 0)

        checks = (
            (Verdict.REQUESTS, keys.requests, limits.requests, 1),
            (Verdict.USER_REQUESTS, user_key, limits.user_requests, 1),
            (Verdict.TOKENS, keys.tokens, limits.tokens, estimate_tokens),
        )
        outcomes: list[buckets.Check | None] = []
        for _, key, limit, cost in checks:
            stored = self._stored(key)
            outcomes.append(
                None
                if limit is None
                else buckets.check(
                    stored, cost=cost, burst=limit.burst, per_minute=limit.per_minute, now_ms=now_ms
                )
            )
        verdict, wait = longest_wait(
            [(v, o.wait_ms) for (v, _, _, _), o in zip(checks, outcomes, strict=True) if o is not None]
        )
        if verdict is not Verdict.ADMITTED:
            raise refusal(verdict, wait)

        after: list[Bucket | None] = []
        for (_, key, limit, cost), outcome in zip(checks, outcomes, strict=True):
            if outcome is None or limit is None:
                after.append(None)
                continue
            charged = buckets.take(outcome.bucket, cost)
            self._store(key, charged, limit)
            after.append(charged)
        streams[lease] = now_ms + self._ttl_ms
        return admission(after[0], after[1], after[2])

    async def settle(
        self, admission: Admission, policy: LimitPolicy, *, used_tokens: int, now: float
    ) -> None:
        check_count("used_tokens", used_tokens)
        now_ms = to_ms(now)
        self._tick(now_ms)
        keys = tenant_keys(admission.tenant)
        streams = self._leases.get(keys.streams, {})
        # Only a live lease carries its reservation: settling twice (a retried call) or after
        # the lease expired changes nothing, so a retry can never refund the same tokens twice.
        expiry = streams.pop(admission.stream_lease, None)
        if expiry is None or expiry <= now_ms:
            return
        limit = self._rates(policy).tokens
        delta = admission.reserved_tokens - used_tokens
        if limit is None or delta == 0:
            return
        current = buckets.refill(
            self._stored(keys.tokens), burst=limit.burst, per_minute=limit.per_minute, now_ms=now_ms
        )
        self._store(keys.tokens, buckets.adjust(current, delta_tokens=delta, burst=limit.burst), limit)

    async def acquire_connection(self, tenant: str, policy: LimitPolicy, *, lease: str, now: float) -> None:
        refuse_closed_connections(policy)
        now_ms = to_ms(now)
        self._tick(now_ms)
        held = self._live(tenant_keys(tenant).connections, now_ms)
        if lease not in held and policy.max_connections is not None and len(held) >= policy.max_connections:
            raise TooManyConnections("too many connections for this tenant")
        held[lease] = now_ms + self._ttl_ms

    async def release_connection(self, tenant: str, *, lease: str) -> None:
        held = self._leases.get(tenant_keys(tenant).connections)
        if held is not None:
            held.pop(lease, None)

    async def renew(self, tenant: str, leases: Sequence[str], *, now: float) -> None:
        now_ms = to_ms(now)
        keys = tenant_keys(tenant)
        for key in (keys.connections, keys.streams):
            held = self._live(key, now_ms)
            for lease in leases:
                if lease in held:  # never resurrects a lease already released or expired
                    held[lease] = now_ms + self._ttl_ms

    async def snapshot(self, tenant: str, policy: LimitPolicy, *, now: float) -> Snapshot:
        now_ms = to_ms(now)
        keys = tenant_keys(tenant)
        limits = self._rates(policy)
        return build_snapshot(
            policy,
            requests=self._current(keys.requests, limits.requests, now_ms),
            tokens=self._current(keys.tokens, limits.tokens, now_ms),
            connections=self._count_live(keys.connections, now_ms),
            streams=self._count_live(keys.streams, now_ms),
        )

    async def aclose(self) -> None:
        self._buckets.clear()
        self._leases.clear()

    # -- state -----------------------------------------------------------------------------

    def _stored(self, key: str) -> Bucket | None:
        entry = self._buckets.get(key)
        return None if entry is None else entry[0]

    def _current(self, key: str, limit: Rate | None, now_ms: int) -> Bucket | None:
        if limit is None:
            return None
        return buckets.refill(
            self._stored(key), burst=limit.burst, per_minute=limit.per_minute, now_ms=now_ms
        )

    def _store(self, key: str, bucket: Bucket, limit: Rate) -> None:
        full_at = bucket.at_ms + buckets.time_to_full_ms(
            bucket, burst=limit.burst, per_minute=limit.per_minute
        )
        self._buckets[key] = (bucket, full_at)

    def _count_live(self, key: str, now_ms: int) -> int:
        """Leases under ``key`` still live at ``now_ms``, without purging (a read, as in Redis)."""
        return sum(1 for expiry in self._leases.get(key, {}).values() if expiry > now_ms)

    def _live(self, key: str, now_ms: int) -> dict[str, int]:
        """The lease set under ``key``, with leases expired by ``now_ms`` removed."""
        held = self._leases.setdefault(key, {})
        expired = [lease for lease, expiry in held.items() if expiry <= now_ms]
        for lease in expired:
            del held[lease]
        return held

    def _tick(self, now_ms: int) -> None:
        self._calls += 1
        if self._calls % SWEEP_EVERY:
            return
        # A full bucket is the same as no bucket, and an empty lease set the same as none.
        for key in [k for k, (_, full_at) in self._buckets.items() if full_at <= now_ms]:
            del self._buckets[key]
        for key in list(self._leases):
            if not self._live(key, now_ms):
                del self._leases[key]
