"""The tenants file: schema validation (pure) and loading from YAML, JSON and the shipped demo."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from hubgate.ratelimit.policy import LimitPolicy
from hubgate.tenants import DEFAULT_MAX_TOKENS, Tenant, TenantConfigError, TenantRegistry, parse_tenants

HAIKU = "anthropic.claude-3-5-haiku-20241022-v1:0"
NOVA_LITE = "amazon.nova-lite-v1:0"
NOVA_PRO = "amazon.nova-pro-v1:0"


def one(raw: Any, tenant_id: str = "t1") -> Tenant:
    return parse_tenants({"tenants": {tenant_id: raw}})[tenant_id]


def refusal(raw: Any, tenant_id: str = "t1") -> str:
    with pytest.raises(TenantConfigError) as info:
        parse_tenants({"tenants": {tenant_id: raw}})
    return str(info.value)


# --------------------------------------------------------------------------- the demo file


def test_demo_tenants_load() -> None:
    registry = TenantRegistry.from_file(None)
    assert [t.id for t in registry.all()] == ["acme", "globex", "initech"]

    acme = registry.get("acme")
    assert acme == Tenant(
        id="acme",
        name="Acme Retail",
        enabled=True,
        models=(HAIKU, NOVA_LITE, NOVA_PRO),
        default_model=HAIKU,
        default_max_tokens=512,
        limits=LimitPolicy(
            requests_per_minute=120,
            tokens_per_minute=200000,
            max_connections=50,
            max_concurrent_streams=20,
        ),
    )
    assert acme.allows(NOVA_PRO)
    assert not acme.allows("amazon.titan-text-express-v1")

    globex = registry.get("globex")
    assert globex is not None
    assert globex.models == (NOVA_LITE,)
    assert globex.default_max_tokens == 256
    assert globex.limits == LimitPolicy(
        requests_per_minute=10,
        tokens_per_minute=5000,
        per_user_requests_per_minute=5,
        max_connections=5,
        max_concurrent_streams=2,
    )

    initech = registry.get("initech")
    assert initech is not None
    assert not initech.enabled
    assert initech.default_max_tokens == DEFAULT_MAX_TOKENS
    assert initech.limits == LimitPolicy()

    assert registry.get("nobody") is None


# --------------------------------------------------------------------------- defaults


def test_minimal_tenant_gets_defaults() -> None:
    assert one({"models": ["m1", "m2"]}) == Tenant(
        id="t1",
        name="t1",
        enabled=True,
        models=("m1", "m2"),
        default_model="m1",
        default_max_tokens=DEFAULT_MAX_TOKENS,
        limits=LimitPolicy(),
    )


def test_null_limits_mean_unlimited() -> None:
    tenant = one({"models": ["m"], "limits": {"requests_per_minute": None, "max_connections": 0}})
    assert tenant.limits == LimitPolicy(max_connections=0)
    assert one({"models": ["m"], "limits": None}).limits == LimitPolicy()


def test_every_limit_field_is_accepted() -> None:
    limits = {
        "requests_per_minute": 60,
        "request_burst": 10,
        "tokens_per_minute": 1000,
        "token_burst": 2000,
        "per_user_requests_per_minute": 5,
        "per_user_request_burst": 2,
        "max_connections": 3,
        "max_concurrent_streams": 0,
    }
    assert one({"models": ["m"], "limits": limits}).limits == LimitPolicy(**limits)


def test_no_tenants_is_an_empty_registry() -> None:
    assert parse_tenants({"tenants": {}}) == {}


# --------------------------------------------------------------------------- refusals


@pytest.mark.parametrize("document", [None, [], "tenants", {}, {"tenants": None}, {"tenants": ["acme"]}])
def test_document_needs_a_tenants_mapping(document: Any) -> None:
    with pytest.raises(TenantConfigError, match="top-level 'tenants' mapping"):
        parse_tenants(document)


@pytest.mark.parametrize("tenant_id", ["", "x" * 129, "a\nb", 42, None])
def test_bad_tenant_ids(tenant_id: Any) -> None:
    with pytest.raises(TenantConfigError, match="must be a printable string of at most 128"):
        parse_tenants({"tenants": {tenant_id: {"models": ["m"]}}})


def test_longest_tenant_id() -> None:
    assert one({"models": ["m"]}, tenant_id="x" * 128).id == "x" * 128


@pytest.mark.parametrize("raw", [None, [], "acme", 3])
def test_tenant_must_be_a_mapping(raw: Any) -> None:
    assert refusal(raw) == "tenant 't1' must be a mapping"


def test_unknown_tenant_field() -> None:
    assert refusal({"models": ["m"], "model": "m"}) == "tenant 't1': unknown field(s) ['model']"


@pytest.mark.parametrize("models", ["m", {"m": 1}, [1], [""], ["m", None]])
def test_models_must_be_a_list_of_ids(models: Any) -> None:
    assert refusal({"models": models}) == "tenant 't1': 'models' must be a list of model ids"


def test_models_must_be_printable_ids_named_once() -> None:
    assert refusal({"models": ["m", "m"]}) == "tenant 't1': 'models' names a model twice"
    for bad in ("a\nb", "x" * 2049):
        assert refusal({"models": [bad]}) == "tenant 't1': 'models' must be a list of model ids"


@pytest.mark.parametrize("name", [5, "", "a\tb", ["x"]])
def test_a_name_must_be_a_printable_string(name: Any) -> None:
    assert refusal({"models": ["m"], "name": name}) == "tenant 't1': name must be a non-empty string"


@pytest.mark.parametrize("usd", [float("inf"), float("nan"), -0.5])
def test_a_usd_budget_must_be_a_finite_non_negative_number(usd: float) -> None:
    message = refusal({"models": ["m"], "limits": {"monthly_budget_usd": usd}})
    assert message == "tenant 't1': limits.monthly_budget_usd must be a non-negative number"


@pytest.mark.parametrize("raw", [{}, {"models": []}, {"models": None}])
def test_models_must_not_be_empty(raw: Any) -> None:
    assert refusal(raw) == "tenant 't1': 'models' must name at least one model"


def test_default_model_must_be_one_of_the_models() -> None:
    message = refusal({"models": ["a"], "default_model": "b"})
    assert message == "tenant 't1': default_model 'b' is not in its models"


@pytest.mark.parametrize("enabled", ["yes", 1, 0, None, "false"])
def test_enabled_must_be_a_bool(enabled: Any) -> None:
    assert refusal({"models": ["m"], "enabled": enabled}) == "tenant 't1': 'enabled' must be true or false"


@pytest.mark.parametrize("value", [0, -5, 1.5, "512", True, None])
def test_default_max_tokens_must_be_a_positive_integer(value: Any) -> None:
    message = refusal({"models": ["m"], "default_max_tokens": value})
    assert message == "tenant 't1': 'default_max_tokens' must be a positive integer"


@pytest.mark.parametrize("limits", [[], "fast", 10])
def test_limits_must_be_a_mapping(limits: Any) -> None:
    assert refusal({"models": ["m"], "limits": limits}) == "tenant 't1': 'limits' must be a mapping"


def test_unknown_limit() -> None:
    message = refusal({"models": ["m"], "limits": {"rpm": 5, "requests_per_minute": 5}})
    assert message == "tenant 't1': unknown limit(s) ['rpm']"


@pytest.mark.parametrize("value", [-1, 1.5, "10", True, [1]])
def test_limit_values_must_be_non_negative_integers(value: Any) -> None:
    message = refusal({"models": ["m"], "limits": {"max_connections": value}})
    assert message == "tenant 't1': limits.max_connections must be a non-negative integer"


def test_error_names_the_offending_tenant() -> None:
    document = {"tenants": {"good": {"models": ["m"]}, "bad-one": {"models": ["m"], "enabled": "no"}}}
    with pytest.raises(TenantConfigError, match="tenant 'bad-one': 'enabled'"):
        parse_tenants(document)


# --------------------------------------------------------------------------- files


def test_yaml_file(tmp_path: Path) -> None:
    path = tmp_path / "tenants.yaml"
    path.write_text(
        "tenants:\n"
        "  blue:\n"
        "    name: Blue Co\n"
        "    models: [m1, m2]\n"
        "    default_model: m2\n"
        "    limits:\n"
        "      requests_per_minute: 30\n"
        "  red:\n"
        "    enabled: false\n"
        "    models: [m1]\n",
        "utf-8",
    )
    registry = TenantRegistry.from_file(str(path))
    blue = registry.get("blue")
    assert blue is not None
    assert blue.name == "Blue Co"
    assert blue.default_model == "m2"
    assert blue.limits == LimitPolicy(requests_per_minute=30)
    red = registry.get("red")
    assert red is not None and not red.enabled


def test_json_file(tmp_path: Path) -> None:
    path = tmp_path / "tenants.json"
    document = {
        "tenants": {"blue": {"models": ["m1"], "default_max_tokens": 64, "limits": {"token_burst": None}}}
    }
    path.write_text(json.dumps(document), "utf-8")
    blue = TenantRegistry.from_file(str(path)).get("blue")
    assert blue is not None
    assert blue.default_max_tokens == 64


def test_json_file_is_parsed_as_json(tmp_path: Path) -> None:
    # YAML would accept this (a flow mapping with unquoted keys); JSON must not.
    path = tmp_path / "tenants.json"
    path.write_text("{tenants: {blue: {models: [m1]}}}", "utf-8")
    with pytest.raises(TenantConfigError, match="cannot parse the tenants file"):
        TenantRegistry.from_file(str(path))


def test_malformed_yaml(tmp_path: Path) -> None:
    path = tmp_path / "tenants.yaml"
    path.write_text("tenants:\n  blue: [unclosed\n", "utf-8")
    with pytest.raises(TenantConfigError, match="cannot parse the tenants file"):
        TenantRegistry.from_file(str(path))


def test_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "tenants.yaml"
    path.write_text("", "utf-8")
    with pytest.raises(TenantConfigError, match="top-level 'tenants' mapping"):
        TenantRegistry.from_file(str(path))


def test_invalid_tenant_in_a_file(tmp_path: Path) -> None:
    path = tmp_path / "tenants.yaml"
    path.write_text("tenants:\n  blue:\n    models: [m1]\n    default_model: m9\n", "utf-8")
    with pytest.raises(TenantConfigError, match="tenant 'blue': default_model 'm9'"):
        TenantRegistry.from_file(str(path))


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "absent.yaml"
    with pytest.raises(TenantConfigError, match="cannot read the tenants file") as info:
        TenantRegistry.from_file(str(path))
    assert str(path) in str(info.value)


def test_directory_is_unreadable(tmp_path: Path) -> None:
    with pytest.raises(TenantConfigError, match="cannot read the tenants file"):
        TenantRegistry.from_file(str(tmp_path))


def test_registry_lookups() -> None:
    registry = TenantRegistry(parse_tenants({"tenants": {"a": {"models": ["m"]}, "b": {"models": ["m"]}}}))
    assert [t.id for t in registry.all()] == ["a", "b"]
    assert registry.get("a") is not None
    assert registry.get("c") is None


def test_a_burst_without_its_rate_names_the_tenant() -> None:
    with pytest.raises(TenantConfigError, match=r"tenant 'a'.*request_burst needs"):
        parse_tenants({"tenants": {"a": {"models": ["m"], "limits": {"request_burst": 5}}}})


def test_a_file_that_is_not_utf8_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "tenants.yaml"
    path.write_bytes(b"tenants:\n  \xff\xfe: {}\n")
    with pytest.raises(TenantConfigError, match="not UTF-8"):
        TenantRegistry.from_file(str(path))


def test_a_null_name_falls_back_to_the_id() -> None:
    tenants = parse_tenants({"tenants": {"a": {"models": ["m"], "name": None}}})
    assert tenants["a"].name == "a"
