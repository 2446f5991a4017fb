"""What happens to rate limiting when Redis is slow or gone: the failure policy and its breaker.

Every Redis call runs under ``asyncio.timeout(timeout)`` and is retried at most once (each
script is idempotent per lease, so a retry after a lost reply charges nothing twice). When
Redis cannot answer, the configured mode decides:

``closed``  requests and new connections are refused with ``LimiterUnavailable``.
``local``   an in-process ``MemoryLimiter`` decides with the tenant's limits divided by the
            number of expected instances, so the fleet stays near its limits; never unlimited.

A circuit breaker opens after ``failure_threshold`` consecutive failed calls: while open, no
call touches Redis (a dead Redis costs nothing per request, not even a connection attempt).
After ``reset_timeout`` seconds one call probes Redis; if it answers, Redis limits resume at
once, with no restart. Admissions made locally settle locally (``Admission.backend``).

redis-py errors stop here: callers see only ``hubgate.errors`` types. Fallbacks are counted in
``stats`` and logged once per change of state on the ``hubgate.ratelimit`` logger, never once
per request.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Literal, TypeVar

from redis.exceptions import RedisError

from hubgate.errors import GatewayError, LimiterUnavailable
from hubgate.keys import Claim
from hubgate.ratelimit.base import (
    Admission,
    Snapshot,
    check_count,
    refuse_closed_connections,
    refuse_closed_doors,
)
from hubgate.ratelimit.memory import MemoryLimiter
from hubgate.ratelimit.policy import LimitPolicy
from hubgate.ratelimit.redis_backend import RedisLimiter
from hubgate.settings import FailureMode

log = logging.getLogger("hubgate.ratelimit")

T = TypeVar("T")
BreakerState = Literal["closed", "open", "half_open"]

# What "Redis could not answer" looks like: redis-py's own errors (connection refused or reset,
# its socket timeouts, a full pool, LOADING, READONLY, a failed script reload) and the builtin
# TimeoutError raised by asyncio.timeout, plus any OSError that escapes the client.
REDIS_FAILURES: tuple[type[BaseException], ...] = (RedisError, OSError)

LOCAL_BACKEND = "local"


class CircuitBreaker:
    """Closed → open after consecutive failures → half-open probe after a pause → closed again.

    Pure state: the caller passes the time (any monotonic clock) and reports each outcome.
    """

    def __init__(self, *, failure_threshold: int = 3, reset_timeout: float = 2.0) -> None:
        if failure_threshold < 1:
            raise ValueError(f"failure_threshold must be >= 1, got {failure_threshold}")
        self.failure_threshold = failure_threshold
        self.reset_timeout = reset_timeout
        self.state: BreakerState = "closed"
        self._failures = 0
        self._opened_at = 0.0
        self._probing = False

    def allow(self, now: float) -> bool:
        """May a call go to Redis now? In half-open state only one probe at a time may."""
        if self.state == "closed":
            return True
        if self.state == "open":
            if now - self._opened_at < self.reset_timeout:
                return False
            self.state = "half_open"
            self._probing = False
        if self._probing:
            return False
        self._probing = True
        return True

    @property
    def probing(self) -> bool:
        return self.state == "half_open" and self._probing

    def record_success(self) -> bool:
        """Redis answered. Returns True when this closed a breaker that was not closed."""
        was = self.state
        self.state = "closed"
        self._failures = 0
        self._probing = False
        return was != "closed"

    def record_failure(self, now: float) -> bool:
        """Redis did not answer. Returns True when this opened the breaker."""
        self._failures += 1
        if self.state == "half_open" or (self.state == "closed" and self._failures >= self.failure_threshold):
            self.state = "open"
            self._opened_at = now
            self._probing = False
            return True
        return False

    def record_abandoned(self) -> None:
        """A probe was cancelled before it learned anything: let the next call probe instead."""
        if self.state == "half_open":
            self._probing = False


@dataclass(slots=True)
class LimiterStats:
    """Counters for metrics and tests (monotonic, except ``breaker_state``)."""

    breaker_state: BreakerState = "closed"
    fallbacks: int = 0  # decisions made without Redis: local_decisions + unavailable
    local_decisions: int = 0  # admissions and connections decided by the local fallback
    unavailable: int = 0  # LimiterUnavailable raised (mode "closed")
    redis_failures: int = 0  # Redis attempts that failed or timed out (a retry counts again)
    retries: int = 0
    short_circuits: int = 0  # calls that skipped Redis because the breaker was open
    breaker_opens: int = 0  # closed -> open, and open again after each failed probe
    lost_updates: int = 0  # settle, release or renew that could not reach Redis


class _Unreachable(Exception):
    """Internal: Redis could not answer this call (``cause`` is None when the breaker said no)."""

    def __init__(self, cause: BaseException | None) -> None:
        super().__init__("redis unreachable")
        self.cause = cause


# The bound on a whole call (see ResilientLimiter.__init__): the larger of these.
BACKSTOP_SECONDS = 1.0
BACKSTOP_FACTOR = 20


class ResilientLimiter:
    """A ``RedisLimiter`` with timeouts, one retry, a circuit breaker and a failure mode."""

    def __init__(
        self,
        primary: RedisLimiter,
        *,
        mode: FailureMode,
        expected_instances: int,
        timeout: float = 0.05,
        failure_threshold: int = 3,
        reset_timeout: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if mode not in ("closed", "local"):
            raise ValueError(f"mode must be 'closed' or 'local', got {mode!r}")
        if expected_instances < 1:
            raise ValueError(f"expected_instances must be >= 1, got {expected_instances}")
        if timeout <= 0:
            raise ValueError(f"timeout must be > 0, got {timeout}")
        self._primary = primary
        self._mode = mode
        self._instances = expected_instances
        # Redis has `timeout` to answer once a call has left (ScriptRunner, reply_within); the time
        # a call waits before it leaves, behind a busy event loop, is not Redis being slow. The
        # overall bound only catches what is not a script call, or a call that never leaves.
        primary.reply_within = timeout
        self._timeout = max(BACKSTOP_SECONDS, BACKSTOP_FACTOR * timeout)
        self._clock = clock
        self._breaker = CircuitBreaker(failure_threshold=failure_threshold, reset_timeout=reset_timeout)
        self._local = MemoryLimiter(primary.lease_ttl, backend=LOCAL_BACKEND)
        self._degraded = False
        self._fallbacks_at_outage = 0
        self.stats = LimiterStats()

    @property
    def mode(self) -> FailureMode:
        return self._mode

    @property
    def primary(self) -> RedisLimiter:
        return self._primary

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
        # Checked here too so that a refusal that needs no Redis never counts as Redis answering.
        check_count("estimate_tokens", estimate_tokens)
        if policy.has_zero_limit:
            refuse_closed_doors(policy)
        try:
            return await self._call(
                lambda: self._primary.admit(
                    tenant, user, policy, lease=lease, estimate_tokens=estimate_tokens, now=now, claim=claim
                )
            )
        except _Unreachable as down:
            self._refuse_if_closed(down)
            return await self._local.admit(
                tenant, user, self._share(policy), lease=lease, estimate_tokens=estimate_tokens, now=now
            )

    async def settle(
        self, admission: Admission, policy: LimitPolicy, *, used_tokens: int, now: float
    ) -> None:
        if admission.backend == LOCAL_BACKEND:
            await self._local.settle(admission, self._share(policy), used_tokens=used_tokens, now=now)
            return
        try:
            await self._call(
                lambda: self._primary.settle(admission, policy, used_tokens=used_tokens, now=now)
            )
        except _Unreachable:
            # Lost: the reservation stays charged (at most estimate - used tokens too many) and
            # the stream lease expires by itself within lease_ttl.
            self.stats.lost_updates += 1

    async def acquire_connection(self, tenant: str, policy: LimitPolicy, *, lease: str, now: float) -> None:
        refuse_closed_connections(policy)
        try:
            await self._call(lambda: self._primary.acquire_connection(tenant, policy, lease=lease, now=now))
        except _Unreachable as down:
            self._refuse_if_closed(down)
            await self._local.acquire_connection(tenant, self._share(policy), lease=lease, now=now)

    async def release_connection(self, tenant: str, *, lease: str) -> None:
        # The lease may be held in either place; releasing one that is not held is a no-op.
        await self._local.release_connection(tenant, lease=lease)
        try:
            await self._call(lambda: self._primary.release_connection(tenant, lease=lease))
        except _Unreachable:
            self.stats.lost_updates += 1

    async def renew(self, tenant: str, leases: Sequence[str], *, now: float) -> None:
        await self._local.renew(tenant, leases, now=now)
        if not leases:
            return
        try:
            await self._call(lambda: self._primary.renew(tenant, leases, now=now))
        except _Unreachable:
            self.stats.lost_updates += 1

    async def snapshot(self, tenant: str, policy: LimitPolicy, *, now: float) -> Snapshot:
        try:
            return await self._call(lambda: self._primary.snapshot(tenant, policy, now=now))
        except _Unreachable as down:
            if self._mode == "closed":
                raise LimiterUnavailable("rate limiter unavailable") from down.cause
            return await self._local.snapshot(tenant, self._share(policy), now=now)

    async def aclose(self) -> None:
        try:
            await self._primary.aclose()
        finally:
            await self._local.aclose()

    # -- failure handling ----------------------------------------------------------------

    def _share(self, policy: LimitPolicy) -> LimitPolicy:
        return policy.scaled(self._instances)

    def _refuse_if_closed(self, down: _Unreachable) -> None:
        self.stats.fallbacks += 1
        if self._mode == "closed":
            self.stats.unavailable += 1
            raise LimiterUnavailable("rate limiter unavailable") from down.cause
        self.stats.local_decisions += 1

    async def _call(self, op: Callable[[], Awaitable[T]]) -> T:
        """Run ``op`` on Redis under the breaker, timeout and retry; raise _Unreachable if it cannot."""
        allowed = self._breaker.allow(self._clock())
        self.stats.breaker_state = self._breaker.state
        if not allowed:
            self.stats.short_circuits += 1
            raise _Unreachable(None)
        # A probe tries once: the point is to learn quickly whether Redis is back.
        attempts = 1 if self._breaker.probing else 2
        cause: BaseException | None = None
        decided = False
        try:
            for attempt in range(attempts):
                if attempt:
                    self.stats.retries += 1
                try:
                    async with asyncio.timeout(self._timeout):
                        result = await op()
                except GatewayError:
                    # Redis answered with a refusal (or a zero limit refused before any I/O).
                    decided = True
                    self._succeeded()
                    raise
                except REDIS_FAILURES as exc:
                    self.stats.redis_failures += 1
                    cause = exc
                    continue
                decided = True
                self._succeeded()
                return result
            decided = True
            self._failed(cause)
            raise _Unreachable(cause)
        finally:
            if not decided:  # cancelled, or an unexpected error: the probe taught nothing
                self._breaker.record_abandoned()
            self.stats.breaker_state = self._breaker.state

    def _succeeded(self) -> None:
        if self._breaker.record_success():
            log.info("redis rate limiting restored: circuit breaker closed")
        if self._degraded:
            self._degraded = False
            log.info(
                "redis rate limiting resumed after %d fallback decisions",
                self.stats.fallbacks - self._fallbacks_at_outage,
            )

    def _failed(self, cause: BaseException | None) -> None:
        if not self._degraded:
            self._degraded = True
            self._fallbacks_at_outage = self.stats.fallbacks
            log.warning(
                "redis rate limiter unreachable (%s); %s",
                type(cause).__name__ if cause is not None else "unknown",
                "refusing requests (failure mode closed)"
                if self._mode == "closed"
                else f"deciding locally with limits divided by {self._instances} (failure mode local)",
            )
        was = self._breaker.state
        if self._breaker.record_failure(self._clock()):
            self.stats.breaker_opens += 1
            # The first opening is news; re-opening after each failed probe is not.
            log.log(
                logging.WARNING if was == "closed" else logging.DEBUG,
                "rate limiter circuit breaker open: not calling redis for %.1fs",
                self._breaker.reset_timeout,
            )

    @property
    def breaker(self) -> CircuitBreaker:
        return self._breaker
