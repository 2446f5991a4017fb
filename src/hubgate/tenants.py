"""Tenants: who may use which models, within which limits.

The registry is read from a YAML or JSON file (``HUBGATE_TENANTS_FILE``; the demo tenants
shipped in the package when unset). The schema is documented in ``docs/tenants.md``.
Parsing is pure (``parse_tenants``) so it is tested without files.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from hubgate.metering import Budget
from hubgate.providers.base import Guardrail, Route
from hubgate.ratelimit.policy import LimitPolicy

DEFAULT_MAX_TOKENS = 1024
_TENANT_KEYS = frozenset({"name", "enabled", "models", "default_model", "default_max_tokens", "limits"})
_BUDGET_KEYS = frozenset({"monthly_budget_usd", "monthly_budget_tokens"})
_LIMIT_KEYS = frozenset(f.name for f in dataclasses.fields(LimitPolicy)) | _BUDGET_KEYS


class TenantConfigError(ValueError):
    """The tenants file is malformed; the message names the tenant and field."""


@dataclass(frozen=True, slots=True)
class Tenant:
    id: str
    name: str
    enabled: bool
    models: tuple[str, ...]
    default_model: str
    default_max_tokens: int = DEFAULT_MAX_TOKENS
    limits: LimitPolicy = dataclasses.field(default_factory=LimitPolicy)
    budget: Budget = dataclasses.field(default_factory=Budget)
    route: Route | None = None  # None: the hub's own account and region
    guardrail: Guardrail | None = None
    fallbacks: tuple[str, ...] = ()  # tried in order when the requested model is throttled or down

    def allows(self, model: str) -> bool:
        return model in self.models


def _parse_limits(tenant_id: str, raw: Any) -> LimitPolicy:
    if raw is None:
        return LimitPolicy()
    if not isinstance(raw, Mapping):
        raise TenantConfigError(f"tenant {tenant_id!r}: 'limits' must be a mapping")
    unknown = set(raw) - _LIMIT_KEYS
    if unknown:
        raise TenantConfigError(f"tenant {tenant_id!r}: unknown limit(s) {sorted(unknown)}")
    values: dict[str, int | None] = {}
    for key, value in raw.items():
        if key in _BUDGET_KEYS:
            continue
        if value is None:
            values[key] = None
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise TenantConfigError(f"tenant {tenant_id!r}: limits.{key} must be a non-negative integer")
        values[key] = value
    try:
        return LimitPolicy(**values)
    except ValueError as exc:
        raise TenantConfigError(f"tenant {tenant_id!r}: {exc}") from exc


def _parse_budget(tenant_id: str, raw: Any) -> Budget:
    if not isinstance(raw, Mapping):
        return Budget()
    usd = raw.get("monthly_budget_usd")
    tokens = raw.get("monthly_budget_tokens")
    if usd is not None and (isinstance(usd, bool) or not isinstance(usd, int | float) or usd < 0):
        raise TenantConfigError(
            f"tenant {tenant_id!r}: limits.monthly_budget_usd must be a non-negative number"
        )
    if tokens is not None and (isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 0):
        raise TenantConfigError(
            f"tenant {tenant_id!r}: limits.monthly_budget_tokens must be a non-negative integer"
        )
    return Budget(usd=None if usd is None else float(usd), tokens=tokens)


def _parse_tenant(tenant_id: str, raw: Any) -> Tenant:
    if not isinstance(raw, Mapping):
        raise TenantConfigError(f"tenant {tenant_id!r} must be a mapping")
    unknown = set(raw) - _TENANT_KEYS
    if unknown:
        raise TenantConfigError(f"tenant {tenant_id!r}: unknown field(s) {sorted(unknown)}")
    models = raw.get("models") or []
    if not isinstance(models, list) or not all(isinstance(m, str) and m for m in models):
        raise TenantConfigError(f"tenant {tenant_id!r}: 'models' must be a list of model ids")
    if not models:
        raise TenantConfigError(f"tenant {tenant_id!r}: 'models' must name at least one model")
    default_model = raw.get("default_model", models[0])
    if default_model not in models:
        raise TenantConfigError(f"tenant {tenant_id!r}: default_model {default_model!r} is not in its models")
    enabled = raw.get("enabled", True)
    if not isinstance(enabled, bool):
        raise TenantConfigError(f"tenant {tenant_id!r}: 'enabled' must be true or false")
    max_tokens = raw.get("default_max_tokens", DEFAULT_MAX_TOKENS)
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise TenantConfigError(f"tenant {tenant_id!r}: 'default_max_tokens' must be a positive integer")
    name = raw.get("name") or tenant_id
    return Tenant(
        id=tenant_id,
        name=str(name),
        enabled=enabled,
        models=tuple(models),
        default_model=default_model,
        default_max_tokens=max_tokens,
        limits=_parse_limits(tenant_id, raw.get("limits")),
        budget=_parse_budget(tenant_id, raw.get("limits")),
    )


def parse_tenants(document: Any) -> dict[str, Tenant]:
    """Validate a decoded tenants document (``{"tenants": {id: {...}}}``)."""
    if not isinstance(document, Mapping) or not isinstance(document.get("tenants"), Mapping):
        raise TenantConfigError("the tenants file must have a top-level 'tenants' mapping")
    tenants: dict[str, Tenant] = {}
    for tenant_id, raw in document["tenants"].items():
        if (
            not isinstance(tenant_id, str)
            or not tenant_id
            or len(tenant_id) > 128
            or not tenant_id.isprintable()
        ):
            raise TenantConfigError(
                f"tenant id {tenant_id!r} must be a printable string of at most 128 characters"
            )
        tenants[tenant_id] = _parse_tenant(tenant_id, raw)
    return tenants


def load_document(text: str, *, json_format: bool) -> Any:
    try:
        return json.loads(text) if json_format else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        raise TenantConfigError(f"cannot parse the tenants file: {exc}") from exc


class TenantRegistry:
    """Tenants by id. Read-only in this backend; lookups never do I/O."""

    def __init__(self, tenants: Mapping[str, Tenant]) -> None:
        self._tenants = dict(tenants)

    @classmethod
    def from_file(cls, path: str | None) -> TenantRegistry:
        """Load `path` (YAML, or JSON when it ends in .json); the shipped demo tenants when None."""
        if path is None:
            text = resources.files("hubgate").joinpath("data/demo-tenants.yaml").read_text("utf-8")
            return cls(parse_tenants(load_document(text, json_format=False)))
        try:
            text = Path(path).read_text("utf-8")
        except UnicodeDecodeError as exc:
            raise TenantConfigError(f"the tenants file {path} is not UTF-8 text") from exc
        except OSError as exc:
            raise TenantConfigError(f"cannot read the tenants file {path}: {exc.strerror}") from exc
        return cls(parse_tenants(load_document(text, json_format=path.endswith(".json"))))

    def get(self, tenant_id: str) -> Tenant | None:
        return self._tenants.get(tenant_id)

    def all(self) -> list[Tenant]:
        return list(self._tenants.values())
