"""The Starlette application: builds shared clients in the lifespan and mounts the routes."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Mapping

from prometheus_client import CONTENT_TYPE_LATEST
from redis.asyncio import BlockingConnectionPool, Redis
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route, WebSocketRoute

from hubgate import protocol
from hubgate.admin import usage
from hubgate.admin_tenants import admin_tenant_routes
from hubgate.auth import JwtVerifier
from hubgate.errors import AuthError, TenantRefused
from hubgate.gateway import Services, stream_endpoint, usable_models, watch_slow_clients
from hubgate.leases import LeaseKeeper
from hubgate.metering import MemoryUsageStore, Metering, RedisUsageStore, UsageStore, load_prices
from hubgate.metrics import Metrics
from hubgate.playground import playground_routes
from hubgate.providers.base import Provider, ProviderResolver, SingleProvider
from hubgate.providers.routes import RouteClients
from hubgate.ratelimit import build_limiter, limiter_client
from hubgate.ratelimit.resilient import ResilientLimiter
from hubgate.registry import Registry, build_registry
from hubgate.resume import MemoryStreamBuffer, RedisStreamBuffer, StreamBuffer
from hubgate.scripts import ScriptRunner
from hubgate.sessions import HistoryPolicy, MemorySessionStore, RedisSessionStore, SessionStore
from hubgate.settings import Settings
from hubgate.streams import RetryPolicy, StreamRegistry
from hubgate.telemetry import build_recorder
from hubgate.tenants import TenantRegistry

log = logging.getLogger("hubgate.app")


async def healthz(request: Request) -> Response:
    """Liveness: the process answers. No dependency is checked."""
    return PlainTextResponse("ok")


async def readyz(request: Request) -> Response:
    """Readiness: the services are built and the instance is not shutting down."""
    services: Services | None = getattr(request.app.state, "services", None)
    if services is None or services.draining:
        return JSONResponse({"status": "draining" if services else "starting"}, status_code=503)
    return JSONResponse(
        {"status": "ready", "connections": len(services.connections), "streams": len(services.streams)}
    )


async def list_models(request: Request) -> Response:
    """``GET /v1/models`` — the caller's models (Bearer JWT)."""
    services: Services = request.app.state.services
    token = protocol.token_from_authorization(request.headers.get("authorization"))
    if token is None:
        return _error(401, "invalid_token", "a Bearer token is required", {"WWW-Authenticate": "Bearer"})
    try:
        identity = await services.verifier.verify(token)
    except AuthError as exc:
        return _error(401, exc.code, exc.message, {"WWW-Authenticate": 'Bearer error="invalid_token"'})
    tenant = services.tenants.get(identity.tenant)
    if tenant is None or not tenant.enabled:
        refused = TenantRefused("this tenant is not enabled")
        return _error(403, refused.code, refused.message)
    return JSONResponse(
        {
            "tenant": tenant.id,
            "default_model": tenant.default_model,
            "models": [{"id": model} for model in usable_models(services.tenants, tenant)],
        }
    )


async def prometheus_metrics(request: Request) -> Response:
    """Prometheus text exposition of this instance's metrics."""
    services: Services = request.app.state.services
    return Response(services.metrics.render(), media_type=CONTENT_TYPE_LATEST)


def _error(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> Response:
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status, headers=headers)


