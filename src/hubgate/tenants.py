"""Tenants: who may use which models, within which limits, through which route.

The records (``Tenant``, ``ModelInfo``) and the pure parsing of the tenants document live here;
the registries that hold them (a file, or a DynamoDB table) are in ``hubgate.registry``. The
schema is documented in ``docs/tenants.md``. Parsing is pure (``parse_document``) so it is
tested without files.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Literal, cast
from urllib.parse import urlsplit

import yaml

from hubgate.metering import Budget, Price
from hubgate.providers.base import Guardrail, Route
from hubgate.ratelimit.policy import LimitPolicy

DEFAULT_MAX_TOKENS = 1024
MAX_MODEL_ID_LENGTH = 2048  # Bedrock model ids and ARNs (ConverseStream `modelId`)
_TENANT_KEYS = frozenset(
    {
        "name",
        "enabled",
        "models",
        "default_model",
        "default_max_tokens",
        "limits",
        "route",
        "guardrail",
        "fallbacks",
    }
)
_DOCUMENT_KEYS = frozenset({"tenants", "models"})
_BUDGET_KEYS = frozenset({"monthly_budget_usd", "monthly_budget_tokens"})
_LIMIT_KEYS = frozenset(f.name for f in dataclasses.fields(LimitPolicy)) | _BUDGET_KEYS
_ROUTE_KEYS = frozenset(f.name for f in dataclasses.fields(Route))
_GUARDRAIL_KEYS = frozenset({"id", "version", "stream_mode"})
_MODEL_KEYS = frozenset(
    {"name", "provider", "context_window", "input_per_1k", "output_per_1k", "enabled", "fallbacks"}
)
# Geographic prefixes of cross-region inference profile ids (``us.anthropic.claude-...``).
_PROFILE_PREFIXES = frozenset({"us", "eu", "apac", "us-gov", "global", "jp", "au", "ca"})

# AWS formats: region names; IAM role ARNs and STS ExternalId (AssumeRole API reference);
# guardrail identifiers and versions (Bedrock GuardrailConfiguration).
_REGION = re.compile(r"[a-z]{2}(-[a-z]+)+-\d{1,2}")
_ROLE_ARN = re.compile(r"arn:aws[a-z-]*:iam::\d{12}:role/[\w+=,.@/-]{1,512}")
_EXTERNAL_ID = re.compile(r"[\w+=,.@:/-]{2,1224}")
_GUARDRAIL_ID = re.compile(r"[a-z0-9]+|arn:aws[a-z-]*:bedrock:[a-z0-9-]{1,20}:\d{12}:guardrail/[a-z0-9]+")
_GUARDRAIL_VERSION = re.compile(r"[1-9][0-9]{0,7}|DRAFT")


class TenantConfigError(ValueError):
    """The tenants document is malformed; the message names the tenant (or model) and field.

    ``field`` is the dotted path of the offending field inside one entry (``limits.max_connections``,
    ``route.role_arn``), or None when the entry as a whole is wrong.
    """

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


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


@dataclass(frozen=True, slots=True)
class ModelInfo:
    """One entry of the model catalogue: what a model is, what it costs, whether it may be used."""

    id: str
    name: str
    provider: str
    context_window: int | None
    price: Price | None
    enabled: bool = True  # False: retired; refused for every tenant
    fallbacks: tuple[str, ...] = ()  # used for tenants that set no `fallbacks` of their own


@dataclass(frozen=True, slots=True)
class TenantsDocument:
    """A whole validated tenants document: the tenants and the (possibly empty) model catalogue."""

    tenants: dict[str, Tenant]
    models: dict[str, ModelInfo]


# ---------------------------------------------------------------------------- small checks


def _is_id(value: Any, max_length: int) -> bool:
    return isinstance(value, str) and 0 < len(value) <= max_length and value.isprintable()


def valid_tenant_id(value: Any) -> bool:
    """A tenant id: a printable string of 1 to 128 characters (the JWT claim has the same rule)."""
    return _is_id(value, 128)


def valid_model_id(value: Any) -> bool:
    return _is_id(value, MAX_MODEL_ID_LENGTH)


def _model_list(owner: str, field: str, raw: Any) -> tuple[str, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, list) or not all(valid_model_id(m) for m in raw):
        raise TenantConfigError(f"{owner}: '{field}' must be a list of model ids", field=field)
    if len(set(raw)) != len(raw):
        raise TenantConfigError(f"{owner}: '{field}' names a model twice", field=field)
    return tuple(raw)


def _optional_str(owner: str, field: str, raw: Any) -> str | None:
    if raw is None:
        return None
    if not isinstance(raw, str) or not raw or not raw.isprintable():
        raise TenantConfigError(f"{owner}: {field} must be a non-empty string", field=field)
    return raw


# ---------------------------------------------------------------------------- tenant blocks


def _parse_limits(tenant_id: str, raw: Any) -> LimitPolicy:
    if raw is None:
        return LimitPolicy()
    if not isinstance(raw, Mapping):
        raise TenantConfigError(f"tenant {tenant_id!r}: 'limits' must be a mapping", field="limits")
    unknown = set(raw) - _LIMIT_KEYS
    if unknown:
        raise TenantConfigError(
            f"tenant {tenant_id!r}: unknown limit(s) {sorted(unknown)}", field=f"limits.{sorted(unknown)[0]}"
        )
    values: dict[str, int | None] = {}
    for key, value in raw.items():
        if key in _BUDGET_KEYS:
            continue
        if value is None:
            values[key] = None
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise TenantConfigError(
                f"tenant {tenant_id!r}: limits.{key} must be a non-negative integer", field=f"limits.{key}"
            )
        values[key] = value
    try:
        return LimitPolicy(**values)
    except ValueError as exc:
        # LimitPolicy's messages start with the field they are about ("limits.token_burst needs ...").
        named = re.match(r"limits\.\w+", str(exc))
        raise TenantConfigError(
            f"tenant {tenant_id!r}: {exc}", field=named.group(0) if named else "limits"
        ) from exc


def _parse_budget(tenant_id: str, raw: Any) -> Budget:
    if not isinstance(raw, Mapping):
        return Budget()
    usd = raw.get("monthly_budget_usd")
    tokens = raw.get("monthly_budget_tokens")
    if usd is not None and (
        isinstance(usd, bool) or not isinstance(usd, int | float) or not math.isfinite(usd) or usd < 0
    ):
        raise TenantConfigError(
            f"tenant {tenant_id!r}: limits.monthly_budget_usd must be a non-negative number",
            field="limits.monthly_budget_usd",
        )
    if tokens is not None and (isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 0):
        raise TenantConfigError(
            f"tenant {tenant_id!r}: limits.monthly_budget_tokens must be a non-negative integer",
            field="limits.monthly_budget_tokens",
        )
    return Budget(usd=None if usd is None else float(usd), tokens=tokens)


def _parse_route(tenant_id: str, raw: Any) -> Route | None:
    owner = f"tenant {tenant_id!r}"
    if raw is None:
        return None
    if not isinstance(raw, Mapping):
        raise TenantConfigError(f"{owner}: 'route' must be a mapping", field="route")
    unknown = set(raw) - _ROUTE_KEYS
    if unknown:
        raise TenantConfigError(
            f"{owner}: unknown route field(s) {sorted(unknown)}", field=f"route.{sorted(unknown)[0]}"
        )
    region = _optional_str(owner, "route.region", raw.get("region"))
    if region is not None and not _REGION.fullmatch(region):
        raise TenantConfigError(
            f"{owner}: route.region {region!r} is not an AWS region name (like eu-west-1)",
            field="route.region",
        )
    role_arn = _optional_str(owner, "route.role_arn", raw.get("role_arn"))
    if role_arn is not None and not _ROLE_ARN.fullmatch(role_arn):
        raise TenantConfigError(
            f"{owner}: route.role_arn must be an IAM role ARN (arn:aws:iam::<account>:role/<name>)",
            field="route.role_arn",
        )
    external_id = _optional_str(owner, "route.external_id", raw.get("external_id"))
    if external_id is not None:
        if role_arn is None:
            raise TenantConfigError(
                f"{owner}: route.external_id needs route.role_arn", field="route.external_id"
            )
        if not _EXTERNAL_ID.fullmatch(external_id):
            raise TenantConfigError(
                f"{owner}: route.external_id must be 2 to 1224 letters, digits or +=,.@:/-_",
                field="route.external_id",
            )
    endpoint_url = _optional_str(owner, "route.endpoint_url", raw.get("endpoint_url"))
    if endpoint_url is not None:
        parts = urlsplit(endpoint_url)
        if parts.scheme not in ("https", "http") or not parts.hostname:
            raise TenantConfigError(
                f"{owner}: route.endpoint_url must be an http(s) URL", field="route.endpoint_url"
            )
    route = Route(region=region, role_arn=role_arn, external_id=external_id, endpoint_url=endpoint_url)
    return None if route == Route() else route


def _parse_guardrail(tenant_id: str, raw: Any) -> Guardrail | None:
    owner = f"tenant {tenant_id!r}"
    if raw is None:
        return None
    if not isinstance(raw, Mapping):
        raise TenantConfigError(f"{owner}: 'guardrail' must be a mapping", field="guardrail")
    unknown = set(raw) - _GUARDRAIL_KEYS
    if unknown:
        raise TenantConfigError(
            f"{owner}: unknown guardrail field(s) {sorted(unknown)}", field=f"guardrail.{sorted(unknown)[0]}"
        )
    guardrail_id = raw.get("id")
    if not isinstance(guardrail_id, str) or not _GUARDRAIL_ID.fullmatch(guardrail_id):
        raise TenantConfigError(
            f"{owner}: guardrail.id must be a Bedrock guardrail id or ARN", field="guardrail.id"
        )
    version = raw.get("version")
    if isinstance(version, int) and not isinstance(version, bool):
        version = str(version)  # YAML reads `version: 1` as a number
    if not isinstance(version, str) or not _GUARDRAIL_VERSION.fullmatch(version):
        raise TenantConfigError(
            f"{owner}: guardrail.version must be a version number or DRAFT", field="guardrail.version"
        )
    mode = raw.get("stream_mode", "async")
    if mode not in ("sync", "async"):
        raise TenantConfigError(
            f"{owner}: guardrail.stream_mode must be sync or async", field="guardrail.stream_mode"
        )
    return Guardrail(id=guardrail_id, version=version, stream_mode=cast(Literal["sync", "async"], mode))


def parse_tenant(tenant_id: str, raw: Any) -> Tenant:
    """Validate one tenant entry (the value under ``tenants.<id>``) on its own."""
    if not isinstance(raw, Mapping):
        raise TenantConfigError(f"tenant {tenant_id!r} must be a mapping")
    unknown = set(raw) - _TENANT_KEYS
    if unknown:
        raise TenantConfigError(
            f"tenant {tenant_id!r}: unknown field(s) {sorted(unknown)}", field=sorted(unknown)[0]
        )
    models = list(_model_list(f"tenant {tenant_id!r}", "models", raw.get("models") or []))
    if not models:
        raise TenantConfigError(
            f"tenant {tenant_id!r}: 'models' must name at least one model", field="models"
        )
    default_model = raw.get("default_model", models[0])
    if default_model not in models:
        raise TenantConfigError(
            f"tenant {tenant_id!r}: default_model {default_model!r} is not in its models",
            field="default_model",
        )
    enabled = raw.get("enabled", True)
    if not isinstance(enabled, bool):
        raise TenantConfigError(f"tenant {tenant_id!r}: 'enabled' must be true or false", field="enabled")
    max_tokens = raw.get("default_max_tokens", DEFAULT_MAX_TOKENS)
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise TenantConfigError(
            f"tenant {tenant_id!r}: 'default_max_tokens' must be a positive integer",
            field="default_max_tokens",
        )
    fallbacks = _model_list(f"tenant {tenant_id!r}", "fallbacks", raw.get("fallbacks"))
    for model in fallbacks:
        if model not in models:
            raise TenantConfigError(
                f"tenant {tenant_id!r}: fallback {model!r} is not in its models", field="fallbacks"
            )
    name = _optional_str(f"tenant {tenant_id!r}", "name", raw.get("name")) or tenant_id
    return Tenant(
        id=tenant_id,
        name=name,
        enabled=enabled,
        models=tuple(models),
        default_model=default_model,
        default_max_tokens=max_tokens,
        limits=_parse_limits(tenant_id, raw.get("limits")),
        budget=_parse_budget(tenant_id, raw.get("limits")),
        route=_parse_route(tenant_id, raw.get("route")),
        guardrail=_parse_guardrail(tenant_id, raw.get("guardrail")),
        fallbacks=fallbacks,
    )


# ---------------------------------------------------------------------------- the model catalogue


def provider_of(model_id: str) -> str:
    """The provider named by a model id: ``anthropic`` for ``us.anthropic.claude-...``."""
    parts = model_id.rsplit("/", 1)[-1].split(".")
    if len(parts) > 2 and parts[0] in _PROFILE_PREFIXES:
        return parts[1]
    return parts[0]


def _non_negative_number(owner: str, field: str, raw: Any) -> float:
    if isinstance(raw, bool) or not isinstance(raw, int | float) or not 0 <= raw < float("inf"):
        raise TenantConfigError(f"{owner}: {field} must be a non-negative number", field=field)
    return float(raw)


def parse_model(model_id: str, raw: Any) -> ModelInfo:
    """Validate one catalogue entry (the value under ``models.<id>``) on its own."""
    owner = f"model {model_id!r}"
    if not valid_model_id(model_id):
        raise TenantConfigError(
            f"model id {model_id!r} must be a printable string of at most {MAX_MODEL_ID_LENGTH} characters"
        )
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        raise TenantConfigError(f"{owner} must be a mapping")
    unknown = set(raw) - _MODEL_KEYS
    if unknown:
        raise TenantConfigError(f"{owner}: unknown field(s) {sorted(unknown)}", field=sorted(unknown)[0])
    name = _optional_str(owner, "name", raw.get("name")) or model_id
    provider = _optional_str(owner, "provider", raw.get("provider")) or provider_of(model_id)
    window = raw.get("context_window")
    if window is not None and (isinstance(window, bool) or not isinstance(window, int) or window < 1):
        raise TenantConfigError(f"{owner}: context_window must be a positive integer", field="context_window")
    given = [key for key in ("input_per_1k", "output_per_1k") if raw.get(key) is not None]
    price = None
    if len(given) == 1:
        missing = "output_per_1k" if given == ["input_per_1k"] else "input_per_1k"
        raise TenantConfigError(
            f"{owner}: give both input_per_1k and output_per_1k, or neither", field=missing
        )
    if given:
        price = Price(
            _non_negative_number(owner, "input_per_1k", raw["input_per_1k"]),
            _non_negative_number(owner, "output_per_1k", raw["output_per_1k"]),
        )
    enabled = raw.get("enabled", True)
    if not isinstance(enabled, bool):
        raise TenantConfigError(f"{owner}: 'enabled' must be true or false", field="enabled")
    fallbacks = _model_list(owner, "fallbacks", raw.get("fallbacks"))
    if model_id in fallbacks:
        raise TenantConfigError(f"{owner}: a model cannot be its own fallback", field="fallbacks")
    return ModelInfo(
        id=model_id,
        name=name,
        provider=provider,
        context_window=window,
        price=price,
        enabled=enabled,
        fallbacks=fallbacks,
    )


def check_tenant_models(tenant: Tenant, models: Mapping[str, ModelInfo]) -> None:
    """With a catalogue (non-empty ``models``), every model an enabled tenant lists must be in it.

    A disabled tenant serves nothing, so it is not checked: disabling one always works.
    """
    if not models or not tenant.enabled:
        return
    for model in tenant.models:
        if model not in models:
            raise TenantConfigError(
                f"tenant {tenant.id!r}: model {model!r} is not in the models catalogue", field="models"
            )


def check_model_fallbacks(model: ModelInfo, models: Mapping[str, ModelInfo]) -> None:
    """A catalogue entry's fallbacks must be models of the catalogue."""
    for fallback in model.fallbacks:
        if fallback not in models:
            raise TenantConfigError(
                f"model {model.id!r}: fallback {fallback!r} is not in the models catalogue", field="fallbacks"
            )


