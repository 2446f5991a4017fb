"""Per-tenant routes: one long-lived Bedrock client per spoke account, region or endpoint.

``RouteClients`` is the gateway's :class:`~hubgate.providers.base.ProviderResolver`. Tenants
without a route share the hub's client (the hub's own credentials). A route gets its own
``BedrockProvider``, created on its first request:

- without ``role_arn`` it signs with the hub's credentials, against the route's region or
  endpoint; tenants with the same region and endpoint share the client;
- with ``role_arn`` the hub calls STS ``AssumeRole`` for the tenant (session name and tag carry
  the tenant id, so it is one client per tenant and role) and signs with those credentials,
  which are refreshed before they expire (see :class:`_AssumedRole`).

A route client is kept while some tenant's requests resolve to it. Once none does (every tenant
that used it resolved to another route last), it is closed, with its credential refresher, as
soon as no stream runs on it and it has not been handed out for a grace period (see
:func:`retirement_delay`); until shutdown otherwise.

STS and botocore types stay in this module; a failure to assume a role reaches the client as
``UpstreamError("cannot assume the tenant's role")``, never with the ARN or STS's message.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import hashlib
import logging
import re
import time
import unicodedata
from collections import Counter
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any

import aioboto3
import aiohttp
from aiobotocore.credentials import AioCredentialResolver, AioRefreshableCredentials
from aiobotocore.session import AioSession
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from hubgate.errors import UpstreamError
from hubgate.providers.base import Completion, Provider, ProviderRequest, Route
from hubgate.providers.bedrock import BedrockProvider
from hubgate.settings import Settings

if TYPE_CHECKING:
    from hubgate.tenants import Tenant

log = logging.getLogger("hubgate.routes")

ASSUME_ROLE_FAILED = "cannot assume the tenant's role"
SESSION_NAME_PREFIX = "hubgate-"
TENANT_TAG = "tenant_id"

# AssumeRole limits (STS API reference, AssumeRole request parameters): RoleSessionName is 2-64
# characters of [\w+=,.@-]; a session tag value is at most 256 characters of letters, digits,
# white space and _.:/=+-@. DurationSeconds is at most 3600 when the hub itself runs on a role
# (role chaining), which is the case on ECS.
_SESSION_NAME_MAX = 64
_SESSION_NAME_REFUSED = re.compile(r"[^A-Za-z0-9_+=,.@-]")
_TAG_VALUE_MAX = 256
_TAG_VALUE_PUNCTUATION = frozenset("_.:/=+-@")
DEFAULT_ROLE_SECONDS = 3600

# botocore's own windows for temporary credentials (botocore.credentials): from 15 minutes before
# expiry one caller refreshes while the others keep signing with the current credentials; from 10
# minutes before, every caller waits for the refresh.
DEFAULT_ADVISORY_SECONDS = 15 * 60
DEFAULT_MANDATORY_SECONDS = 10 * 60
# After a failed AssumeRole, callers get the current credentials (or the error) without another
# STS call for this long, so an STS outage costs one call per tenant per interval, not one per
# request; the background refresher backs off from here up to the maximum.
DEFAULT_RETRY_SECONDS = 5.0
_RETRY_MAX_SECONDS = 300.0
# Credentials this close to expiry are not handed out again after a failed refresh: a request
# signed with them could arrive after they lapse.
_MIN_VALID_SECONDS = 30.0

# A route client no tenant maps to any more stays open this long after it was last handed out or
# last streamed. A request holds its client from resolving it to its last upstream attempt, and
# between attempts no stream runs on it: the grace must outlast the longest retry pause (each is
# at most the whole retry phase, HUBGATE_UPSTREAM_RETRY_MAX_SECONDS, 10 s by default).
DEFAULT_RETIRE_GRACE_SECONDS = 60.0

# STS calls are small and sit in front of a user's first token: short timeouts, and botocore's
# standard retries (throttling and transient errors, with backoff) for three attempts in all.
_STS_CONFIG = Config(
    connect_timeout=3.0,
    read_timeout=5.0,
    retries={"total_max_attempts": 3, "mode": "standard"},
)


# --- pure helpers ------------------------------------------------------------------------------


def role_session_name(tenant_id: str) -> str:
    """The RoleSessionName for a tenant: ``hubgate-<tenant id>``, within STS's charset and length.

    Characters STS refuses become ``-``; when anything had to change (or the name was too long),
    a short hash of the real tenant id is appended so two tenants never share a session name.
    """
    cleaned = _SESSION_NAME_REFUSED.sub("-", tenant_id)
    name = SESSION_NAME_PREFIX + cleaned
    if cleaned == tenant_id and len(name) <= _SESSION_NAME_MAX:
        return name
    digest = hashlib.sha256(tenant_id.encode("utf-8")).hexdigest()[:8]
    return f"{name[: _SESSION_NAME_MAX - len(digest) - 1]}-{digest}"


def tenant_tag_value(tenant_id: str) -> str:
    """The tenant id as a session tag value: characters STS refuses become ``_``."""
    allowed = (
        ch if unicodedata.category(ch)[0] in "LNZ" or ch in _TAG_VALUE_PUNCTUATION else "_"
        for ch in tenant_id
    )
    return "".join(allowed)[:_TAG_VALUE_MAX]


def assume_role_arguments(
    tenant_id: str, role_arn: str, external_id: str | None, duration_seconds: int
) -> dict[str, Any]:
    """The STS AssumeRole keyword arguments for a tenant (pure)."""
    arguments: dict[str, Any] = {
        "RoleArn": role_arn,
        "RoleSessionName": role_session_name(tenant_id),
        "DurationSeconds": duration_seconds,
        "Tags": [{"Key": TENANT_TAG, "Value": tenant_tag_value(tenant_id)}],
    }
    if external_id is not None:
        arguments["ExternalId"] = external_id
    return arguments


@dataclass(frozen=True, slots=True)
class Target:
    """What one Bedrock client is for. ``tenant`` is set only when a role is assumed."""

    region: str
    endpoint_url: str | None
    role_arn: str | None = None
    external_id: str | None = None
    tenant: str | None = None


def route_target(
    tenant_id: str, route: Route | None, *, hub_region: str, hub_endpoint_url: str | None
) -> Target | None:
    """The client a tenant's requests need, or None for the hub's own client (pure)."""
    if route is None:
        return None
    region = route.region or hub_region
    endpoint_url = route.endpoint_url or hub_endpoint_url
    if route.role_arn is None:
        if region == hub_region and endpoint_url == hub_endpoint_url:
            return None
        return Target(region=region, endpoint_url=endpoint_url)
    return Target(
        region=region,
        endpoint_url=endpoint_url,
        role_arn=route.role_arn,
        external_id=route.external_id,
        tenant=tenant_id,
    )


def retirement_delay(streams: int, last_used: float, now: float, grace: float) -> float | None:
    """When a route client no tenant maps to any more may be closed (pure).

    None while a stream runs on it (it is looked at again when the stream ends); otherwise the
    seconds left of ``grace`` since it was ``last_used`` (handed out, or a stream on it ended),
    0 meaning now.
    """
    if streams:
        return None
    return max(0.0, last_used + grace - now)


class RouteAssignments:
    """The target each tenant's requests resolved to last, and how many tenants map to each.

    Plain bookkeeping (no I/O): :meth:`assign` says when a target has just lost its last tenant.
    Tenants on the hub's client (target None) are not recorded.
    """

    def __init__(self) -> None:
        self._targets: dict[str, Target] = {}
        self._tenants: Counter[Target] = Counter()

    def __contains__(self, target: object) -> bool:
        return target in self._tenants

    def tenants(self) -> list[str]:
        """The tenants recorded on a route client now (not those on the hub's)."""
        return list(self._targets)

    def assign(self, tenant_id: str, target: Target | None) -> Target | None:
        """Record that ``tenant_id`` resolves to ``target`` now; return the target it left when no
        tenant maps to that one any more, else None."""
        previous = self._targets.get(tenant_id)
        if previous == target:
            return None
        if target is None:
            del self._targets[tenant_id]
        else:
            self._targets[tenant_id] = target
            self._tenants[target] += 1
        if previous is None:
            return None
        self._tenants[previous] -= 1
        if self._tenants[previous]:
            return None
        del self._tenants[previous]
        return previous


def _utcnow() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


# --- assumed-role credentials ------------------------------------------------------------------


class _FixedCredentialProvider:
    """A credential provider that hands botocore one credentials object (ours)."""

    METHOD = "hubgate-assume-role"
    CANONICAL_NAME = "hubgate-assume-role"

    def __init__(self, credentials: Any) -> None:
        self._credentials = credentials

    async def load(self) -> Any:
        return self._credentials


class _AssumedRole:
    """One tenant's credentials for one role, refreshed before they expire.

    botocore signs every request with ``await credentials.get_frozen_credentials()``; on an
    ``AioRefreshableCredentials`` that call refreshes inline once the advisory window has begun
    (one caller refreshes under a lock, the others keep the current credentials) and makes every
    caller wait once the mandatory window has begun. Two things are added here:

    - a background task refreshes at the start of the advisory window, so the STS call is normally
      made off every request's path (a request that happens to get there first waits for one STS
      call, bounded by the STS timeouts, while the other streams go on);
    - a failed refresh keeps handing out the current credentials while they remain valid (botocore
      would otherwise raise during its mandatory window), and within the retry interval after a
      failure no new STS call is made, so a refresh during an STS outage never holds streams up.
    """

    def __init__(
        self,
        sts: Any,
        *,
        tenant_id: str,
        role_arn: str,
        external_id: str | None,
        duration_seconds: int,
        advisory_seconds: float,
        mandatory_seconds: float,
        retry_seconds: float,
    ) -> None:
        self._sts = sts
        self._tenant = tenant_id
        self._arguments = assume_role_arguments(tenant_id, role_arn, external_id, duration_seconds)
        self._advisory = advisory_seconds
        self._mandatory = mandatory_seconds
        self._retry = retry_seconds
        self._metadata: dict[str, str] | None = None
        self._expiry: datetime.datetime | None = None
        self._failed_at: float | None = None  # monotonic time of the last failed AssumeRole
        self._credentials: Any = None
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> Any:
        """Assume the role (UpstreamError if STS refuses); return botocore credentials for it."""
        metadata = await self._assume()
        self._credentials = AioRefreshableCredentials.create_from_metadata(
            metadata,
            refresh_using=self._refresh,
            method="assume-role",
            advisory_timeout=self._advisory,
            mandatory_timeout=self._mandatory,
        )
        self._task = asyncio.create_task(self._keep_fresh(), name=f"hubgate-credentials-{self._tenant}")
        return self._credentials

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    def _seconds_left(self) -> float:
        if self._expiry is None:
            return 0.0
        return (self._expiry - _utcnow()).total_seconds()

    async def _assume(self) -> dict[str, str]:
        try:
            response = await self._sts.assume_role(**self._arguments)
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code", "unknown")
            log.warning("AssumeRole refused for tenant %s (%s)", self._tenant, code)
            raise UpstreamError(ASSUME_ROLE_FAILED, retryable=False) from exc
        except (BotoCoreError, aiohttp.ClientError, TimeoutError) as exc:
            log.warning("AssumeRole failed for tenant %s (%s)", self._tenant, type(exc).__name__)
            raise UpstreamError(ASSUME_ROLE_FAILED, retryable=False) from exc
        credentials = response["Credentials"]
        expiration: datetime.datetime = credentials["Expiration"]
        metadata = {
            "access_key": credentials["AccessKeyId"],
            "secret_key": credentials["SecretAccessKey"],
            "token": credentials["SessionToken"],
            "expiry_time": expiration.isoformat(),
        }
        self._metadata, self._expiry = metadata, expiration
        return metadata

    async def _refresh(self) -> dict[str, str]:
        """botocore's ``refresh_using``: new credentials, else the current ones while still valid."""
        if self._failed_at is not None and time.monotonic() - self._failed_at < self._retry:
            return self._current()
        try:
            metadata = await self._assume()
        except UpstreamError:
            self._failed_at = time.monotonic()
            return self._current()
        self._failed_at = None
        return metadata

    def _current(self) -> dict[str, str]:
        if self._metadata is None or self._seconds_left() <= _MIN_VALID_SECONDS:
            raise UpstreamError(ASSUME_ROLE_FAILED, retryable=False)
        return self._metadata

    async def _keep_fresh(self) -> None:
        backoff = self._retry
        while True:
            wait = self._seconds_left() - self._advisory
            if wait > 0:
                await asyncio.sleep(wait)
                continue
            expiry = self._expiry
            try:
                # Inside the advisory window this refreshes under botocore's lock; requests signing
                # meanwhile see the lock taken and keep the current credentials.
                await self._credentials.get_frozen_credentials()
            except UpstreamError:
                pass  # logged by _assume; requests get the error only once the credentials lapse
            except Exception:
                log.exception("refreshing the credentials of tenant %s failed", self._tenant)
            if self._expiry == expiry:
                # Nothing new: STS failed, or the retry interval is running. Back off.
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, _RETRY_MAX_SECONDS)
            else:
                backoff = self._retry


