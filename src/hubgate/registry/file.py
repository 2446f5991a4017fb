"""The file backend: tenants and the catalogue from ``HUBGATE_TENANTS_FILE`` (or the demo). Read-only."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

from hubgate.registry.base import ReadOnlyRegistry
from hubgate.registry.catalogue import Catalogue, CatalogueReads
from hubgate.tenants import ModelInfo, Tenant, TenantsDocument, read_file


class FileRegistry(CatalogueReads):
    """Serves a tenants file. Changing a tenant means editing the file and restarting instances."""

    writable = False

    def __init__(self, catalogue: Catalogue, source: Callable[[], TenantsDocument] | None = None) -> None:
        super().__init__(catalogue)
        self._source = source
        self.stats.last_success = time.time()

    @classmethod
    def from_file(cls, path: str | None) -> FileRegistry:
        """Read and validate `path` now (``TenantConfigError`` on a bad file); the demo when None."""

        def source() -> TenantsDocument:
            return read_file(path)

        document = source()
        return cls(Catalogue(document.tenants, document.models), source)

    @classmethod
    def from_tenants(cls, tenants: Iterable[Tenant], models: Iterable[ModelInfo] = ()) -> FileRegistry:
        """A registry built in memory (embedders, tests)."""
        return cls(Catalogue.of(tenants, models))

    async def start(self) -> None:
        """Nothing to do: the file was read and validated when the registry was built."""

    async def aclose(self) -> None:
        pass

    async def put_tenant(self, tenant: Tenant, *, actor: str) -> None:
        raise ReadOnlyRegistry()

    async def put_model(self, model: ModelInfo, *, actor: str) -> None:
        raise ReadOnlyRegistry()

    async def refresh(self) -> None:
        """Read the file again; a file that no longer validates raises and the old copy stays."""
        if self._source is None:
            return
        document = self._source()
        self._catalogue = Catalogue(document.tenants, document.models)
        self.stats.last_success = time.time()