# ---------------------------------------------------------------------------- whole documents


def parse_document(document: Any) -> TenantsDocument:
    """Validate a decoded tenants document: ``{"tenants": {id: {...}}, "models": {id: {...}}}``.

    ``models`` (the catalogue) is optional. When it is given, every model a tenant lists must be
    in it, and every fallback a catalogue entry names too.
    """
    if not isinstance(document, Mapping) or not isinstance(document.get("tenants"), Mapping):
        raise TenantConfigError("the tenants file must have a top-level 'tenants' mapping")
    unknown = set(document) - _DOCUMENT_KEYS
    if unknown:
        raise TenantConfigError(f"the tenants file has unknown top-level key(s) {sorted(unknown, key=str)}")
    raw_models = document.get("models")
    if raw_models is not None and not isinstance(raw_models, Mapping):
        raise TenantConfigError("the top-level 'models' must be a mapping of model id to model")
    models: dict[str, ModelInfo] = {}
    for model_id, raw in (raw_models or {}).items():
        models[model_id] = parse_model(model_id, raw)
    for model in models.values():
        check_model_fallbacks(model, models)
    tenants: dict[str, Tenant] = {}
    for tenant_id, raw in document["tenants"].items():
        if not valid_tenant_id(tenant_id):
            raise TenantConfigError(
                f"tenant id {tenant_id!r} must be a printable string of at most 128 characters"
            )
        tenant = parse_tenant(tenant_id, raw)
        check_tenant_models(tenant, models)
        tenants[tenant_id] = tenant
    return TenantsDocument(tenants=tenants, models=models)


