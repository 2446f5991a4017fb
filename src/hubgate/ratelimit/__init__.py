"""Per-tenant rate limits: token buckets for requests and tokens, leases for connections and streams.

``buckets`` is the pure arithmetic; ``memory`` and ``redis_backend`` keep the state (one process,
or shared by every gateway through Redis); ``resilient`` decides what happens when Redis is not
there. ``build_limiter`` picks and wires them from the settings. See docs/rate-limits.md.
"""

from __future__ import annotations

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from hubgate.ratelimit.base import Admission, Limiter, Snapshot
from hubgate.ratelimit.memory import MemoryLimiter
from hubgate.ratelimit.policy import LimitPolicy
from hubgate.ratelimit.redis_backend import RedisLimiter
from hubgate.ratelimit.resilient import CircuitBreaker, LimiterStats, ResilientLimiter
from hubgate.scripts import ScriptRunner
from hubgate.settings import FailureMode

__all__ = [
    "Admission",
    "CircuitBreaker",
    "LimitPolicy",
    "Limiter",
    "LimiterStats",
    "MemoryLimiter",
    "RedisLimiter",
    "ResilientLimiter",
    "Snapshot",
    "build_limiter",
    "limiter_client",
]

# Socket timeouts are a backstop under the per-call asyncio.timeout (which is what bounds a
# decision): they stop a half-open TCP connection from being kept forever by the pool.
SOCKET_TIMEOUT = 0.5
# PING a pooled connection idle this long before reusing it: NAT gateways and ElastiCache drop
# idle connections silently, and a dead connection found by a real call would cost that call.
HEALTH_CHECK_INTERVAL = 30


def build_limiter(
    redis_url: str | None,
    *,
    mode: FailureMode = "local",
    expected_instances: int = 2,
    timeout_ms: int = 50,
    max_connections: int = 64,
    lease_ttl: float = 30.0,
    runner: ScriptRunner | None = None,
) -> Limiter:
    """The limiter the gateway uses: in memory without a Redis URL, else Redis behind the failure policy.

    Called once in the app's lifespan; the result is closed with ``aclose`` at shutdown. With a
    ``runner`` (on a client from ``limiter_client``, shared with the resume buffer and metering)
    the limiter uses it and leaves its client to the caller; without one it makes its own.
    """
    if redis_url is None:
        return MemoryLimiter(lease_ttl)
    if runner is None:
        primary = RedisLimiter(
            limiter_client(redis_url, timeout_ms=timeout_ms, max_connections=max_connections),
            lease_ttl=lease_ttl,
            owns_client=True,  # the client owns the pool: RedisLimiter.aclose closes both
        )
    else:
        primary = RedisLimiter(runner.client, lease_ttl=lease_ttl, runner=runner)
    return ResilientLimiter(
        primary,
        mode=mode,
        expected_instances=expected_instances,
        timeout=timeout_ms / 1000,
    )


def limiter_client(redis_url: str, *, timeout_ms: int = 50, max_connections: int = 64) -> Redis:
    """A Redis client for decisions: a bounded pool, short waits, no retries inside redis-py."""
    timeout = timeout_ms / 1000
    pool = BlockingConnectionPool.from_url(
        redis_url,
        # A fixed ceiling per process: under a burst, callers queue for a connection instead of
        # opening hundreds (ElastiCache caps connections per node, 65,000 minus reserved ones,
        # and every new TLS connection costs a handshake).
        max_connections=max_connections,
        # ...but queue briefly: a decision that cannot get a connection within its own budget
        # counts as a Redis failure (and falls back) rather than waiting or raising at the cap.
        timeout=timeout,
        socket_connect_timeout=SOCKET_TIMEOUT,
        socket_timeout=SOCKET_TIMEOUT,
        health_check_interval=HEALTH_CHECK_INTERVAL,
        # No retries inside redis-py (its default backs off for up to seconds): ResilientLimiter
        # retries once within the decision's budget and owns the breaker.
        retry=Retry(NoBackoff(), 0),
    )
    return Redis.from_pool(pool)  # the client owns the pool: closing it closes both
