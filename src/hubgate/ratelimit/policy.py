"""A tenant's limits, as read from the ``limits`` block of the tenants file.

Every figure is optional: ``None`` means unlimited. Zero closes that door entirely (no request,
no token, no connection or no stream is ever admitted), which is how an operator freezes a
tenant's traffic without disabling it. ``stream_queue_ms`` is not a limit but how long a request
over the stream cap waits for a slot; ``None`` or zero: it is refused at once.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass


def _ceil_div(value: int | None, divisor: int) -> int | None:
    if value is None:
        return None
    # Never round a share down to zero: each instance keeps at least one of everything the
    # tenant is allowed, so the local fallback degrades limits but never closes a tenant.
    return max(1, -(-value // divisor)) if value > 0 else 0


@dataclass(frozen=True, slots=True)
class LimitPolicy:
    """Per-tenant limits. Rates are per minute; bursts are bucket capacities."""

    requests_per_minute: int | None = None
    request_burst: int | None = None  # default: requests_per_minute
    tokens_per_minute: int | None = None
    token_burst: int | None = None  # default: tokens_per_minute
    per_user_requests_per_minute: int | None = None
    per_user_request_burst: int | None = None  # default: per_user_requests_per_minute
    max_connections: int | None = None
    max_concurrent_streams: int | None = None
    # How long a request over max_concurrent_streams may wait for a slot (hubgate.slots); none: refuse.
    stream_queue_ms: int | None = None

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"limits.{f.name} must be a non-negative integer or null, got {value!r}")
        for burst, rate in (
            ("request_burst", "requests_per_minute"),
            ("token_burst", "tokens_per_minute"),
            ("per_user_request_burst", "per_user_requests_per_minute"),
        ):
            # A burst alone would silently mean "unlimited"; refuse the ambiguous file instead.
            if getattr(self, burst) is not None and getattr(self, rate) is None:
                raise ValueError(f"limits.{burst} needs limits.{rate}")

    @property
    def has_zero_limit(self) -> bool:
        """Does some figure close a door (see ``base.refuse_closed_doors``)?"""
        return 0 in (
            self.requests_per_minute,
            self.request_burst,
            self.tokens_per_minute,
            self.token_burst,
            self.per_user_requests_per_minute,
            self.per_user_request_burst,
            self.max_connections,
            self.max_concurrent_streams,
        )

    @property
    def request_capacity(self) -> int | None:
        """Capacity of the tenant's request bucket (None: unlimited)."""
        return _burst(self.requests_per_minute, self.request_burst)

    @property
    def token_capacity(self) -> int | None:
        """Capacity of the tenant's token bucket (None: unlimited)."""
        return _burst(self.tokens_per_minute, self.token_burst)

    @property
    def user_request_capacity(self) -> int | None:
        """Capacity of each user's request bucket (None: unlimited)."""
        return _burst(self.per_user_requests_per_minute, self.per_user_request_burst)

    def scaled(self, divisor: int) -> LimitPolicy:
        """This policy split across ``divisor`` instances: every figure divided, rounded up, at least 1.

        Used by the local fallback while Redis is unreachable: each of the expected instances
        enforces its share, so the fleet as a whole stays near the configured limits.
        """
        if divisor < 1:
            raise ValueError(f"divisor must be >= 1, got {divisor}")
        if divisor == 1:
            return self
        shares = {
            f.name: _ceil_div(getattr(self, f.name), divisor)
            for f in dataclasses.fields(self)
            if f.name not in _NOT_SHARED
        }
        return dataclasses.replace(self, **shares)


# Figures that are not an amount of capacity, so not split between instances.
_NOT_SHARED = frozenset({"stream_queue_ms"})


def _burst(rate: int | None, burst: int | None) -> int | None:
    if rate is None:
        return None
    return rate if burst is None else burst