# --- route clients -----------------------------------------------------------------------------


class RouteClient:
    """A route's Bedrock client as the resolver hands it out.

    It counts the streams running on it (a stream counts from its first item being asked for until
    the iterator is exhausted or closed), so the resolver never closes it under one, and it owns
    the route's credential refresher, if any, which is stopped with it.
    """

    def __init__(
        self, provider: BedrockProvider, role: _AssumedRole | None, on_idle: Callable[[], None]
    ) -> None:
        self._provider = provider
        self._role = role
        self._on_idle = on_idle
        self._closed = asyncio.Event()
        self.streams = 0
        self.last_used = time.monotonic()

    @property
    def closed(self) -> bool:
        return self._closed.is_set()

    async def wait_closed(self) -> None:
        """Return once the client (its connection pool and credential refresher) is closed."""
        await self._closed.wait()

    async def stream(self, request: ProviderRequest) -> AsyncGenerator[str | Completion, None]:
        self.streams += 1
        try:
            # Closing this iterator closes the provider's at once (the upstream HTTP stream).
            async with contextlib.aclosing(self._provider.stream(request)) as upstream:
                async for item in upstream:
                    yield item
        finally:
            self.streams -= 1
            self.last_used = time.monotonic()
            if not self.streams:
                self._on_idle()

    async def aclose(self) -> None:
        try:
            await self._provider.aclose()
        finally:
            if self._role is not None:
                await self._role.aclose()
            self._closed.set()


