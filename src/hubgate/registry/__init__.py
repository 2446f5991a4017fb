"""The tenant registry: tenants and the model catalogue, from a file or a DynamoDB table.

``build_registry`` picks the backend from the settings; see ``base.Registry`` for the interface
and ``docs/tenants.md`` for both backends.
"""

from __future__ import annotations

import logging

from hubgate.registry.base import ReadOnlyRegistry, Registry, RegistryStats, RegistryUnavailable
from hubgate.registry.catalogue import Catalogue
from hubgate.registry.dynamodb import DynamoDBRegistry
from hubgate.registry.file import FileRegistry
from hubgate.settings import Settings
from hubgate.tenants import ModelInfo, TenantRegistry

log = logging.getLogger("hubgate.registry")


def build_registry(settings: Settings, given: Registry | TenantRegistry | None = None) -> Registry:
    """The registry to serve: `given` (an embedder's), else the table, else the file (or the demo).

    Not started: the caller awaits ``start()`` (the DynamoDB backend loads the table there).
    """
    if isinstance(given, TenantRegistry):
        return FileRegistry.from_tenants(given.all(), given.catalogue.values())
    if given is not None:
        return given
    if settings.tenants_table is not None:
        if settings.tenants_file is not None:
            log.warning("HUBGATE_TENANTS_TABLE is set, so HUBGATE_TENANTS_FILE is ignored")
        return DynamoDBRegistry.from_settings(settings)
    return FileRegistry.from_file(settings.tenants_file)


__all__ = [
    "Catalogue",
    "DynamoDBRegistry",
    "FileRegistry",
    "ModelInfo",
    "ReadOnlyRegistry",
    "Registry",
    "RegistryStats",
    "RegistryUnavailable",
    "build_registry",
]
