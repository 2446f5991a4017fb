"""The DynamoDB backend: tenants and the catalogue in one table, served from memory.

The whole table is read at start (Scan, paginated) and then every ``registry_refresh_seconds``
in the background. Connections only ever read the in-memory copy: a slow or failing DynamoDB
delays nothing, the last good copy keeps being served, and failures are counted in ``stats``
and logged once per failure streak. Only the first load is allowed to stop the gateway.

Item schema (documented in ``docs/tenants.md``): partition key ``pk`` (S) = ``TENANT#<id>`` or
``MODEL#<id>``; ``id`` (S); ``doc`` (S) = the tenants-file entry as JSON; ``updated_at`` (S,
ISO 8601 UTC); ``updated_by`` (S). botocore and aiohttp exceptions stop here: everything that
leaves this module is a ``RegistryUnavailable``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import aioboto3
import aiohttp
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from hubgate.registry.base import RegistryUnavailable
from hubgate.registry.catalogue import Catalogue, CatalogueReads
from hubgate.settings import Settings
from hubgate.tenants import (
    ModelInfo,
    Tenant,
    TenantConfigError,
    model_entry,
    parse_model,
    parse_tenant,
    tenant_entry,
)

log = logging.getLogger("hubgate.registry")

KEY = "pk"
TENANT_PREFIX = "TENANT#"
MODEL_PREFIX = "MODEL#"
DEFAULT_TIMEOUT_SECONDS = 5.0
_AWS_ERRORS = (BotoCoreError, ClientError, aiohttp.ClientError, OSError, TimeoutError)


def describe(exc: BaseException) -> str:
    """A short, safe description of an AWS failure: the error code or the exception's class."""
    if isinstance(exc, ClientError):
        code = str(exc.response.get("Error", {}).get("Code") or "ClientError")
        if code == "ResourceNotFoundException":
            return f"{code} (does the table exist in this region? `hubgate tenants create-table`)"
        return code
    if isinstance(exc, TimeoutError):
        return "timed out"
    return type(exc).__name__


# ---------------------------------------------------------------------------- items (pure)


def _item(prefix: str, item_id: str, entry: Mapping[str, Any], actor: str, now: float) -> dict[str, Any]:
    return {
        KEY: {"S": prefix + item_id},
        "id": {"S": item_id},
        "doc": {"S": json.dumps(entry, sort_keys=True, separators=(",", ":"))},
        "updated_at": {"S": datetime.fromtimestamp(now, UTC).isoformat(timespec="seconds")},
        "updated_by": {"S": actor},
    }


def tenant_item(tenant: Tenant, *, actor: str, now: float) -> dict[str, Any]:
    """The DynamoDB item (attribute-value form) holding `tenant`."""
    return _item(TENANT_PREFIX, tenant.id, tenant_entry(tenant), actor, now)


def model_item(model: ModelInfo, *, actor: str, now: float) -> dict[str, Any]:
    """The DynamoDB item (attribute-value form) holding a catalogue entry."""
    return _item(MODEL_PREFIX, model.id, model_entry(model), actor, now)


@dataclass(frozen=True, slots=True)
class Loaded:
    catalogue: Catalogue
    bad: dict[str, str] = field(default_factory=dict)  # partition key -> why the item was skipped


def catalogue_from_items(items: Iterable[Mapping[str, Any]], previous: Catalogue | None = None) -> Loaded:
    """Parse scanned items into a catalogue.

    An item that does not parse is skipped and reported in ``bad``; when ``previous`` had that
    tenant or model, its previous version is kept, so one bad edit in the console never takes a
    tenant away from the instances already serving it. Items with other keys are ignored.
    """
    tenants: dict[str, Tenant] = {}
    models: dict[str, ModelInfo] = {}
    bad: dict[str, str] = {}
    for item in items:
        key = item.get(KEY, {}).get("S", "")
        if key.startswith(TENANT_PREFIX):
            kind, item_id = "tenant", key.removeprefix(TENANT_PREFIX)
        elif key.startswith(MODEL_PREFIX):
            kind, item_id = "model", key.removeprefix(MODEL_PREFIX)
        else:
            continue
        try:
            doc = json.loads(item.get("doc", {}).get("S", ""))
            if kind == "tenant":
                tenants[item_id] = parse_tenant(item_id, doc)
            else:
                models[item_id] = parse_model(item_id, doc)
        except (ValueError, TenantConfigError) as exc:  # json.JSONDecodeError is a ValueError
            bad[key] = str(exc) if isinstance(exc, TenantConfigError) else "'doc' is not a JSON string"
            if previous is not None and kind == "tenant" and item_id in previous.tenants:
                tenants[item_id] = previous.tenants[item_id]
            elif previous is not None and kind == "model" and item_id in previous.models:
                models[item_id] = previous.models[item_id]
    return Loaded(Catalogue(tenants, models), bad)


