"""The registry interface: tenants and the model catalogue, read from memory, written through a backend.

Reads (``get``, ``check_model``, ...) are synchronous dictionary lookups on the connection's hot
path and never do I/O. Writes and the life cycle are asynchronous. Two backends implement it:
``FileRegistry`` (read-only) and ``DynamoDBRegistry`` (a table, refreshed in the background).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from hubgate.tenants import ModelInfo, Tenant

READ_ONLY_MESSAGE = (
    "the tenants file is read-only; use HUBGATE_TENANTS_TABLE to manage tenants through the API"
)


class ReadOnlyRegistry(Exception):
    """A write was asked of a backend that cannot be written (the tenants file)."""

    def __init__(self, message: str = READ_ONLY_MESSAGE) -> None:
        super().__init__(message)
        self.message = message


class RegistryUnavailable(Exception):
    """The backend could not be read or written. The message names the table and the error code,
    never credentials or request details."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


@dataclass(slots=True)
class RegistryStats:
    """How background refreshes are going (a file registry never refreshes by itself)."""

    refresh_failures: int = 0  # every failed refresh since start
    consecutive_failures: int = 0  # the current failure streak; 0 after a success
    last_success: float | None = None  # wall-clock time (time.time()) of the last good load


class Registry(Protocol):
    """Tenants by id and the model catalogue; see ``docs/tenants.md``."""

    writable: bool
    stats: RegistryStats

    def get(self, tenant_id: str) -> Tenant | None: ...

    def all(self) -> list[Tenant]: ...

    def model(self, model_id: str) -> ModelInfo | None: ...

    def models(self) -> list[ModelInfo]: ...

    def check_model(self, tenant: Tenant, model: str) -> None:
        """Raise ``hubgate.errors.ModelNotAllowed`` unless `tenant` may use `model` now.

        Refused: a model outside the tenant's allowlist, or one the catalogue disables (retired).
        A model absent from the catalogue is allowed when the tenant lists it.
        """
        ...

    def fallbacks_for(self, tenant: Tenant, model: str) -> tuple[str, ...]:
        """The models to try after `model`, in order: the tenant's `fallbacks`, else the catalogue's
        for `model`; only models the tenant allows and the catalogue does not disable, never `model`."""
        ...

    async def start(self) -> None:
        """Load everything; raise (``RegistryUnavailable``, ``TenantConfigError``) when that fails."""
        ...

    async def aclose(self) -> None: ...

    async def put_tenant(self, tenant: Tenant, *, actor: str) -> None:
        """Create or replace a tenant; served by this instance at once. ``ReadOnlyRegistry`` when
        the backend cannot be written, ``TenantConfigError`` when it contradicts the catalogue."""
        ...

    async def put_model(self, model: ModelInfo, *, actor: str) -> None:
        """Create or replace a catalogue entry; served by this instance at once."""
        ...

    async def refresh(self) -> None:
        """Reload from the backend now; on failure keep serving the last good copy and raise."""
        ...
