"""The registry's in-memory copy: tenants and models in one immutable snapshot, and the pure rules
that answer "may this tenant use this model" and "what to try when it is down"."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from hubgate.errors import ModelNotAllowed
from hubgate.registry.base import RegistryStats
from hubgate.tenants import ModelInfo, Tenant, check_model_fallbacks, check_tenant_models


@dataclass(frozen=True, slots=True)
class Catalogue:
    """One consistent copy of the registry. Replaced whole, never changed in place, so a reader
    on the event loop always sees either the old copy or the new one."""

    tenants: Mapping[str, Tenant] = field(default_factory=dict)
    models: Mapping[str, ModelInfo] = field(default_factory=dict)

    @classmethod
    def of(cls, tenants: Iterable[Tenant], models: Iterable[ModelInfo] = ()) -> Catalogue:
        return cls({t.id: t for t in tenants}, {m.id: m for m in models})

    def check_model(self, tenant: Tenant, model: str) -> None:
        # The allowlist first: a tenant learns nothing about models it may not use anyway.
        if model not in tenant.models:
            raise ModelNotAllowed(f"model {model[:200]!r} is not available to this tenant")
        info = self.models.get(model)
        if info is not None and not info.enabled:
            raise ModelNotAllowed(f"model {model[:200]!r} is retired")

    def fallbacks_for(self, tenant: Tenant, model: str) -> tuple[str, ...]:
        candidates = tenant.fallbacks
        if not candidates:
            info = self.models.get(model)
            candidates = info.fallbacks if info is not None else ()
        chosen: list[str] = []
        for candidate in candidates:
            if candidate == model or candidate in chosen or candidate not in tenant.models:
                continue
            info = self.models.get(candidate)
            if info is not None and not info.enabled:
                continue
            chosen.append(candidate)
        return tuple(chosen)

    def validate_tenant(self, tenant: Tenant) -> None:
        """Raise ``TenantConfigError`` when `tenant` lists a model the catalogue does not know."""
        check_tenant_models(tenant, self.models)

    def validate_model(self, model: ModelInfo) -> None:
        """Raise ``TenantConfigError`` when `model` names a fallback the catalogue does not know."""
        check_model_fallbacks(model, {**self.models, model.id: model})

    def with_tenant(self, tenant: Tenant) -> Catalogue:
        return Catalogue({**self.tenants, tenant.id: tenant}, self.models)

    def with_model(self, model: ModelInfo) -> Catalogue:
        return Catalogue(self.tenants, {**self.models, model.id: model})


class CatalogueReads:
    """The read half every backend shares: answers from the current ``Catalogue``, without I/O."""

    writable: bool = False

    def __init__(self, catalogue: Catalogue) -> None:
        self._catalogue = catalogue
        self.stats = RegistryStats()

    @property
    def catalogue(self) -> Catalogue:
        return self._catalogue

    def get(self, tenant_id: str) -> Tenant | None:
        return self._catalogue.tenants.get(tenant_id)

    def all(self) -> list[Tenant]:
        return list(self._catalogue.tenants.values())

    def model(self, model_id: str) -> ModelInfo | None:
        return self._catalogue.models.get(model_id)

    def models(self) -> list[ModelInfo]:
        return list(self._catalogue.models.values())

    def check_model(self, tenant: Tenant, model: str) -> None:
        self._catalogue.check_model(tenant, model)

    def fallbacks_for(self, tenant: Tenant, model: str) -> tuple[str, ...]:
        return self._catalogue.fallbacks_for(tenant, model)