# ---------------------------------------------------------------------------- the table (I/O)


def dynamodb_client(
    session: aioboto3.Session, *, region: str, endpoint_url: str | None, timeout: float
) -> contextlib.AbstractAsyncContextManager[Any]:
    """A low-level DynamoDB client; enter it once and keep it (one connection pool)."""
    config = Config(
        connect_timeout=timeout,
        read_timeout=timeout,
        # One retry at most: the refresher tries again on its next tick anyway.
        retries={"total_max_attempts": 2, "mode": "standard"},
    )
    return session.client("dynamodb", region_name=region, endpoint_url=endpoint_url, config=config)  # type: ignore[no-any-return]


class TenantTable:
    """The tenants table through a DynamoDB client; AWS errors become ``RegistryUnavailable``."""

    def __init__(self, client: Any, name: str, *, timeout: float = DEFAULT_TIMEOUT_SECONDS) -> None:
        self.client = client
        self.name = name
        self.timeout = timeout

    async def scan(self) -> list[dict[str, Any]]:
        """Every item (strongly consistent, all pages), within ``timeout`` overall."""
        items: list[dict[str, Any]] = []
        try:
            async with asyncio.timeout(self.timeout):
                paginator = self.client.get_paginator("scan")
                async for page in paginator.paginate(TableName=self.name, ConsistentRead=True):
                    items.extend(page.get("Items", []))
        except _AWS_ERRORS as exc:
            raise RegistryUnavailable(
                f"cannot read the tenants table {self.name!r}: {describe(exc)}"
            ) from exc
        return items

    async def put(self, item: dict[str, Any]) -> None:
        try:
            async with asyncio.timeout(self.timeout):
                await self.client.put_item(TableName=self.name, Item=item)
        except _AWS_ERRORS as exc:
            raise RegistryUnavailable(
                f"cannot write to the tenants table {self.name!r}: {describe(exc)}"
            ) from exc

    async def create(self, *, wait_seconds: float = 120.0) -> bool:
        """Create the table (on-demand capacity) and wait until it is active; False if it exists."""
        try:
            await self.client.create_table(
                TableName=self.name,
                AttributeDefinitions=[{"AttributeName": KEY, "AttributeType": "S"}],
                KeySchema=[{"AttributeName": KEY, "KeyType": "HASH"}],
                BillingMode="PAY_PER_REQUEST",
            )
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") == "ResourceInUseException":
                return False
            raise RegistryUnavailable(f"cannot create the table {self.name!r}: {describe(exc)}") from exc
        except _AWS_ERRORS as exc:
            raise RegistryUnavailable(f"cannot create the table {self.name!r}: {describe(exc)}") from exc
        try:
            waiter = self.client.get_waiter("table_exists")
            await waiter.wait(
                TableName=self.name, WaiterConfig={"Delay": 1, "MaxAttempts": max(1, int(wait_seconds))}
            )
        except _AWS_ERRORS as exc:
            raise RegistryUnavailable(
                f"the table {self.name!r} did not become active: {describe(exc)}"
            ) from exc
        return True


# ---------------------------------------------------------------------------- the registry


