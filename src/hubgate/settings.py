"""One frozen settings object, built once from the environment.

Nothing else in hubgate reads ``os.environ``: ``Settings.from_env(environ)`` is called by the
CLI and the result is handed to everything that needs configuration. Every variable is
documented in ``docs/configuration.md``.
"""

from __future__ import annotations

import dataclasses
import math
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

FailureMode = Literal["closed", "local"]

PREFIX = "HUBGATE_"


class SettingsError(ValueError):
    """A configuration variable has a value that cannot be used."""


def _str(env: Mapping[str, str], name: str, default: str | None) -> str | None:
    value = env.get(PREFIX + name)
    if value is None or value.strip() == "":
        return default
    return value.strip()


def _int(env: Mapping[str, str], name: str, default: int, minimum: int = 0) -> int:
    raw = _str(env, name, None)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError as exc:
        raise SettingsError(f"{PREFIX}{name} must be an integer, got {raw!r}") from exc
    if value < minimum:
        raise SettingsError(f"{PREFIX}{name} must be >= {minimum}, got {value}")
    return value


def _float(env: Mapping[str, str], name: str, default: float, minimum: float = 0.0) -> float:
    raw = _str(env, name, None)
    if raw is None:
        return default
    try:
        value = float(raw)
    except ValueError as exc:
        raise SettingsError(f"{PREFIX}{name} must be a number, got {raw!r}") from exc
    if not math.isfinite(value):
        raise SettingsError(f"{PREFIX}{name} must be a finite number, got {raw!r}")
    if value < minimum:
        raise SettingsError(f"{PREFIX}{name} must be >= {minimum}, got {value}")
    return value


def _list(env: Mapping[str, str], name: str, default: tuple[str, ...] = ()) -> tuple[str, ...]:
    raw = _str(env, name, None)
    if raw is None:
        return default
    return tuple(part.strip() for part in raw.split(",") if part.strip())


def _gc_threshold(
    env: Mapping[str, str], name: str, default: tuple[int, int, int] | None
) -> tuple[int, int, int] | None:
    """Three non-negative integers (``10000,10,100``), or ``default`` for CPython's own."""
    raw = _str(env, name, None)
    if raw is None:
        return default
    if raw.strip().lower() == "default":
        return None
    try:
        first, second, third = (int(part) for part in raw.split(","))
    except ValueError as exc:
        raise SettingsError(
            f"{PREFIX}{name} must be three comma-separated integers or 'default', got {raw!r}"
        ) from exc
    if min(first, second, third) < 0:
        raise SettingsError(f"{PREFIX}{name} must not be negative, got {raw!r}")
    return first, second, third


def _bool(env: Mapping[str, str], name: str, default: bool) -> bool:
    raw = _str(env, name, None)
    if raw is None:
        return default
    lowered = raw.lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise SettingsError(f"{PREFIX}{name} must be true or false, got {raw!r}")


