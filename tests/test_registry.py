"""The tenant registry: catalogue, route, guardrail and fallback parsing (pure), the catalogue rules,
the DynamoDB backend and the import/export tool against moto, and a gateway served from a table."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from hubgate.cli import main
from hubgate.errors import ModelNotAllowed
from hubgate.metering import Price
from hubgate.providers.base import Guardrail, Route
from hubgate.ratelimit.policy import LimitPolicy
from hubgate.registry import (
    Catalogue,
    DynamoDBRegistry,
    FileRegistry,
    ReadOnlyRegistry,
    RegistryUnavailable,
    build_registry,
)
from hubgate.registry.dynamodb import TenantTable, catalogue_from_items, dynamodb_client, tenant_item
from hubgate.registry.tool import import_document
from hubgate.settings import Settings
from hubgate.tenants import (
    ModelInfo,
    Tenant,
    TenantConfigError,
    TenantRegistry,
    document_of,
    parse_document,
    parse_tenant,
    read_file,
    tenant_entry,
)
from tests.conftest import ws_url
from tests.support.client import Client, text_of
from tests.support.emulator_server import EmulatorServer
from tests.support.gateway_server import gateway_settings, running_gateway
from tests.support.moto_server import MOTO_ENV, MotoServer
from tests.support.tcp_proxy import TcpProxy

Mint = Callable[..., str]
HAIKU = "anthropic.claude-3-5-haiku-20241022-v1:0"
NOVA = "amazon.nova-lite-v1:0"
PRO = "amazon.nova-pro-v1:0"
MICRO = "amazon.nova-micro-v1:0"
ROLE = "arn:aws:iam::123456789012:role/hubgate-spoke"

CATALOGUE: dict[str, Any] = {
    HAIKU: {
        "name": "Claude 3.5 Haiku",
        "context_window": 200000,
        "input_per_1k": 0.0008,
        "output_per_1k": 0.004,
    },
    NOVA: {"name": "Nova Lite", "provider": "amazon", "context_window": 300000, "fallbacks": [MICRO]},
    PRO: {"name": "Nova Pro", "fallbacks": [NOVA, HAIKU]},
    MICRO: {"enabled": True},
}


def entry(**fields: Any) -> dict[str, Any]:
    return {"models": [HAIKU, NOVA, PRO], **fields}


def refusal(raw: Any, tenant_id: str = "t1") -> TenantConfigError:
    with pytest.raises(TenantConfigError) as info:
        parse_tenant(tenant_id, raw)
    return info.value


def demo_with_catalogue() -> dict[str, Any]:
    """The shipped demo tenants plus a catalogue that knows all their models."""
    document: dict[str, Any] = yaml.safe_load(
        Path(__file__).parents[1].joinpath("src/hubgate/data/demo-tenants.yaml").read_text("utf-8")
    )
    return {"models": CATALOGUE, **document}


# ---------------------------------------------------------------------------- route, guardrail, fallbacks


def test_route_guardrail_and_fallbacks_are_parsed() -> None:
    tenant = parse_tenant(
        "t1",
        entry(
            route={
                "region": "eu-west-1",
                "role_arn": ROLE,
                "external_id": "hubgate-acme-7f3a",
                "endpoint_url": "https://vpce-0abc.bedrock-runtime.eu-west-1.vpce.amazonaws.com",
            },
            guardrail={"id": "gr1abc", "version": 3, "stream_mode": "sync"},
            fallbacks=[PRO, NOVA],
        ),
    )
    assert tenant.route == Route(
        region="eu-west-1",
        role_arn=ROLE,
        external_id="hubgate-acme-7f3a",
        endpoint_url="https://vpce-0abc.bedrock-runtime.eu-west-1.vpce.amazonaws.com",
    )
    assert tenant.guardrail == Guardrail(id="gr1abc", version="3", stream_mode="sync")
    assert tenant.fallbacks == (PRO, NOVA)


def test_route_guardrail_defaults() -> None:
    tenant = parse_tenant(
        "t1", entry(route={"region": "us-west-2"}, guardrail={"id": "g1", "version": "DRAFT"})
    )
    assert tenant.route == Route(region="us-west-2")
    assert tenant.guardrail == Guardrail(id="g1", version="DRAFT", stream_mode="async")
    assert parse_tenant("t1", entry(route={}, guardrail=None)).route is None
    arn = "arn:aws:bedrock:us-east-1:123456789012:guardrail/abc123"
    assert parse_tenant("t1", entry(guardrail={"id": arn, "version": "1"})).guardrail == Guardrail(arn, "1")


@pytest.mark.parametrize(
    ("route", "field", "words"),
    [
        ("eu-west-1", "route", "'route' must be a mapping"),
        ({"region": "Europe"}, "route.region", "not an AWS region name"),
        ({"region": ""}, "route.region", "non-empty string"),
        ({"role_arn": "arn:aws:iam::1234:role/x"}, "route.role_arn", "IAM role ARN"),
        ({"role_arn": "hubgate-spoke"}, "route.role_arn", "IAM role ARN"),
        ({"external_id": "abc"}, "route.external_id", "needs route.role_arn"),
        ({"role_arn": ROLE, "external_id": "a"}, "route.external_id", "2 to 1224"),
        ({"role_arn": ROLE, "external_id": "has space"}, "route.external_id", "2 to 1224"),
        ({"endpoint_url": "vpce-0abc.example.com"}, "route.endpoint_url", "http(s) URL"),
        ({"endpoint_url": "ftp://host"}, "route.endpoint_url", "http(s) URL"),
        ({"regoin": "eu-west-1"}, "route.regoin", "unknown route field(s) ['regoin']"),
    ],
)
def test_bad_routes_name_the_field(route: Any, field: str, words: str) -> None:
    error = refusal(entry(route=route))
    assert error.field == field
    assert words in str(error) and "tenant 't1'" in str(error)


@pytest.mark.parametrize(
    ("guardrail", "field"),
    [
        ("gr1", "guardrail"),
        ({"version": "1"}, "guardrail.id"),
        ({"id": "Has Caps", "version": "1"}, "guardrail.id"),
        ({"id": "g1"}, "guardrail.version"),
        ({"id": "g1", "version": "v2"}, "guardrail.version"),
        ({"id": "g1", "version": 0}, "guardrail.version"),
        ({"id": "g1", "version": True}, "guardrail.version"),
        ({"id": "g1", "version": "1", "stream_mode": "batch"}, "guardrail.stream_mode"),
        ({"id": "g1", "version": "1", "trace": True}, "guardrail.trace"),
    ],
)
def test_bad_guardrails_name_the_field(guardrail: Any, field: str) -> None:
    assert refusal(entry(guardrail=guardrail)).field == field


@pytest.mark.parametrize(
    ("fallbacks", "words"),
    [
        ("amazon.nova-lite-v1:0", "'fallbacks' must be a list of model ids"),
        ([NOVA, NOVA], "names a model twice"),
        ([MICRO], f"fallback {MICRO!r} is not in its models"),
        ([""], "'fallbacks' must be a list of model ids"),
    ],
)
def test_bad_fallbacks(fallbacks: Any, words: str) -> None:
    error = refusal(entry(fallbacks=fallbacks))
    assert words in str(error) and error.field == "fallbacks"


def test_limit_errors_name_the_field() -> None:
    assert refusal(entry(limits={"requests_per_minute": -1})).field == "limits.requests_per_minute"
    assert refusal(entry(limits={"token_burst": 5})).field == "limits.token_burst"
    assert refusal(entry(limits={"rpm": 5})).field == "limits.rpm"
    assert refusal(entry(limits={"monthly_budget_usd": "10"})).field == "limits.monthly_budget_usd"
    assert refusal(entry(default_model="x")).field == "default_model"
    assert refusal(entry(colour="blue")).field == "colour"


# ---------------------------------------------------------------------------- the catalogue


def test_catalogue_is_parsed() -> None:
    document = parse_document({"models": CATALOGUE, "tenants": {"a": entry()}})
    assert document.models[HAIKU] == ModelInfo(
        id=HAIKU,
        name="Claude 3.5 Haiku",
        provider="anthropic",
        context_window=200000,
        price=Price(0.0008, 0.004),
    )
    assert document.models[NOVA].fallbacks == (MICRO,) and document.models[NOVA].price is None
    assert document.models[MICRO] == ModelInfo(MICRO, MICRO, "amazon", None, None)
    assert document.models[PRO].provider == "amazon"


def test_provider_is_read_through_an_inference_profile_prefix() -> None:
    profile = "us.anthropic.claude-3-5-haiku-20241022-v1:0"
    assert parse_document({"models": {profile: {}}, "tenants": {}}).models[profile].provider == "anthropic"


def test_without_a_catalogue_every_listed_model_is_allowed() -> None:
    document = parse_document({"tenants": {"a": {"models": ["anything-at-all"]}}})
    assert document.models == {}
    catalogue = Catalogue(document.tenants, document.models)
    catalogue.check_model(document.tenants["a"], "anything-at-all")


def test_a_tenant_model_missing_from_the_catalogue_is_an_error() -> None:
    with pytest.raises(TenantConfigError) as info:
        parse_document({"models": {HAIKU: {}}, "tenants": {"blue": {"models": [HAIKU, NOVA]}}})
    assert str(info.value) == f"tenant 'blue': model {NOVA!r} is not in the models catalogue"
    assert info.value.field == "models"


@pytest.mark.parametrize(
    ("models", "words"),
    [
        ([HAIKU], "top-level 'models' must be a mapping"),
        ({HAIKU: "cheap"}, f"model {HAIKU!r} must be a mapping"),
        ({HAIKU: {"price": 1}}, "unknown field(s) ['price']"),
        ({HAIKU: {"input_per_1k": 0.1}}, "give both input_per_1k and output_per_1k"),
        ({HAIKU: {"input_per_1k": -1, "output_per_1k": 1}}, "input_per_1k must be a non-negative number"),
        ({HAIKU: {"context_window": 0}}, "context_window must be a positive integer"),
        ({HAIKU: {"enabled": "no"}}, "'enabled' must be true or false"),
        ({HAIKU: {"fallbacks": [HAIKU]}}, "cannot be its own fallback"),
        ({HAIKU: {"fallbacks": [NOVA]}}, f"fallback {NOVA!r} is not in the models catalogue"),
        ({"": {}}, "model id '' must be a printable string"),
    ],
)
def test_bad_catalogues(models: Any, words: str) -> None:
    with pytest.raises(TenantConfigError) as info:
        parse_document({"models": models, "tenants": {}})
    assert words in str(info.value)


def test_unknown_top_level_keys_are_refused() -> None:
    with pytest.raises(TenantConfigError, match=r"unknown top-level key\(s\) \['model'\]"):
        parse_document({"model": {}, "tenants": {}})


def test_the_demo_file_still_loads_and_a_catalogue_can_be_added() -> None:
    assert [t.id for t in read_file(None).tenants.values()] == ["acme", "globex", "initech"]
    document = parse_document(demo_with_catalogue())
    assert set(document.models) == {HAIKU, NOVA, PRO, MICRO}


def test_entries_round_trip() -> None:
    raw = entry(
        name="Blue",
        enabled=False,
        default_model=NOVA,
        default_max_tokens=300,
        limits={"requests_per_minute": 10, "request_burst": 2, "monthly_budget_usd": 12.5},
        route={"region": "eu-west-1", "role_arn": ROLE, "external_id": "ext-id-1"},
        guardrail={"id": "g1", "version": "2", "stream_mode": "sync"},
        fallbacks=[PRO],
    )
    tenant = parse_tenant("blue", raw)
    assert parse_tenant("blue", tenant_entry(tenant)) == tenant
    document = parse_document(demo_with_catalogue())
    again = parse_document(document_of(list(document.tenants.values()), list(document.models.values())))
    assert again == document


# ---------------------------------------------------------------------------- check_model, fallbacks_for


def tenant(**fields: Any) -> Tenant:
    base: dict[str, Any] = {
        "id": "t",
        "name": "t",
        "enabled": True,
        "models": (HAIKU, NOVA, PRO),
        "default_model": HAIKU,
    }
    return Tenant(**{**base, **fields})


def model(model_id: str, *, enabled: bool = True, fallbacks: tuple[str, ...] = ()) -> ModelInfo:
    return ModelInfo(model_id, model_id, "x", None, None, enabled=enabled, fallbacks=fallbacks)


def test_check_model() -> None:
    catalogue = Catalogue.of([], [model(HAIKU), model(NOVA, enabled=False), model(MICRO, enabled=False)])
    who = tenant()
    catalogue.check_model(who, HAIKU)
    catalogue.check_model(who, PRO)  # absent from the catalogue, listed by the tenant
    with pytest.raises(ModelNotAllowed, match="is retired"):
        catalogue.check_model(who, NOVA)
    with pytest.raises(ModelNotAllowed, match="not available to this tenant"):
        catalogue.check_model(who, MICRO)  # retired, but the tenant never had it: nothing to learn
    with pytest.raises(ModelNotAllowed, match="not available to this tenant"):
        catalogue.check_model(who, "amazon.titan-text-express-v1")


def test_fallbacks_for_keeps_the_tenant_order_and_drops_what_cannot_serve() -> None:
    catalogue = Catalogue.of([], [model(HAIKU, fallbacks=(NOVA,)), model(PRO, enabled=False), model(NOVA)])
    who = tenant(models=(HAIKU, NOVA, PRO, MICRO), fallbacks=(MICRO, PRO, HAIKU, NOVA))
    # PRO is retired; the requested model is never its own fallback; MICRO is not catalogued but listed.
    assert catalogue.fallbacks_for(who, HAIKU) == (MICRO, NOVA)
    assert catalogue.fallbacks_for(who, NOVA) == (MICRO, HAIKU)


def test_fallbacks_for_uses_the_catalogue_when_the_tenant_has_none() -> None:
    catalogue = Catalogue.of(
        [],
        [
            model(PRO, fallbacks=(MICRO, NOVA, HAIKU)),
            model(NOVA, fallbacks=(MICRO,)),
            model(HAIKU, enabled=False),
        ],
    )
    who = tenant()  # MICRO is not the tenant's; HAIKU is retired
    assert catalogue.fallbacks_for(who, PRO) == (NOVA,)
    assert catalogue.fallbacks_for(who, NOVA) == ()
    assert catalogue.fallbacks_for(who, "unknown") == ()
    # The tenant's own list wins over the catalogue's, even when it leaves nothing usable.
    assert catalogue.fallbacks_for(tenant(fallbacks=(HAIKU,)), PRO) == ()


# ---------------------------------------------------------------------------- file backend


async def test_the_file_registry_is_read_only(tmp_path: Path) -> None:
    path = tmp_path / "tenants.yaml"
    path.write_text(yaml.safe_dump(demo_with_catalogue()), "utf-8")
    registry = FileRegistry.from_file(str(path))
    await registry.start()
    assert not registry.writable
    assert registry.model(NOVA) is not None and len(registry.models()) == 4
    with pytest.raises(ReadOnlyRegistry, match="HUBGATE_TENANTS_TABLE"):
        await registry.put_tenant(tenant(), actor="root")
    with pytest.raises(ReadOnlyRegistry):
        await registry.put_model(model(HAIKU), actor="root")
    path.write_text("tenants:\n  solo:\n    models: [m]\n", "utf-8")
    await registry.refresh()
    assert [t.id for t in registry.all()] == ["solo"] and registry.models() == []
    await registry.aclose()


def test_build_registry_picks_the_backend() -> None:
    legacy = TenantRegistry({"a": tenant(id="a")}, {HAIKU: model(HAIKU)})
    built = build_registry(Settings(), legacy)
    assert isinstance(built, FileRegistry) and built.get("a") is not None and built.model(HAIKU) is not None
    assert isinstance(build_registry(Settings()), FileRegistry)
    assert isinstance(build_registry(Settings(tenants_table="t")), DynamoDBRegistry)
    mine = FileRegistry.from_tenants([tenant()])
    assert build_registry(Settings(), mine) is mine


def test_bad_items_are_skipped_and_their_last_good_version_kept() -> None:
    good = tenant_item(tenant(id="a"), actor="x", now=0)
    broken_json = {**tenant_item(tenant(id="b"), actor="x", now=0), "doc": {"S": "{not json"}}
    broken_entry = {**tenant_item(tenant(id="c"), actor="x", now=0), "doc": {"S": '{"models": []}'}}
    other = {"pk": {"S": "SETTINGS#x"}, "doc": {"S": "{}"}}
    previous = Catalogue.of([tenant(id="c", name="old c")])
    loaded = catalogue_from_items([good, broken_json, broken_entry, other], previous)
    assert set(loaded.catalogue.tenants) == {"a", "c"}
    assert loaded.catalogue.tenants["c"].name == "old c"
    assert set(loaded.bad) == {"TENANT#b", "TENANT#c"}
    assert "at least one model" in loaded.bad["TENANT#c"]


# ---------------------------------------------------------------------------- DynamoDB (moto)


@pytest.fixture
def aws_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in MOTO_ENV.items():
        monkeypatch.setenv(name, value)


def table_name() -> str:
    return f"hubgate-tenants-{uuid.uuid4().hex[:10]}"


@contextlib.asynccontextmanager
async def table_at(endpoint: str, name: str) -> AsyncIterator[TenantTable]:
    import aioboto3

    async with dynamodb_client(aioboto3.Session(), region="us-east-1", endpoint_url=endpoint, timeout=5) as c:
        yield TenantTable(c, name)


async def loaded_table(endpoint: str, document: dict[str, Any] | None = None) -> str:
    """A new table holding `document` (the demo tenants and a catalogue by default)."""
    name = table_name()
    async with table_at(endpoint, name) as table:
        assert await table.create()
        await import_document(table, parse_document(document or demo_with_catalogue()))
    return name


def test_the_tool_imports_and_exports(
    moto_server: MotoServer,
    aws_env: None,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("HUBGATE_DYNAMODB_ENDPOINT_URL", moto_server.url)
    name = table_name()
    monkeypatch.setenv("HUBGATE_TENANTS_TABLE", name)
    source = tmp_path / "tenants.yaml"
    source.write_text(yaml.safe_dump(demo_with_catalogue()), "utf-8")

    assert main(["tenants", "create-table"]) == 0
    assert main(["tenants", "create-table"]) == 0  # already there: fine
    assert main(["tenants", "import", str(source)]) == 0
    assert "imported 3 tenant(s) and 4 model(s)" in capsys.readouterr().err

    assert main(["tenants", "export"]) == 0
    exported = capsys.readouterr().out
    assert exported.startswith(f"# Exported from the DynamoDB table {name}")
    assert parse_document(yaml.safe_load(exported)) == parse_document(demo_with_catalogue())

    target = tmp_path / "out.yaml"
    assert main(["tenants", "export", str(target)]) == 0
    assert parse_document(yaml.safe_load(target.read_text("utf-8"))) == read_file(str(source))


def test_the_tool_validates_before_writing(
    moto_server: MotoServer,
    aws_env: None,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("HUBGATE_DYNAMODB_ENDPOINT_URL", moto_server.url)
    name = table_name()
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        yaml.safe_dump(
            {"models": {HAIKU: {}}, "tenants": {"a": {"models": [HAIKU]}, "b": {"models": [NOVA]}}}
        ),
        "utf-8",
    )
    assert main(["tenants", "create-table", "--table", name]) == 0
    assert main(["tenants", "import", str(bad), "--table", name]) == 1
    assert f"tenant 'b': model {NOVA!r} is not in the models catalogue" in capsys.readouterr().err
    assert main(["tenants", "export", "--table", name]) == 0
    assert yaml.safe_load(capsys.readouterr().out) == {"tenants": {}}  # nothing was written

    monkeypatch.delenv("HUBGATE_TENANTS_TABLE", raising=False)
    assert main(["tenants", "export"]) == 2
    assert main(["tenants", "import", "--table", name]) == 2
    assert main(["tenants", "export", "--table", "no-such-table"]) == 1
    assert "ResourceNotFoundException" in capsys.readouterr().err


async def test_first_load_failure_stops_start(moto_server: MotoServer, aws_env: None) -> None:
    registry = DynamoDBRegistry("no-such-table", region="us-east-1", endpoint_url=moto_server.url)
    with pytest.raises(RegistryUnavailable) as info:
        await registry.start()
    message = str(info.value)
    assert "'no-such-table'" in message and "ResourceNotFoundException" in message
    assert "does not start without its tenants" in message


async def test_writes_are_served_at_once_here_and_after_a_refresh_elsewhere(
    moto_server: MotoServer, aws_env: None
) -> None:
    name = await loaded_table(moto_server.url)
    here = DynamoDBRegistry(name, region="us-east-1", endpoint_url=moto_server.url, refresh_seconds=3600)
    there = DynamoDBRegistry(name, region="us-east-1", endpoint_url=moto_server.url, refresh_seconds=3600)
    await here.start()
    await there.start()
    try:
        assert here.writable and {t.id for t in here.all()} == {"acme", "globex", "initech"}
        assert here.model(PRO) is not None and here.model(PRO).fallbacks == (NOVA, HAIKU)  # type: ignore[union-attr]
        acme = here.get("acme")
        assert acme is not None and acme.limits == LimitPolicy(
            requests_per_minute=120, tokens_per_minute=200000, max_connections=50, max_concurrent_streams=20
        )

        blue = tenant(id="blue", route=Route(region="eu-west-1"), fallbacks=(NOVA,))
        await here.put_tenant(blue, actor="alice")
        await here.put_model(model(NOVA, enabled=False), actor="alice")
        assert here.get("blue") == blue
        with pytest.raises(ModelNotAllowed, match="retired"):
            here.check_model(blue, NOVA)
        assert there.get("blue") is None  # until its next refresh
        await there.refresh()
        assert there.get("blue") == blue and there.model(NOVA).enabled is False  # type: ignore[union-attr]

        with pytest.raises(TenantConfigError, match="not in the models catalogue"):
            await here.put_tenant(
                tenant(id="red", models=("unknown-model",), default_model="unknown-model"), actor="a"
            )

        async with table_at(moto_server.url, name) as table:
            items = {i["pk"]["S"]: i for i in await table.scan()}
        assert items["TENANT#blue"]["updated_by"]["S"] == "alice"
        assert items["MODEL#amazon.nova-lite-v1:0"]["updated_by"]["S"] == "alice"
        assert items["TENANT#acme"]["updated_by"]["S"] == "hubgate tenants import"
        assert "TENANT#red" not in items
    finally:
        await here.aclose()
        await there.aclose()


async def test_an_outage_serves_the_last_good_copy_and_recovers(
    moto_server: MotoServer,
    emulator: EmulatorServer,
    aws_env: None,
    mint: Mint,
    caplog: pytest.LogCaptureFixture,
) -> None:
    name = await loaded_table(moto_server.url)
    proxy = TcpProxy(moto_server.port)  # the gateway's only way to DynamoDB; stopping it is an outage
    await proxy.start()
    settings = gateway_settings(
        emulator.url,
        tenants_table=name,
        dynamodb_endpoint_url=f"http://127.0.0.1:{proxy.port}",
        registry_refresh_seconds=0.2,
    )
    caplog.set_level(logging.INFO, logger="hubgate.registry")
    try:
        async with running_gateway(settings) as server:
            registry = server.hub_app.state.services.tenants
            assert isinstance(registry, DynamoDBRegistry)
            await proxy.stop()
            async with asyncio.timeout(30):
                while registry.stats.refresh_failures < 3:
                    await asyncio.sleep(0.05)
            client = await Client.open(ws_url(settings), mint("acme", "outage"))
            frames = await client.chat("r1", "[[emulator:tokens=3]]")
            await client.close()
            assert frames[-1]["type"] == "end" and len(text_of(frames).split()) == 3
            failed = [
                r for r in caplog.records if r.getMessage().startswith("tenant registry refresh failed")
            ]
            assert len(failed) == 1  # once per failure streak, not once per attempt

            before = registry.stats.last_success
            await proxy.start()
            async with asyncio.timeout(30):
                while registry.stats.consecutive_failures or registry.stats.last_success == before:
                    await asyncio.sleep(0.05)
            assert registry.stats.refresh_failures >= 3
            assert any(r.getMessage() == "tenant registry refresh recovered" for r in caplog.records)
    finally:
        await proxy.stop()


async def test_a_gateway_serves_tenants_from_the_table(
    moto_server: MotoServer, emulator: EmulatorServer, aws_env: None, mint: Mint
) -> None:
    document = demo_with_catalogue()
    document["tenants"]["tabled"] = {"models": [NOVA], "name": "Only in the table"}
    name = await loaded_table(moto_server.url, document)
    settings = gateway_settings(emulator.url, tenants_table=name, dynamodb_endpoint_url=moto_server.url)
    async with running_gateway(settings):
        client = await Client.open(ws_url(settings), mint("tabled", "u1"))
        assert client.ready["tenant"] == "tabled"
        frames = await client.chat("t1", "[[emulator:tokens=4]]")
        await client.close()
    assert frames[0]["type"] == "start" and frames[0]["model"] == NOVA
    assert frames[-1]["type"] == "end"