class DynamoDBRegistry(CatalogueReads):
    """Tenants and models from a DynamoDB table, cached in memory and refreshed in the background."""

    writable = True

    def __init__(
        self,
        table: str,
        *,
        region: str,
        endpoint_url: str | None = None,
        refresh_seconds: float = 30.0,
        timeout: float = DEFAULT_TIMEOUT_SECONDS,
        session: aioboto3.Session | None = None,
    ) -> None:
        super().__init__(Catalogue())
        self.table_name = table
        self._region = region
        self._endpoint_url = endpoint_url
        self._refresh_seconds = refresh_seconds
        self._timeout = timeout
        self._session = session
        self._stack = contextlib.AsyncExitStack()
        self._table: TenantTable | None = None
        self._task: asyncio.Task[None] | None = None
        # Serialises refreshes and writes, so a scan that began before a write cannot replace the
        # copy holding that write with an older one. Reads never take it.
        self._lock = asyncio.Lock()
        self._bad: frozenset[str] = frozenset()

    @classmethod
    def from_settings(cls, settings: Settings) -> DynamoDBRegistry:
        assert settings.tenants_table is not None
        return cls(
            settings.tenants_table,
            region=settings.aws_region,
            endpoint_url=settings.dynamodb_endpoint_url,
            refresh_seconds=settings.registry_refresh_seconds,
        )

    async def start(self) -> None:
        """Create the client, load the whole table, start the refresher.

        Raises ``RegistryUnavailable`` when the first load fails: an instance with no tenants
        would refuse every connection while looking healthy.
        """
        session = self._session or aioboto3.Session()
        client = await self._stack.enter_async_context(
            dynamodb_client(
                session, region=self._region, endpoint_url=self._endpoint_url, timeout=self._timeout
            )
        )
        self._table = TenantTable(client, self.table_name, timeout=self._timeout)
        try:
            items = await self._table.scan()
        except RegistryUnavailable as exc:
            await self._stack.aclose()
            raise RegistryUnavailable(
                f"{exc.message}; the gateway does not start without its tenants"
            ) from exc
        self._install(catalogue_from_items(items))
        if not self._catalogue.tenants:
            log.warning("the tenants table has no tenants", extra={"table": self.table_name})
        self._task = asyncio.create_task(self._refresh_forever(), name="registry-refresh")

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        await self._stack.aclose()
        self._table = None

    async def refresh(self) -> None:
        table = self._require_table()
        async with self._lock:
            try:
                items = await table.scan()
            except RegistryUnavailable as exc:
                self.stats.refresh_failures += 1
                self.stats.consecutive_failures += 1
                if self.stats.consecutive_failures == 1:
                    log.warning(
                        "tenant registry refresh failed; serving the last good copy",
                        extra={"table": self.table_name, "error": exc.message},
                    )
                raise
            self._install(catalogue_from_items(items, self._catalogue))
        if self.stats.consecutive_failures:
            log.info(
                "tenant registry refresh recovered",
                extra={"table": self.table_name, "failures": self.stats.consecutive_failures},
            )
            self.stats.consecutive_failures = 0

    async def put_tenant(self, tenant: Tenant, *, actor: str) -> None:
        table = self._require_table()
        async with self._lock:
            self._catalogue.validate_tenant(tenant)
            await table.put(tenant_item(tenant, actor=actor, now=time.time()))
            self._catalogue = self._catalogue.with_tenant(tenant)

    async def put_model(self, model: ModelInfo, *, actor: str) -> None:
        table = self._require_table()
        async with self._lock:
            self._catalogue.validate_model(model)
            await table.put(model_item(model, actor=actor, now=time.time()))
            self._catalogue = self._catalogue.with_model(model)

    def _require_table(self) -> TenantTable:
        if self._table is None:
            raise RegistryUnavailable("the tenant registry is not started")
        return self._table

    def _install(self, loaded: Loaded) -> None:
        self._catalogue = loaded.catalogue
        self.stats.last_success = time.time()
        bad = frozenset(loaded.bad)
        for key in sorted(bad - self._bad):  # each bad item once, not on every refresh
            log.error(
                "skipping an invalid item of the tenants table",
                extra={"table": self.table_name, "key": key, "error": loaded.bad[key]},
            )
        self._bad = bad

    async def _refresh_forever(self) -> None:
        while True:
            await asyncio.sleep(self._refresh_seconds)
            # Failures are counted and logged by refresh(); the last good copy stays in service.
            with contextlib.suppress(RegistryUnavailable):
                await self.refresh()