def parse_tenants(document: Any) -> dict[str, Tenant]:
    """Validate a decoded tenants document (``{"tenants": {id: {...}}}``); the tenants by id."""
    return parse_document(document).tenants


def load_document(text: str, *, json_format: bool) -> Any:
    try:
        return json.loads(text) if json_format else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        raise TenantConfigError(f"cannot parse the tenants file: {exc}") from exc


def read_file(path: str | None) -> TenantsDocument:
    """Read and validate `path` (YAML, or JSON when it ends in .json); the shipped demo when None."""
    if path is None:
        text = resources.files("hubgate").joinpath("data/demo-tenants.yaml").read_text("utf-8")
        return parse_document(load_document(text, json_format=False))
    try:
        text = Path(path).read_text("utf-8")
    except UnicodeDecodeError as exc:
        raise TenantConfigError(f"the tenants file {path} is not UTF-8 text") from exc
    except OSError as exc:
        raise TenantConfigError(f"cannot read the tenants file {path}: {exc.strerror}") from exc
    return parse_document(load_document(text, json_format=path.endswith(".json")))


# ---------------------------------------------------------------------------- back to documents


def tenant_entry(tenant: Tenant) -> dict[str, Any]:
    """A tenant as a tenants-file entry (the inverse of ``parse_tenant``); defaults left out."""
    entry: dict[str, Any] = {
        "name": tenant.name,
        "enabled": tenant.enabled,
        "models": list(tenant.models),
        "default_model": tenant.default_model,
        "default_max_tokens": tenant.default_max_tokens,
    }
    limits: dict[str, Any] = {
        f.name: getattr(tenant.limits, f.name)
        for f in dataclasses.fields(tenant.limits)
        if getattr(tenant.limits, f.name) is not None
    }
    if tenant.budget.usd is not None:
        limits["monthly_budget_usd"] = tenant.budget.usd
    if tenant.budget.tokens is not None:
        limits["monthly_budget_tokens"] = tenant.budget.tokens
    if limits:
        entry["limits"] = limits
    if tenant.route is not None:
        entry["route"] = {k: v for k, v in dataclasses.asdict(tenant.route).items() if v is not None}
    if tenant.guardrail is not None:
        entry["guardrail"] = dataclasses.asdict(tenant.guardrail)
    if tenant.fallbacks:
        entry["fallbacks"] = list(tenant.fallbacks)
    return entry