# --- the resolver ------------------------------------------------------------------------------


class RouteClients:
    """A :class:`ProviderResolver` with one long-lived Bedrock client per route (see module doc).

    Route clients are :class:`RouteClient`; the hub's own is a plain ``BedrockProvider``.
    """

    def __init__(
        self,
        *,
        region: str,
        bedrock_endpoint_url: str | None,
        sts_endpoint_url: str | None,
        connect_timeout: float,
        read_timeout: float,
        max_attempts: int,
        max_connections: int = 1024,
        role_duration_seconds: int = DEFAULT_ROLE_SECONDS,
        advisory_refresh_seconds: float = DEFAULT_ADVISORY_SECONDS,
        mandatory_refresh_seconds: float = DEFAULT_MANDATORY_SECONDS,
        retry_seconds: float = DEFAULT_RETRY_SECONDS,
        retire_grace_seconds: float = DEFAULT_RETIRE_GRACE_SECONDS,
    ) -> None:
        """``role_duration_seconds``: AssumeRole DurationSeconds (900..3600 under role chaining).

        ``advisory_refresh_seconds`` / ``mandatory_refresh_seconds``: how long before expiry
        assumed-role credentials are refreshed in the background / by every request (botocore's
        windows). ``retry_seconds``: after a failed AssumeRole, how long the result stands before
        STS is asked again. ``retire_grace_seconds``: how long a route client no tenant maps to
        any more stays open after its last use (longer than any pause between a request's
        upstream attempts).
        """
        if not 0 < mandatory_refresh_seconds < advisory_refresh_seconds < role_duration_seconds:
            raise ValueError(
                "need 0 < mandatory_refresh_seconds < advisory_refresh_seconds < role_duration_seconds"
            )
        if retire_grace_seconds < 0:
            raise ValueError("need retire_grace_seconds >= 0")
        self._region = region
        self._endpoint_url = bedrock_endpoint_url
        self._sts_endpoint_url = sts_endpoint_url
        self._connect_timeout = connect_timeout
        self._read_timeout = read_timeout
        self._max_attempts = max_attempts
        self._max_connections = max_connections
        self._duration = role_duration_seconds
        self._advisory = advisory_refresh_seconds
        self._mandatory = mandatory_refresh_seconds
        self._retry = retry_seconds
        self._grace = retire_grace_seconds
        self._stack = contextlib.AsyncExitStack()
        self._session: aioboto3.Session | None = None
        self._sts: Any = None
        self._hub: BedrockProvider | None = None
        self._providers: dict[Target, RouteClient] = {}
        self._locks: dict[Target, asyncio.Lock] = {}
        self._failures: dict[Target, float] = {}  # monotonic time of a failed creation
        self._assignments = RouteAssignments()
        self._timers: dict[Target, asyncio.TimerHandle] = {}  # a retirement waiting for its grace
        self._closing: set[asyncio.Task[None]] = set()
        self._closed = False

    @classmethod
    def from_settings(cls, settings: Settings, **options: Any) -> RouteClients:
        """Built from the hub's settings; ``options`` are the tuning keywords of ``__init__``."""
        # No retry pause is longer than the whole retry phase.
        options.setdefault(
            "retire_grace_seconds", max(DEFAULT_RETIRE_GRACE_SECONDS, settings.upstream_retry_max_seconds)
        )
        return cls(
            region=settings.aws_region,
            bedrock_endpoint_url=settings.bedrock_endpoint_url,
            sts_endpoint_url=settings.sts_endpoint_url,
            connect_timeout=settings.upstream_connect_timeout,
            read_timeout=settings.upstream_read_timeout,
            max_attempts=settings.upstream_max_attempts,
            max_connections=settings.upstream_max_connections,
            **options,
        )

    @property
    def clients(self) -> int:
        """Bedrock clients open now, the hub's included (not those being closed)."""
        return len(self._providers) + (self._hub is not None)

    async def start(self) -> None:
        """Create the hub's Bedrock client and the STS client (hub credentials, default chain)."""
        self._session = aioboto3.Session()
        self._hub = await self._new_provider(self._region, self._endpoint_url, self._session)
        self._sts = await self._stack.enter_async_context(
            self._session.client(
                "sts", region_name=self._region, endpoint_url=self._sts_endpoint_url, config=_STS_CONFIG
            )
        )

    async def provider_for(self, tenant_id: str, route: Route | None) -> Provider:
        if self._closed or self._hub is None:
            raise UpstreamError("the gateway is not serving requests", retryable=False)
        target = self._target(tenant_id, route)
        left = self._assignments.assign(tenant_id, target)
        if left is not None:  # the tenant's route changed and no other tenant uses the old one
            self._consider(left)
        if target is None:
            return self._hub
        provider = self._providers.get(target)
        if provider is not None:
            provider.last_used = time.monotonic()
            return provider
        # One lock per target: a slow AssumeRole for one tenant holds up only that tenant's first
        # requests, and concurrent first requests wait for the one client rather than each making one.
        lock = self._locks.setdefault(target, asyncio.Lock())
        async with lock:
            provider = self._providers.get(target)
            if provider is not None:
                provider.last_used = time.monotonic()
                return provider
            failed_at = self._failures.get(target)
            if failed_at is not None and time.monotonic() - failed_at < self._retry:
                raise UpstreamError(ASSUME_ROLE_FAILED, retryable=False)
            try:
                provider = await self._create(target)
            except UpstreamError:
                self._failures[target] = time.monotonic()
                raise
            self._failures.pop(target, None)
            if self._closed:
                await provider.aclose()
                raise UpstreamError("the gateway is not serving requests", retryable=False)
            self._providers[target] = provider
            log.info(
                "route client created",
                extra={
                    "tenant": tenant_id,
                    "region": target.region,
                    "assumed_role": target.role_arn is not None,
                },
            )
            # The tenant may have moved to another route while this one was being created.
            self._consider(target)
            return provider

    def _target(self, tenant_id: str, route: Route | None) -> Target | None:
        return route_target(tenant_id, route, hub_region=self._region, hub_endpoint_url=self._endpoint_url)

    def reconcile(self, lookup: Callable[[str], Tenant | None]) -> None:
        """Resolve every tenant recorded on a route client against the registry now.

        A tenant that is gone, or whose route changed, leaves its old client even when it sends
        no more requests; that client then closes as any other no tenant maps to (``_consider``).
        """
        if self._closed:
            return
        for tenant_id in self._assignments.tenants():
            tenant = lookup(tenant_id)
            target = None if tenant is None else self._target(tenant_id, tenant.route)
            left = self._assignments.assign(tenant_id, target)
            if left is not None:
                self._consider(left)

    async def follow(self, lookup: Callable[[str], Tenant | None], interval: float) -> None:
        """Call :meth:`reconcile` every ``interval`` seconds until cancelled; a failed look is
        logged and tried again at the next interval."""
        while True:
            await asyncio.sleep(interval)
            try:
                self.reconcile(lookup)
            except Exception as exc:  # noqa: BLE001 - the loop must outlive one bad look
                log.warning("checking route clients against the registry failed (%s)", type(exc).__name__)

    async def aclose(self) -> None:
        """Close every client: the routes', the hub's and STS."""
        self._closed = True
        for timer in self._timers.values():
            timer.cancel()
        self._timers.clear()
        providers, self._providers = list(self._providers.values()), {}
        for provider in providers:
            await provider.aclose()
        await asyncio.gather(*self._closing, return_exceptions=True)
        if self._hub is not None:
            await self._hub.aclose()
            self._hub = None
        await self._stack.aclose()
        self._sts = None

    def _consider(self, target: Target) -> None:
        """Close the client of a target no tenant maps to any more, once :func:`retirement_delay`
        allows; otherwise look again when it does (or when its last stream ends)."""
        timer = self._timers.pop(target, None)
        if timer is not None:
            timer.cancel()
        client = self._providers.get(target)
        if self._closed or client is None or target in self._assignments:
            return
        delay = retirement_delay(client.streams, client.last_used, time.monotonic(), self._grace)
        if delay is None:
            return
        if delay > 0:
            self._timers[target] = asyncio.get_running_loop().call_later(delay, self._consider, target)
            return
        # Decided and removed without an await in between: a request resolving this target from
        # now on gets a new client, and none got this one within the grace. The target's lock is
        # kept: a request woken on it must create the next client under that same lock.
        del self._providers[target]
        task = asyncio.create_task(client.aclose(), name="hubgate-route-client-close")
        self._closing.add(task)
        task.add_done_callback(self._closed_one)
        log.info(
            "route client closed",
            extra={
                "tenant": target.tenant,
                "region": target.region,
                "assumed_role": target.role_arn is not None,
            },
        )

    def _closed_one(self, task: asyncio.Task[None]) -> None:
        self._closing.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None:
            log.warning("closing a route client failed (%s)", type(exc).__name__)

    async def _create(self, target: Target) -> RouteClient:
        assert self._session is not None
        on_idle = partial(self._consider, target)
        if target.role_arn is None or target.tenant is None:
            provider = await self._new_provider(target.region, target.endpoint_url, self._session)
            return RouteClient(provider, None, on_idle)
        role = _AssumedRole(
            self._sts,
            tenant_id=target.tenant,
            role_arn=target.role_arn,
            external_id=target.external_id,
            duration_seconds=self._duration,
            advisory_seconds=self._advisory,
            mandatory_seconds=self._mandatory,
            retry_seconds=self._retry,
        )
        credentials = await role.start()
        try:
            # A botocore session whose credential chain is exactly these refreshable credentials
            # (the resolver is botocore's extension point for where credentials come from).
            botocore_session = AioSession()
            resolver = AioCredentialResolver([_FixedCredentialProvider(credentials)])
            botocore_session.register_component("credential_provider", resolver)
            session = aioboto3.Session(botocore_session=botocore_session)
            provider = await self._new_provider(target.region, target.endpoint_url, session)
        except BaseException:
            await role.aclose()
            raise
        if self._closed:  # shut down while STS answered: nothing may outlive aclose()
            await provider.aclose()
            await role.aclose()
            raise UpstreamError("the gateway is not serving requests", retryable=False)
        return RouteClient(provider, role, on_idle)  # the refresher lives as long as the client

    async def _new_provider(
        self, region: str, endpoint_url: str | None, session: aioboto3.Session
    ) -> BedrockProvider:
        provider = BedrockProvider(
            region=region,
            endpoint_url=endpoint_url,
            connect_timeout=self._connect_timeout,
            read_timeout=self._read_timeout,
            max_attempts=self._max_attempts,
            max_pool_connections=self._max_connections,
            session=session,
        )
        try:
            await provider.start()
        except BaseException:
            await provider.aclose()
            raise
        return provider
