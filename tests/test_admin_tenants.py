"""The tenant admin API: authorisation, validation with field names, the read-only file backend,
writes served at once (DynamoDB through moto), and a model retired while a stream is running."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import pytest
from websockets.exceptions import InvalidStatus

from hubgate.settings import Settings
from tests.conftest import ws_url
from tests.support.client import Client, text_of
from tests.support.emulator_server import EmulatorServer
from tests.support.gateway_server import gateway_settings, running_gateway
from tests.support.moto_server import MOTO_ENV, MotoServer
from tests.test_registry import HAIKU, NOVA, PRO, ROLE, loaded_table, table_at

Mint = Callable[..., str]


@pytest.fixture
def aws_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in MOTO_ENV.items():
        monkeypatch.setenv(name, value)


@pytest.fixture
async def table_gateway(
    moto_server: MotoServer, emulator: EmulatorServer, aws_env: None
) -> AsyncIterator[tuple[Settings, str]]:
    """A gateway serving a fresh table (demo tenants + catalogue); yields its settings and table name."""
    name = await loaded_table(moto_server.url)
    settings = gateway_settings(
        emulator.url, tenants_table=name, dynamodb_endpoint_url=moto_server.url, registry_refresh_seconds=3600
    )
    async with running_gateway(settings):
        yield settings, name


def base(settings: Settings) -> str:
    return f"http://127.0.0.1:{settings.port}/admin"


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def admin_headers(mint: Mint) -> dict[str, str]:
    return bearer(mint("acme", "root", groups=["hubgate-admin"]))


async def test_only_admins_get_in(table_gateway: tuple[Settings, str], mint: Mint) -> None:
    settings, _ = table_gateway
    async with httpx.AsyncClient(base_url=base(settings)) as http:
        for method, path in [
            ("GET", "/tenants"),
            ("GET", "/tenants/acme"),
            ("PUT", "/tenants/acme"),
            ("POST", "/tenants/acme/disable"),
            ("GET", "/models"),
            ("PUT", f"/models/{NOVA}"),
            ("POST", f"/models/{NOVA}/disable"),
        ]:
            anonymous = await http.request(method, path, json={})
            assert anonymous.status_code == 401, (method, path)
            assert anonymous.headers["www-authenticate"] == "Bearer"
            member = await http.request(method, path, json={}, headers=bearer(mint("acme", "alice")))
            assert member.status_code == 403, (method, path)
            assert member.json()["error"]["code"] == "forbidden"


async def test_tenants_are_listed_created_replaced_and_disabled(
    table_gateway: tuple[Settings, str], moto_server: MotoServer, mint: Mint, caplog: pytest.LogCaptureFixture
) -> None:
    settings, table = table_gateway
    caplog.set_level(logging.INFO, logger="hubgate.admin")
    admin = admin_headers(mint)
    async with httpx.AsyncClient(base_url=base(settings), headers=admin) as http:
        listing = (await http.get("/tenants")).json()
        assert listing["writable"] is True
        assert [t["id"] for t in listing["tenants"]] == ["acme", "globex", "initech"]
        globex = (await http.get("/tenants/globex")).json()
        assert globex["models"] == [NOVA] and globex["limits"]["requests_per_minute"] == 10
        assert (await http.get("/tenants/nobody")).status_code == 404
        again = await http.put("/tenants/globex", json=globex)  # a GET body, id included, goes back as is
        assert again.status_code == 200 and again.json() == globex

        body = {
            "name": "Blue Co",
            "models": [NOVA, PRO],
            "limits": {"requests_per_minute": 30},
            "route": {"region": "us-east-1"},
            "guardrail": {"id": "gr1", "version": "1"},
            "fallbacks": [NOVA],
        }
        created = await http.put("/tenants/blue", json=body)
        assert created.status_code == 201, created.text
        assert created.json()["route"] == {"region": "us-east-1"}
        assert created.json()["guardrail"] == {"id": "gr1", "version": "1", "stream_mode": "async"}

        # Served at once by this instance: a token for the new tenant connects and chats.
        client = await Client.open(ws_url(settings), mint("blue", "u1"))
        assert client.ready["models"] == [NOVA, PRO]
        frames = await client.chat("b1", "[[emulator:tokens=2]]")
        assert frames[-1]["type"] == "end" and frames[0]["model"] == NOVA
        await client.close()

        replaced = await http.put("/tenants/blue", json={**body, "name": "Blue Company"})
        assert replaced.status_code == 200 and replaced.json()["name"] == "Blue Company"

        disabled = await http.post("/tenants/blue/disable")
        assert disabled.status_code == 200 and disabled.json()["enabled"] is False
        with pytest.raises(InvalidStatus) as refused:
            await Client.open(ws_url(settings), mint("blue", "u1"))
        assert refused.value.response.status_code == 403
        assert (await http.post("/tenants/nobody/disable")).status_code == 404

    async with table_at(moto_server.url, table) as dynamo:
        items = {i["pk"]["S"]: i for i in await dynamo.scan()}
    assert items["TENANT#blue"]["updated_by"]["S"] == "root"
    audit = [(r.admin, r.tenant, r.action) for r in caplog.records if r.name == "hubgate.admin"]  # type: ignore[attr-defined]
    assert audit == [
        ("root", "globex", "replace"),
        ("root", "blue", "create"),
        ("root", "blue", "replace"),
        ("root", "blue", "disable"),
    ]


INVALID_TENANTS: list[tuple[Any, str | None, str]] = [
    ({"models": [NOVA], "limits": {"requests_per_minute": -5}}, "limits.requests_per_minute", "non-negative"),
    ({"models": [NOVA], "limits": {"request_burst": 5}}, "limits.request_burst", "needs"),
    ({"models": [NOVA, "amazon.titan-text-express-v1"]}, "models", "not in the models catalogue"),
    ({"models": [NOVA], "route": {"role_arn": "spoke"}}, "route.role_arn", "IAM role ARN"),
    ({"models": [NOVA], "route": {"region": "mars-1"}}, "route.region", "AWS region"),
    ({"models": [NOVA], "guardrail": {"id": "g1"}}, "guardrail.version", "DRAFT"),
    ({"models": [NOVA], "fallbacks": [PRO]}, "fallbacks", "not in its models"),
    ({"models": [NOVA], "colour": "blue"}, "colour", "unknown field"),
    ({"models": []}, "models", "at least one model"),
    (["not", "a", "mapping"], None, "must be a mapping"),
    ({"id": "blue", "models": [NOVA]}, "id", "differs from the id in the path"),
]


async def test_invalid_tenants_are_400_naming_the_field(
    table_gateway: tuple[Settings, str], mint: Mint
) -> None:
    settings, _ = table_gateway
    async with httpx.AsyncClient(base_url=base(settings), headers=admin_headers(mint)) as http:
        for body, field, words in INVALID_TENANTS:
            response = await http.put("/tenants/green", json=body)
            assert response.status_code == 400, body
            error = response.json()["error"]
            assert error["code"] == "invalid_tenant" and error["field"] == field, (body, error)
            assert words in error["message"], (body, error)
        assert (await http.get("/tenants/green")).status_code == 404  # nothing was written


async def test_a_body_that_is_not_json_is_400(table_gateway: tuple[Settings, str], mint: Mint) -> None:
    settings, _ = table_gateway
    async with httpx.AsyncClient(base_url=base(settings), headers=admin_headers(mint)) as http:
        response = await http.put("/tenants/green", content=b"{models: [x]")
        too_big = await http.put("/tenants/green", content=b" " * (64 * 1024 + 1))
    assert response.status_code == 400
    assert response.json()["error"] == {
        "code": "invalid_tenant",
        "message": "the body must be a JSON object",
        "field": None,
    }
    assert too_big.status_code == 400


async def test_models_are_managed(table_gateway: tuple[Settings, str], mint: Mint) -> None:
    settings, _ = table_gateway
    async with httpx.AsyncClient(base_url=base(settings), headers=admin_headers(mint)) as http:
        listing = (await http.get("/models")).json()
        assert [m["id"] for m in listing["models"]] == sorted([HAIKU, NOVA, PRO, "amazon.nova-micro-v1:0"])
        haiku = (await http.get(f"/models/{HAIKU}")).json()
        assert haiku["input_per_1k"] == 0.0008 and haiku["provider"] == "anthropic"

        profile = "us.anthropic.claude-3-5-haiku-20241022-v1:0"
        created = await http.put(f"/models/{profile}", json={"context_window": 200000, "fallbacks": [HAIKU]})
        assert created.status_code == 201 and created.json()["provider"] == "anthropic"
        arn = "arn:aws:bedrock:us-east-1:123456789012:inference-profile/us.amazon.nova-pro-v1:0"
        assert (await http.put(f"/models/{arn}", json={})).status_code == 201
        assert (await http.get(f"/models/{arn}")).json()["id"] == arn
        disabled = await http.post(f"/models/{arn}/disable")
        assert disabled.status_code == 200 and disabled.json()["enabled"] is False

        bad = await http.put(f"/models/{profile}", json={"input_per_1k": 0.1})
        assert bad.status_code == 400
        assert (
            bad.json()["error"]["code"] == "invalid_model" and bad.json()["error"]["field"] == "output_per_1k"
        )
        unknown_fallback = await http.put(f"/models/{profile}", json={"fallbacks": ["nowhere"]})
        assert unknown_fallback.json()["error"]["field"] == "fallbacks"
        assert (await http.post("/models/nowhere/disable")).status_code == 404

        # A tenant that lists the new model is now valid.
        ok = await http.put(
            "/tenants/profiled", json={"models": [profile, HAIKU], "route": {"role_arn": ROLE}}
        )
        assert ok.status_code == 201, ok.text


async def test_a_retired_model_is_refused_next_while_a_running_stream_finishes(
    table_gateway: tuple[Settings, str], mint: Mint
) -> None:
    settings, _ = table_gateway
    client = await Client.open(ws_url(settings), mint("acme", "carol"))
    await client.send(
        {
            "type": "chat",
            "id": "long",
            "model": NOVA,
            "messages": [
                {"role": "user", "content": "[[emulator:tokens=15]] [[emulator:token_delay_ms=60]]"}
            ],
        }
    )
    await client.until_frame("long", "delta")

    async with httpx.AsyncClient(base_url=base(settings), headers=admin_headers(mint)) as http:
        assert (await http.post(f"/models/{NOVA}/disable")).status_code == 200

    refused = await client.chat("next", "hello", model=NOVA)
    assert refused[-1]["type"] == "error" and refused[-1]["code"] == "model_not_allowed"
    assert "retired" in refused[-1]["message"]
    other = await client.chat("other", "[[emulator:tokens=2]]", model=PRO)
    assert other[-1]["type"] == "end"

    finished = await client.until_terminal("long")
    assert finished[-1]["type"] == "end" and len(text_of(finished).split()) == 15
    await client.close()


async def test_the_file_backend_is_read_only(emulator: EmulatorServer, mint: Mint) -> None:
    settings = gateway_settings(emulator.url)
    read_only = {
        "code": "read_only",
        "message": (
            "the tenants file is read-only; use HUBGATE_TENANTS_TABLE to manage tenants through the API"
        ),
    }
    async with (
        running_gateway(settings),
        httpx.AsyncClient(base_url=base(settings), headers=admin_headers(mint)) as http,
    ):
        listing = (await http.get("/tenants")).json()
        assert listing["writable"] is False and len(listing["tenants"]) == 3
        assert (await http.get("/models")).json() == {"writable": False, "models": []}
        for method, path in [
            ("PUT", "/tenants/acme"),
            ("PUT", "/tenants/new"),
            ("POST", "/tenants/acme/disable"),
            ("PUT", f"/models/{NOVA}"),
            ("POST", f"/models/{NOVA}/disable"),
        ]:
            response = await http.request(method, path, json={"models": [NOVA]})
            assert response.status_code == 409, (method, path)
            assert response.json() == {"error": read_only}
        assert (await http.get("/tenants/acme")).json()["enabled"] is True


async def test_disabling_always_works_once_a_catalogue_exists(
    moto_server: MotoServer, emulator: EmulatorServer, aws_env: None, mint: Mint
) -> None:
    # Tenants written before the first catalogue entry may list models the catalogue lacks.
    name = await loaded_table(
        moto_server.url, {"tenants": {"acme": {"models": [HAIKU, NOVA]}, "beta": {"models": [PRO]}}}
    )
    settings = gateway_settings(
        emulator.url, tenants_table=name, dynamodb_endpoint_url=moto_server.url, registry_refresh_seconds=3600
    )
    async with (
        running_gateway(settings),
        httpx.AsyncClient(base_url=base(settings), headers=admin_headers(mint)) as http,
    ):
        assert (await http.put(f"/models/{HAIKU}", json={})).status_code == 201  # the first entry
        disabled = await http.post("/tenants/beta/disable")
        assert disabled.status_code == 200 and disabled.json()["enabled"] is False
        # Writing it enabled again is an invalid tenant (400 naming the field), never a server error.
        again = await http.put("/tenants/beta", json={"models": [PRO]})
        assert again.status_code == 400
        error = again.json()["error"]
        assert error["code"] == "invalid_tenant" and error["field"] == "models"
        assert (await http.get("/tenants/beta")).json()["enabled"] is False