def create_app(
    settings: Settings,
    *,
    provider: Provider | None = None,
    tenants: Registry | TenantRegistry | None = None,
    dev_tokens: Mapping[str, str] | None = None,
) -> Starlette:
    """Build the ASGI app. Clients (Bedrock, Redis, JWKS) are created in the lifespan, not here.

    ``provider`` and ``tenants`` may be passed in by an embedding program; by default the
    Bedrock provider and the tenants file (or DynamoDB table) from the settings are used. ``dev_tokens``
    ({tenant: token}, from ``hubgate dev``) lets the playground page offer demo tenants.
    """

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async with contextlib.AsyncExitStack() as stack:
            # The file, or the DynamoDB table (HUBGATE_TENANTS_TABLE): loaded before anything else,
            # so an instance whose tenants cannot be read never starts.
            registry = build_registry(settings, tenants)
            await registry.start()
            stack.push_async_callback(registry.aclose)
            verifier = JwtVerifier(settings)
            await verifier.start()
            stack.push_async_callback(verifier.aclose)

            # Scripts of the limiter, the resume buffer and metering run on one client, so that
            # the calls a request makes at once (its settlement, last frames and usage) leave in
            # one pipeline.
            scripts: ScriptRunner | None = None
            if settings.redis_url is not None:
                decisions = limiter_client(
                    settings.redis_url,
                    timeout_ms=settings.redis_timeout_ms,
                    max_connections=settings.redis_max_connections,
                )
                stack.push_async_callback(decisions.aclose)
                scripts = ScriptRunner(decisions)
            limiter = build_limiter(
                settings.redis_url,
                mode=settings.rate_limit_failure_mode,
                expected_instances=settings.expected_instances,
                timeout_ms=settings.redis_timeout_ms,
                max_connections=settings.redis_max_connections,
                lease_ttl=settings.lease_ttl_seconds,
                runner=scripts,
            )
            stack.push_async_callback(limiter.aclose)

            leases = LeaseKeeper(limiter, ttl=settings.lease_ttl_seconds)
            leases.start()
            stack.push_async_callback(leases.aclose)

            sessions: SessionStore
            buffer: StreamBuffer
            store: UsageStore
            if settings.redis_url is not None:
                # A client of its own, apart from the scripts': resume reads block (XREAD BLOCK)
                # for up to a second, far longer than a limiter decision may take.
                # Blocking pool: at its cap a caller waits briefly for a free connection instead of
                # failing at once (redis-py's default pool raises MaxConnectionsError). Resume readers
                # hold a connection for up to a second while they block, hence a larger cap.
                pool = BlockingConnectionPool.from_url(
                    settings.redis_url,
                    max_connections=settings.redis_max_connections * 4,
                    timeout=2.0,
                    socket_connect_timeout=1.0,
                    socket_timeout=5.0,
                    health_check_interval=30,
                )
                redis = Redis.from_pool(pool)
                stack.push_async_callback(redis.aclose)
                sessions = RedisSessionStore(redis, HistoryPolicy.from_settings(settings))
                buffer = RedisStreamBuffer(
                    redis,
                    ttl_seconds=settings.resume_ttl_seconds,
                    max_frames=settings.resume_max_frames,
                    runner=scripts,
                )
                store = RedisUsageStore(redis, runner=scripts)
            else:
                sessions = MemorySessionStore(HistoryPolicy.from_settings(settings))
                buffer = MemoryStreamBuffer(
                    ttl_seconds=settings.resume_ttl_seconds, max_frames=settings.resume_max_frames
                )
                store = MemoryUsageStore()

            providers: ProviderResolver
            routes: RouteClients | None = None
            if provider is not None:
                providers = SingleProvider(provider)  # an embedder's provider, closed by the embedder
            else:
                # The hub's Bedrock client, plus one per tenant route (spoke account, region, endpoint).
                routes = RouteClients.from_settings(settings)
                await routes.start()
                stack.push_async_callback(routes.aclose)
                providers = routes

            metrics = Metrics()
            meter = Metering(
                prices=load_prices(settings.prices_file),
                store=store,
                metrics=metrics,
                namespace=settings.metrics_namespace,
                emf=settings.emf_enabled,
                catalogue=lambda model: info.price if (info := registry.model(model)) is not None else None,
            )
            meter.start()
            stack.push_async_callback(meter.aclose)
            streams = StreamRegistry(
                providers=providers,
                retry=RetryPolicy(
                    attempts=settings.upstream_retry_attempts,
                    base=settings.upstream_retry_base_ms / 1000,
                    max_seconds=settings.upstream_retry_max_seconds,
                ),
                limiter=limiter,
                leases=leases,
                buffer=buffer,
                sessions=sessions,
                meter=meter,
                metrics=metrics,
                spans=build_recorder(settings.otel_enabled),
                log_text_lengths=settings.log_text_lengths,
                grace_seconds=settings.stream_grace_seconds,
                flush_interval=settings.resume_flush_ms / 1000,
            )
            app.state.services = Services(
                settings=settings,
                verifier=verifier,
                tenants=registry,
                limiter=limiter,
                leases=leases,
                sessions=sessions,
                streams=streams,
                meter=meter,
                metrics=metrics,
            )
            services = app.state.services
            metrics.bind(
                connections=lambda: len(services.connections),
                streams=lambda: len(services.streams),
                queued=lambda: services.streams.queued,
                limiter_fallbacks=(
                    (lambda: limiter.stats.fallbacks) if isinstance(limiter, ResilientLimiter) else None
                ),
                redis_scripts=None
                if scripts is None
                else (scripts.counter("calls"), scripts.counter("batches")),
            )
            stack.push_async_callback(streams.cancel_all)
            watchdog = asyncio.create_task(watch_slow_clients(services), name="hubgate-slow-clients")
            stack.callback(watchdog.cancel)
            readers = asyncio.create_task(streams.watch_readers(), name="hubgate-resume-readers")
            stack.callback(readers.cancel)
            keeper = asyncio.create_task(streams.keep_buffers(), name="hubgate-resume-keeper")
            stack.callback(keeper.cancel)
            if routes is not None:
                # A tenant removed or re-routed in the registry lets go of its old route client.
                follower = asyncio.create_task(
                    routes.follow(registry.get, settings.registry_refresh_seconds), name="hubgate-routes"
                )
                stack.callback(follower.cancel)
            log.info("hubgate ready", extra={"instance": settings.instance_id})
            yield

    return Starlette(
        routes=[
            Route("/healthz", healthz),
            Route("/readyz", readyz),
            Route("/v1/models", list_models),
            Route("/metrics", prometheus_metrics),
            Route("/admin/usage", usage),
            *admin_tenant_routes(),
            WebSocketRoute("/v1/stream", stream_endpoint),
            *playground_routes(dev_tokens),
        ],
        lifespan=lifespan,
    )
