"""The limiter interface, and the pure decision rules every backend shares.

A backend keeps, per tenant: a request bucket, a token bucket, one request bucket per user,
and two lease sets (connections and streams) mapping an opaque lease string to its expiry.
``MemoryLimiter`` keeps them in a dict, ``RedisLimiter`` in Redis keys updated by Lua scripts;
both call the functions below so that they decide identically.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from enum import IntEnum
from typing import Generic, Protocol, TypeVar

from hubgate.errors import (
    DuplicateId,
    RateLimited,
    RequestError,
    TokenRateLimited,
    TooManyConnections,
    TooManyStreams,
)
from hubgate.keys import Claim, tenant_tag
from hubgate.ratelimit import buckets
from hubgate.ratelimit.buckets import Bucket
from hubgate.ratelimit.policy import LimitPolicy

Snapshot = dict[str, float | int | None]
K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


@dataclass(frozen=True, slots=True)
class Admission:
    """A request the limiter let through; hand it back to ``settle`` when the stream ends."""

    tenant: str
    user: str
    stream_lease: str
    reserved_tokens: int  # 0 when the tenant has no token limit
    remaining_requests: int | None  # after this admission, tenant and user buckets; None: unlimited
    remaining_tokens: int | None  # after the reservation, never below 0; None: unlimited
    reset_seconds: float  # until the request bucket(s) are full again; 0.0 when unlimited
    backend: str = "memory"  # which backend admitted it ("memory", "redis", "local"): it must settle there
    claimed: bool = False  # the admission also created the request's claim key (see Claim)


class Limiter(Protocol):
    """What the gateway needs from a rate limiter. ``now`` is the caller's ``time.time()``."""

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
        """Admit one request or raise RateLimited, TokenRateLimited, TooManyStreams, DuplicateId
        (the claim exists), LimiterUnavailable."""
        ...

    async def settle(
        self, admission: Admission, policy: LimitPolicy, *, used_tokens: int, now: float
    ) -> None:
        """Refund or charge the difference between reserved and used tokens; release the stream lease."""
        ...

    async def acquire_connection(self, tenant: str, policy: LimitPolicy, *, lease: str, now: float) -> None:
        """Hold a connection lease or raise TooManyConnections."""
        ...

    async def release_connection(self, tenant: str, *, lease: str) -> None:
        """Give a connection lease back."""
        ...

    async def renew(self, tenant: str, leases: Sequence[str], *, now: float) -> None:
        """Push the expiry of leases still held (connections and streams) to ``now + lease_ttl``."""
        ...

    async def snapshot(self, tenant: str, policy: LimitPolicy, *, now: float) -> Snapshot:
        """Remaining figures for one tenant (admin and tests)."""
        ...

    async def aclose(self) -> None:
        """Release the backend's resources."""
        ...


@dataclass(frozen=True, slots=True)
class TenantKeys:
    """Where one tenant's state lives: Redis keys, also used as dict keys by the memory backend.

    Every key carries the hash tag ``{t:<tenant>}`` so all of a tenant's keys (per-user buckets
    included) hash to one cluster slot and one script may touch them together (Redis Cluster and
    ElastiCache Serverless refuse multi-key scripts across slots).
    """

    requests: str
    tokens: str
    connections: str
    streams: str
    user_prefix: str

    def user_requests(self, user: str) -> str:
        return f"{self.user_prefix}{user}:rq"


def tenant_keys(tenant: str) -> TenantKeys:
    """The limiter keys of one tenant."""
    tag = tenant_tag(tenant)
    return TenantKeys(
        requests=f"{tag}:rq",
        tokens=f"{tag}:tk",
        connections=f"{tag}:conn",
        streams=f"{tag}:streams",
        user_prefix=f"{tag}:u:",
    )


class Verdict(IntEnum):
    """Why an admission was refused; the Redis admit script returns these numbers."""

    ADMITTED = 0
    STREAMS = 1
    REQUESTS = 2
    USER_REQUESTS = 3
    TOKENS = 4
    DUPLICATE = 5


@dataclass(frozen=True, slots=True)
class Rate:
    """One bucket's parameters: capacity in tokens and refill per minute (both positive)."""

    burst: int
    per_minute: int


def rate(per_minute: int | None, burst: int | None) -> Rate | None:
    """A bucket's parameters, or None when it does not apply (unlimited, or a closed door)."""
    if per_minute is None or burst is None or per_minute == 0 or burst == 0:
        return None
    return Rate(burst, per_minute)


@dataclass(frozen=True, slots=True)
class Rates:
    """The three buckets a policy may ask for."""

    requests: Rate | None
    user_requests: Rate | None
    tokens: Rate | None


def rates(policy: LimitPolicy) -> Rates:
    return Rates(
        requests=rate(policy.requests_per_minute, policy.request_capacity),
        user_requests=rate(policy.per_user_requests_per_minute, policy.user_request_capacity),
        tokens=rate(policy.tokens_per_minute, policy.token_capacity),
    )


def refuse_closed_doors(policy: LimitPolicy) -> None:
    """Refuse a request outright when the policy allows none of something (a zero limit).

    Checked before any I/O, so backends never see a zero rate or capacity (and never divide by one).
    """
    if policy.max_concurrent_streams == 0:
        raise TooManyStreams("this tenant may not open streams")
    if policy.requests_per_minute == 0 or policy.request_capacity == 0:
        raise RateLimited("this tenant may not send requests")
    if policy.per_user_requests_per_minute == 0 or policy.user_request_capacity == 0:
        raise RateLimited("this user may not send requests")
    if policy.tokens_per_minute == 0 or policy.token_capacity == 0:
        raise TokenRateLimited("this tenant may not use tokens")


