"""``hubgate tenants import|export|create-table``: move tenants between a file and the DynamoDB table."""

from __future__ import annotations

import asyncio
import contextlib
import sys
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path

import aioboto3
import yaml

from hubgate.registry.base import RegistryUnavailable
from hubgate.registry.dynamodb import (
    DEFAULT_TIMEOUT_SECONDS,
    TenantTable,
    catalogue_from_items,
    dynamodb_client,
    model_item,
    tenant_item,
)
from hubgate.settings import Settings
from hubgate.tenants import TenantConfigError, TenantsDocument, document_of, read_file

IMPORT_ACTOR = "hubgate tenants import"
ACTIONS = ("import", "export", "create-table")
TOOL_TIMEOUT_SECONDS = 60.0  # for a whole scan or one write; an operator waits, a gateway does not


async def import_document(
    table: TenantTable, document: TenantsDocument, *, actor: str = IMPORT_ACTOR
) -> None:
    """Write every model, then every tenant, of an already validated document.

    Items of the table that the document does not name are left as they are.
    """
    now = datetime.now(UTC).timestamp()
    for model in document.models.values():
        await table.put(model_item(model, actor=actor, now=now))
    for tenant in document.tenants.values():
        await table.put(tenant_item(tenant, actor=actor, now=now))


async def export_text(table: TenantTable) -> tuple[str, dict[str, str]]:
    """The table as a tenants file (YAML), and the items skipped because they do not validate."""
    loaded = catalogue_from_items(await table.scan())
    catalogue = loaded.catalogue
    document = document_of(list(catalogue.tenants.values()), list(catalogue.models.values()))
    stamp = datetime.now(UTC).isoformat(timespec="seconds")
    header = f"# Exported from the DynamoDB table {table.name} at {stamp}. Schema: docs/tenants.md\n"
    return header + yaml.safe_dump(document, sort_keys=False, allow_unicode=True), loaded.bad


@contextlib.asynccontextmanager
async def open_table(settings: Settings, name: str) -> AsyncIterator[TenantTable]:
    async with dynamodb_client(
        aioboto3.Session(),
        region=settings.aws_region,
        endpoint_url=settings.dynamodb_endpoint_url,
        timeout=DEFAULT_TIMEOUT_SECONDS,
    ) as client:
        yield TenantTable(client, name, timeout=TOOL_TIMEOUT_SECONDS)


async def _create(settings: Settings, name: str) -> bool:
    async with open_table(settings, name) as table:
        return await table.create()


async def _import(settings: Settings, name: str, document: TenantsDocument) -> None:
    async with open_table(settings, name) as table:
        await import_document(table, document)


async def _export(settings: Settings, name: str) -> tuple[str, dict[str, str]]:
    async with open_table(settings, name) as table:
        return await export_text(table)


def run(action: str, path: str | None, settings: Settings) -> int:
    """The command's body: an exit status, with a one-line message on stderr for every failure."""
    name = settings.tenants_table
    if action not in ACTIONS:
        print(f"hubgate tenants: unknown action {action!r}", file=sys.stderr)
        return 2
    if name is None:
        print("hubgate tenants: set HUBGATE_TENANTS_TABLE or pass --table", file=sys.stderr)
        return 2
    try:
        if action == "create-table":
            created = asyncio.run(_create(settings, name))
            print(f"table {name} {'created' if created else 'already exists'}", file=sys.stderr)
            return 0
        if action == "import":
            if path is None:
                print("hubgate tenants import: name the tenants file to import", file=sys.stderr)
                return 2
            document = read_file(path)  # the whole file is validated before anything is written
            asyncio.run(_import(settings, name, document))
            print(
                f"imported {len(document.tenants)} tenant(s) and {len(document.models)} model(s) into {name}",
                file=sys.stderr,
            )
            return 0
        text, bad = asyncio.run(_export(settings, name))
        if path is None:
            sys.stdout.write(text)
        else:
            Path(path).write_text(text, "utf-8")
    except (TenantConfigError, RegistryUnavailable) as exc:
        print(f"hubgate tenants {action}: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"hubgate tenants {action}: cannot write {path}: {exc.strerror}", file=sys.stderr)
        return 1
    for key, reason in sorted(bad.items()):
        print(f"hubgate tenants export: skipped {key}: {reason}", file=sys.stderr)
    return 1 if bad else 0
