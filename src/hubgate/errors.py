"""The gateway's error hierarchy, with the code each error shows a client.

::

    GatewayError                      code            where it surfaces
    ├── RequestError                                  an `error` frame; the connection stays open
    │   ├── InvalidMessage            invalid_message
    │   ├── UnknownType               unknown_type
    │   ├── DuplicateId               duplicate_id
    │   ├── TooManyStreams            too_many_streams
    │   ├── ModelNotAllowed           model_not_allowed
    │   ├── RateLimited               rate_limited         (retry_after)
    │   ├── TokenRateLimited          token_rate_limited   (retry_after)
    │   ├── LimiterUnavailable        limiter_unavailable
    │   ├── BudgetExhausted           budget_exhausted
    │   ├── StreamNotFound            stream_not_found
    │   ├── SessionNotFound           session_not_found
    │   ├── TokenExpired              token_expired        (new requests after `exp`)
    │   ├── RefreshRefused            invalid_token        (an `auth` refresh was refused)
    │   └── UpstreamError             upstream_error
    │       ├── UpstreamThrottled     upstream_throttled
    │       └── UpstreamTimeout       upstream_timeout
    ├── AuthError                     invalid_token   HTTP 401 at handshake, close 4401 in band
    ├── TenantRefused                 tenant_refused  HTTP 403 at handshake, close 4403 in band
    ├── TooManyConnections            too_many_connections  HTTP 429 at handshake, close 1013
    └── InternalError                 internal_error  an `error` frame (a store failed); details are logged

Lower layers (botocore, aiohttp, redis-py, PyJWT) are translated into these types at their
boundary with ``raise ... from exc``; ``hubgate.gateway`` maps them to frames and close codes.
"""

from __future__ import annotations

from enum import IntEnum


class CloseCode(IntEnum):
    """WebSocket close codes hubgate uses (RFC 6455 section 7.4 plus the 4000-4999 private range)."""

    NORMAL = 1000
    GOING_AWAY = 1001
    POLICY_VIOLATION = 1008
    MESSAGE_TOO_BIG = 1009
    INVALID_PAYLOAD = 1007
    INTERNAL_ERROR = 1011
    SERVICE_RESTART = 1012
    TRY_AGAIN_LATER = 1013
    UNAUTHORIZED = 4401  # token missing, invalid, or expired and not refreshed
    FORBIDDEN = 4403  # tenant disabled or unknown
    AUTH_TIMEOUT = 4408  # no `auth` message within the deadline


class GatewayError(Exception):
    """Base of every error hubgate reports to a client."""

    code: str = "internal_error"
    retry_after: float | None = None  # seconds a client should wait before trying again, if known

    def __init__(self, message: str = "") -> None:
        super().__init__(message or self.code.replace("_", " "))
        self.message = message or self.code.replace("_", " ")


class RequestError(GatewayError):
    """An error about one message or request; reported as an `error` frame."""

    code = "invalid_message"

    def __init__(self, message: str = "", *, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class InvalidMessage(RequestError):
    code = "invalid_message"


class UnknownType(RequestError):
    code = "unknown_type"


class DuplicateId(RequestError):
    code = "duplicate_id"


class TooManyStreams(RequestError):
    code = "too_many_streams"


class ModelNotAllowed(RequestError):
    code = "model_not_allowed"


class RateLimited(RequestError):
    code = "rate_limited"


class TokenRateLimited(RequestError):
    code = "token_rate_limited"


class BudgetExhausted(RequestError):
    code = "budget_exhausted"


class LimiterUnavailable(RequestError):
    code = "limiter_unavailable"


class StreamNotFound(RequestError):
    code = "stream_not_found"


class SessionNotFound(RequestError):
    code = "session_not_found"


class TokenExpired(RequestError):
    code = "token_expired"


class RefreshRefused(RequestError):
    """An in-band `auth` refresh was refused; the connection keeps its current token."""

    code = "invalid_token"


class UpstreamError(RequestError):
    """Bedrock failed. ``retryable``: worth another attempt before the first token (5xx, network)."""

    code = "upstream_error"

    def __init__(self, message: str = "", *, retryable: bool = False) -> None:
        super().__init__(message)
        self.retryable = retryable


class UpstreamThrottled(UpstreamError):
    code = "upstream_throttled"

    def __init__(self, message: str = "", *, retryable: bool = True) -> None:
        super().__init__(message, retryable=retryable)


class UpstreamTimeout(UpstreamError):
    code = "upstream_timeout"


class AuthError(GatewayError):
    """A token is missing, malformed, badly signed, expired, or has the wrong claims."""

    code = "invalid_token"


class TenantRefused(GatewayError):
    """The token is valid but its tenant is unknown or disabled."""

    code = "tenant_refused"


class TooManyConnections(GatewayError):
    """The tenant already holds its `max_connections`."""

    code = "too_many_connections"

    def __init__(self, message: str = "", *, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class InternalError(GatewayError):
    code = "internal_error"