def refuse_closed_connections(policy: LimitPolicy) -> None:
    """Refuse a connection when the tenant may hold none."""
    if policy.max_connections == 0:
        raise TooManyConnections("this tenant may not connect")


def longest_wait(waits: Sequence[tuple[Verdict, int]]) -> tuple[Verdict, int]:
    """The check to report when several fail: the longest wait (the first one on a tie).

    Reporting the longest wait makes ``retry_after`` mean "every limit that refused you
    will have room then", not just the first one checked.
    """
    verdict, longest = Verdict.ADMITTED, 0
    for candidate, wait in waits:
        if wait > longest:
            verdict, longest = candidate, wait
    return verdict, longest


def refusal(verdict: Verdict, wait_ms: int) -> RequestError:
    """The error a refused admission raises."""
    retry_after = wait_ms / 1000
    if verdict is Verdict.STREAMS:
        return TooManyStreams("too many concurrent streams for this tenant")
    if verdict is Verdict.REQUESTS:
        return RateLimited("tenant request rate exceeded", retry_after=retry_after)
    if verdict is Verdict.USER_REQUESTS:
        return RateLimited("user request rate exceeded", retry_after=retry_after)
    if verdict is Verdict.TOKENS:
        return TokenRateLimited("tenant token rate exceeded", retry_after=retry_after)
    if verdict is Verdict.DUPLICATE:
        return DuplicateId("request id already used")
    raise ValueError(f"not a refusal: {verdict!r}")


def reserved_tokens(policy: LimitPolicy, estimate_tokens: int) -> int:
    """Tokens an admission reserves: the estimate, or 0 when tokens are not limited."""
    return estimate_tokens if policy.tokens_per_minute is not None else 0


def build_admission(
    tenant: str,
    user: str,
    policy: LimitPolicy,
    limits: Rates,
    *,
    lease: str,
    estimate_tokens: int,
    requests: int | None,
    user_requests: int | None,
    tokens: int | None,
    backend: str,
    claimed: bool = False,
) -> Admission:
    """An Admission from the buckets' levels (units) after the admission; None for a bucket not in use.

    Runs once per admitted request, so it works on bare levels rather than Bucket objects.
    """
    remaining: int | None = None
    reset_ms = 0
    for level, limit in ((requests, limits.requests), (user_requests, limits.user_requests)):
        if level is None or limit is None:
            continue
        left = max(0, level // buckets.UNITS_PER_TOKEN)
        remaining = left if remaining is None or left < remaining else remaining
        deficit = buckets.capacity(limit.burst) - level
        if deficit > 0:
            reset_ms = max(reset_ms, buckets.ceil_div(deficit, limit.per_minute))
    tokens_left = None
    if tokens is not None and limits.tokens is not None:
        tokens_left = max(0, tokens // buckets.UNITS_PER_TOKEN)
    return Admission(
        tenant=tenant,
        user=user,
        stream_lease=lease,
        reserved_tokens=reserved_tokens(policy, estimate_tokens),
        remaining_requests=remaining,
        remaining_tokens=tokens_left,
        reset_seconds=reset_ms / 1000,
        backend=backend,
        claimed=claimed,
    )


def build_snapshot(
    policy: LimitPolicy, *, requests: Bucket | None, tokens: Bucket | None, connections: int, streams: int
) -> Snapshot:
    """The figures ``snapshot`` reports (None: unlimited). Token debt shows as a negative count."""
    limits = rates(policy)
    out: Snapshot = {
        "requests_remaining": None,
        "requests_reset_seconds": None,
        "tokens_remaining": None,
        "tokens_reset_seconds": None,
        "connections": connections,
        "connections_limit": policy.max_connections,
        "streams": streams,
        "streams_limit": policy.max_concurrent_streams,
    }
    for name, bucket, configured, limit in (
        ("requests", requests, policy.requests_per_minute, limits.requests),
        ("tokens", tokens, policy.tokens_per_minute, limits.tokens),
    ):
        if configured is None:
            continue
        if bucket is None or limit is None:  # a closed door: nothing now, nothing later
            out[f"{name}_remaining"] = 0
            continue
        out[f"{name}_remaining"] = buckets.whole_tokens(bucket)
        ttf = buckets.time_to_full_ms(bucket, burst=limit.burst, per_minute=limit.per_minute)
        out[f"{name}_reset_seconds"] = ttf / 1000
    return out


def check_count(name: str, value: int) -> None:
    """Token counts come from estimates and Bedrock usage; a negative one is a caller bug."""
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")


class BoundedCache(Generic[K, V]):
    """Values derived from a few distinct keys (policies, tenant ids), computed once each.

    Owned by one limiter instance; emptied when it reaches ``size`` so an unexpected variety of
    keys costs recomputation, never unbounded memory.
    """

    def __init__(self, build: Callable[[K], V], size: int = 4096) -> None:
        self._build = build
        self._size = size
        self._values: dict[K, V] = {}

    def __call__(self, key: K) -> V:
        value = self._values.get(key)
        if value is None:
            if len(self._values) >= self._size:
                self._values.clear()
            value = self._values[key] = self._build(key)
        return value