def model_entry(model: ModelInfo) -> dict[str, Any]:
    """A catalogue entry as in the tenants file (the inverse of ``parse_model``)."""
    entry: dict[str, Any] = {"name": model.name, "provider": model.provider}
    if model.context_window is not None:
        entry["context_window"] = model.context_window
    if model.price is not None:
        entry["input_per_1k"] = model.price.input_per_1k
        entry["output_per_1k"] = model.price.output_per_1k
    entry["enabled"] = model.enabled
    if model.fallbacks:
        entry["fallbacks"] = list(model.fallbacks)
    return entry


def document_of(tenants: list[Tenant], models: list[ModelInfo]) -> dict[str, Any]:
    """A whole tenants document, ready for ``yaml.safe_dump`` (the catalogue only when there is one)."""
    document: dict[str, Any] = {}
    if models:
        document["models"] = {m.id: model_entry(m) for m in sorted(models, key=lambda m: m.id)}
    document["tenants"] = {t.id: tenant_entry(t) for t in sorted(tenants, key=lambda t: t.id)}
    return document


class TenantRegistry:
    """Tenants (and the model catalogue) from a file, by id; lookups never do I/O.

    Kept for embedders and tests that build a registry by hand; the gateway serves through
    ``hubgate.registry`` (``create_app`` accepts either).
    """

    def __init__(self, tenants: Mapping[str, Tenant], models: Mapping[str, ModelInfo] | None = None) -> None:
        self._tenants = dict(tenants)
        self.catalogue = dict(models or {})

    @classmethod
    def from_file(cls, path: str | None) -> TenantRegistry:
        """Load `path` (YAML, or JSON when it ends in .json); the shipped demo tenants when None."""
        document = read_file(path)
        return cls(document.tenants, document.models)

    def get(self, tenant_id: str) -> Tenant | None:
        return self._tenants.get(tenant_id)

    def all(self) -> list[Tenant]:
        return list(self._tenants.values())