@dataclass(frozen=True, slots=True)
class Settings:
    """Everything hubgate can be told, with production defaults."""

    # Network
    host: str = "127.0.0.1"
    port: int = 8080
    log_level: str = "info"
    # `hubgate serve` freezes what start-up created and sets these garbage-collector thresholds
    # (hubgate.server.tune_gc); None leaves CPython's defaults.
    gc_threshold: tuple[int, int, int] | None = (10_000, 10, 100)

    # Bedrock
    aws_region: str = "us-east-1"
    bedrock_endpoint_url: str | None = None  # None: the real regional Bedrock endpoint
    upstream_connect_timeout: float = 5.0
    upstream_read_timeout: float = 60.0
    upstream_max_attempts: int = 1  # botocore attempts; 1 = no hidden retries of a 429
    upstream_max_connections: int = 1024  # pooled connections per Bedrock client (one per route)

    # JWT
    jwt_hs256_secret: str | None = None
    jwt_jwks_url: str | None = None
    jwt_issuer: str | None = None
    jwt_audience: str | None = None
    jwt_client_id: str | None = None
    jwt_algorithms: tuple[str, ...] = ("RS256", "ES256")
    jwt_leeway_seconds: float = 30.0
    tenant_claim: str = "custom:tenant_id"
    user_claim: str = "sub"
    groups_claim: str = "cognito:groups"
    admin_group: str = "hubgate-admin"

    # Tenants
    tenants_file: str | None = None  # None: the demo tenants shipped in the package
    tenants_table: str | None = None  # a DynamoDB table instead of the file
    registry_refresh_seconds: float = 30.0
    dynamodb_endpoint_url: str | None = None  # None: the regional endpoint
    sts_endpoint_url: str | None = None  # None: the regional endpoint

    # Retries before the first token, then fallback models
    upstream_retry_attempts: int = 3
    upstream_retry_base_ms: float = 200.0
    upstream_retry_max_seconds: float = 10.0

    # WebSocket endpoint
    allowed_origins: tuple[str, ...] = ()  # empty: any Origin (and none) is accepted
    max_message_bytes: int = 64 * 1024
    max_streams_per_connection: int = 4
    auth_timeout_seconds: float = 5.0
    ping_interval_seconds: float = 20.0
    ping_timeout_seconds: float = 20.0
    auth_expiry_warning_seconds: float = 60.0
    handshake_timeout_seconds: float = 10.0  # to send complete HTTP request headers
    send_timeout_seconds: float = 15.0  # a client that reads nothing for this long is disconnected
    max_messages_per_second: float = 50.0  # per connection, with a burst of 5 seconds' worth

    # Rate limits
    redis_url: str | None = None  # None: in-memory limiter (one process)
    rate_limit_failure_mode: FailureMode = "local"
    expected_instances: int = 2
    redis_timeout_ms: int = 50
    redis_max_connections: int = 64
    lease_ttl_seconds: float = 30.0
    instance_id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])

    # Metering and observability
    prices_file: str | None = None  # None: the shipped price table
    metrics_namespace: str = "hubgate"
    emf_enabled: bool = True
    log_format: Literal["json", "text"] = "json"
    log_text_lengths: bool = False
    otel_enabled: bool = False

    # Sessions, resumable streams, drain
    session_ttl_seconds: float = 3600.0
    session_max_turns: int = 50
    session_max_tokens: int = 16000
    resume_ttl_seconds: float = 300.0
    resume_max_frames: int = 10000
    stream_grace_seconds: float = 30.0
    resume_flush_ms: float = 250.0
    drain_seconds: float = 90.0

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> Settings:
        """Build settings from ``HUBGATE_*`` variables; raise SettingsError on a bad value."""
        env = environ
        defaults = cls()
        mode = _str(env, "RATE_LIMIT_FAILURE_MODE", defaults.rate_limit_failure_mode)
        if mode not in ("closed", "local"):
            raise SettingsError(f"{PREFIX}RATE_LIMIT_FAILURE_MODE must be 'closed' or 'local', got {mode!r}")
        log_level = (_str(env, "LOG_LEVEL", defaults.log_level) or defaults.log_level).lower()
        if log_level not in ("critical", "error", "warning", "info", "debug"):
            raise SettingsError(
                f"{PREFIX}LOG_LEVEL must be one of critical, error, warning, info, debug, got {log_level!r}"
            )
        log_format = _str(env, "LOG_FORMAT", defaults.log_format)
        if log_format not in ("json", "text"):
            raise SettingsError(f"{PREFIX}LOG_FORMAT must be 'json' or 'text', got {log_format!r}")
        algorithms = _list(env, "JWT_ALGORITHMS", defaults.jwt_algorithms)
        for alg in algorithms:
            if alg.lower() == "none":
                raise SettingsError(f"{PREFIX}JWT_ALGORITHMS may not contain 'none'")
        return cls(
            host=_str(env, "HOST", defaults.host) or defaults.host,
            port=_int(env, "PORT", defaults.port, minimum=0),
            log_level=log_level,
            gc_threshold=_gc_threshold(env, "GC_THRESHOLD", defaults.gc_threshold),
            aws_region=_str(env, "AWS_REGION", defaults.aws_region) or defaults.aws_region,
            bedrock_endpoint_url=_str(env, "BEDROCK_ENDPOINT_URL", None),
            upstream_connect_timeout=_float(
                env, "UPSTREAM_CONNECT_TIMEOUT", defaults.upstream_connect_timeout
            ),
            upstream_read_timeout=_float(env, "UPSTREAM_READ_TIMEOUT", defaults.upstream_read_timeout),
            upstream_max_attempts=_int(env, "UPSTREAM_MAX_ATTEMPTS", defaults.upstream_max_attempts, 1),
            upstream_max_connections=_int(
                env, "UPSTREAM_MAX_CONNECTIONS", defaults.upstream_max_connections, 1
            ),
            jwt_hs256_secret=_str(env, "JWT_HS256_SECRET", None),
            jwt_jwks_url=_str(env, "JWT_JWKS_URL", None),
            jwt_issuer=_str(env, "JWT_ISSUER", None),
            jwt_audience=_str(env, "JWT_AUDIENCE", None),
            jwt_client_id=_str(env, "JWT_CLIENT_ID", None),
            jwt_algorithms=algorithms,
            jwt_leeway_seconds=_float(env, "JWT_LEEWAY_SECONDS", defaults.jwt_leeway_seconds),
            tenant_claim=_str(env, "TENANT_CLAIM", defaults.tenant_claim) or defaults.tenant_claim,
            user_claim=_str(env, "USER_CLAIM", defaults.user_claim) or defaults.user_claim,
            groups_claim=_str(env, "GROUPS_CLAIM", defaults.groups_claim) or defaults.groups_claim,
            admin_group=_str(env, "ADMIN_GROUP", defaults.admin_group) or defaults.admin_group,
            prices_file=_str(env, "PRICES_FILE", None),
            metrics_namespace=_str(env, "METRICS_NAMESPACE", defaults.metrics_namespace) or "hubgate",
            emf_enabled=_bool(env, "EMF_ENABLED", defaults.emf_enabled),
            log_format=log_format,  # type: ignore[arg-type]
            log_text_lengths=_bool(env, "LOG_TEXT_LENGTHS", defaults.log_text_lengths),
            otel_enabled=_bool(env, "OTEL_ENABLED", defaults.otel_enabled),
            tenants_file=_str(env, "TENANTS_FILE", None),
            tenants_table=_str(env, "TENANTS_TABLE", None),
            registry_refresh_seconds=_float(
                env, "REGISTRY_REFRESH_SECONDS", defaults.registry_refresh_seconds, 1.0
            ),
            dynamodb_endpoint_url=_str(env, "DYNAMODB_ENDPOINT_URL", None),
            sts_endpoint_url=_str(env, "STS_ENDPOINT_URL", None),
            upstream_retry_attempts=_int(env, "UPSTREAM_RETRY_ATTEMPTS", defaults.upstream_retry_attempts, 1),
            upstream_retry_base_ms=_float(env, "UPSTREAM_RETRY_BASE_MS", defaults.upstream_retry_base_ms),
            upstream_retry_max_seconds=_float(
                env, "UPSTREAM_RETRY_MAX_SECONDS", defaults.upstream_retry_max_seconds
            ),
            allowed_origins=_list(env, "ALLOWED_ORIGINS"),
            max_message_bytes=_int(env, "MAX_MESSAGE_BYTES", defaults.max_message_bytes, 1024),
            max_streams_per_connection=_int(
                env, "MAX_STREAMS_PER_CONNECTION", defaults.max_streams_per_connection, 1
            ),
            auth_timeout_seconds=_float(env, "AUTH_TIMEOUT_SECONDS", defaults.auth_timeout_seconds),
            ping_interval_seconds=_float(env, "PING_INTERVAL_SECONDS", defaults.ping_interval_seconds),
            ping_timeout_seconds=_float(env, "PING_TIMEOUT_SECONDS", defaults.ping_timeout_seconds),
            handshake_timeout_seconds=_float(
                env, "HANDSHAKE_TIMEOUT_SECONDS", defaults.handshake_timeout_seconds, 0.1
            ),
            send_timeout_seconds=_float(env, "SEND_TIMEOUT_SECONDS", defaults.send_timeout_seconds, 0.1),
            max_messages_per_second=_float(
                env, "MAX_MESSAGES_PER_SECOND", defaults.max_messages_per_second, 0.1
            ),
            auth_expiry_warning_seconds=_float(
                env, "AUTH_EXPIRY_WARNING_SECONDS", defaults.auth_expiry_warning_seconds
            ),
            redis_url=_str(env, "REDIS_URL", None),
            rate_limit_failure_mode=mode,  # type: ignore[arg-type]
            expected_instances=_int(env, "EXPECTED_INSTANCES", defaults.expected_instances, 1),
            redis_timeout_ms=_int(env, "REDIS_TIMEOUT_MS", defaults.redis_timeout_ms, 1),
            redis_max_connections=_int(env, "REDIS_MAX_CONNECTIONS", defaults.redis_max_connections, 1),
            lease_ttl_seconds=_float(env, "LEASE_TTL_SECONDS", defaults.lease_ttl_seconds, 1.0),
            instance_id=_str(env, "INSTANCE_ID", None) or defaults.instance_id,
            session_ttl_seconds=_float(env, "SESSION_TTL_SECONDS", defaults.session_ttl_seconds, 1.0),
            session_max_turns=_int(env, "SESSION_MAX_TURNS", defaults.session_max_turns, 1),
            session_max_tokens=_int(env, "SESSION_MAX_TOKENS", defaults.session_max_tokens, 1),
            resume_ttl_seconds=_float(env, "RESUME_TTL_SECONDS", defaults.resume_ttl_seconds, 1.0),
            resume_max_frames=_int(env, "RESUME_MAX_FRAMES", defaults.resume_max_frames, 16),
            stream_grace_seconds=_float(env, "STREAM_GRACE_SECONDS", defaults.stream_grace_seconds),
            resume_flush_ms=_float(env, "RESUME_FLUSH_MS", defaults.resume_flush_ms, 1.0),
            drain_seconds=_float(env, "DRAIN_SECONDS", defaults.drain_seconds),
        )

    def replace(self, **changes: object) -> Settings:
        """A copy with some fields changed (used by the CLI flags and the tests)."""
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]

    @classmethod
    def env_names(cls) -> frozenset[str]:
        """Every environment variable name this object reads."""
        return frozenset(PREFIX + f.name.upper() for f in dataclasses.fields(cls))
