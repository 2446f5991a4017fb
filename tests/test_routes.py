"""Per-tenant routes: assumed-role credentials from STS (moto), refresh before expiry, one client
per route, STS failures, endpoint overrides — through the real gateway and the Bedrock emulator.

STS calls go through ``StsProxy`` (tests/support), a pass-through to moto that records each AssumeRole, can
delay it, and can refuse a role with STS's own ``AccessDenied`` answer (moto assumes any role).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from hubgate.errors import UpstreamError
from hubgate.providers.base import Completion, ProviderRequest, Route, Turn
from hubgate.providers.routes import (
    RouteClients,
    Target,
    assume_role_arguments,
    role_session_name,
    route_target,
    tenant_tag_value,
)
from hubgate.settings import Settings
from hubgate.tokens import mint_dev_token
from tests.conftest import ws_url
from tests.support.client import Client, text_of
from tests.support.emulator_server import EmulatorServer
from tests.support.gateway_server import TEST_SECRET, ensure_aws_env, gateway_settings, running_gateway
from tests.support.moto_server import MotoServer
from tests.support.sts_proxy import StsProxy

MODEL = "amazon.nova-lite-v1:0"
SLOW_REPLY = "[[emulator:tokens=60]] [[emulator:token_delay_ms=100]]"  # six seconds
ACCOUNT = "111122223333"


# ---------------------------------------------------------------------------- fixtures and helpers


def role(name: str) -> str:
    """A role ARN unique to this run, so tests sharing the moto server never see each other's calls."""
    return f"arn:aws:iam::{ACCOUNT}:role/{name}-{uuid.uuid4().hex[:10]}"


async def moto_assumed(moto: MotoServer, role_arn: str) -> list[dict[str, Any]]:
    """The AssumeRole answers moto gave for ``role_arn``, oldest first."""
    async with httpx.AsyncClient() as http:
        data = (await http.get(f"{moto.url}/moto-api/data.json")).json()
    return [r for r in data.get("sts", {}).get("AssumedRole", []) if r["role_arn"] == role_arn]


def tenants_file(tmp_path: Path, tenants: dict[str, dict[str, Any]]) -> str:
    document = {
        "tenants": {
            tenant: {"models": [MODEL], "default_model": MODEL, **({"route": route} if route else {})}
            for tenant, route in tenants.items()
        }
    }
    path = tmp_path / "tenants.yaml"
    path.write_text(yaml.safe_dump(document))
    return str(path)


def token(tenant: str) -> str:
    return mint_dev_token(TEST_SECRET, tenant=tenant, user="alice", lifetime_seconds=600)


def hub_key() -> str:
    ensure_aws_env()
    return os.environ["AWS_ACCESS_KEY_ID"]


@contextlib.asynccontextmanager
async def route_clients(
    emulator: EmulatorServer, sts: StsProxy, **options: Any
) -> AsyncIterator[RouteClients]:
    ensure_aws_env()
    routes = RouteClients(
        region="us-east-1",
        bedrock_endpoint_url=emulator.url,
        sts_endpoint_url=sts.url,
        connect_timeout=5.0,
        read_timeout=10.0,
        max_attempts=1,
        **options,
    )
    await routes.start()
    try:
        yield routes
    finally:
        await routes.aclose()


async def reply(routes: RouteClients, tenant: str, route: Route | None, text: str) -> tuple[str, float]:
    """Stream one request through the tenant's provider; (text, seconds it took)."""
    started = time.monotonic()
    provider = await routes.provider_for(tenant, route)
    request = ProviderRequest(model=MODEL, messages=(Turn("user", text),), max_tokens=200)
    parts: list[str] = []
    completion: Completion | None = None
    async for item in provider.stream(request):
        if isinstance(item, Completion):
            completion = item
        else:
            parts.append(item)
    assert completion is not None
    return "".join(parts), time.monotonic() - started


async def key_used(emulator: EmulatorServer, marker: str) -> dict[str, Any]:
    [record] = await emulator.requests_with(marker)
    return record


async def key_after_refresh(
    routes: RouteClients, emulator: EmulatorServer, tenant: str, route: Route, marker: str, old_key: str
) -> dict[str, Any]:
    """Send requests until one is signed with a key other than ``old_key``; its emulator record."""
    deadline = time.monotonic() + 10
    for attempt in range(1000):
        await reply(routes, tenant, route, f"{marker}-r{attempt} hi")
        record = await key_used(emulator, f"{marker}-r{attempt} ")
        if record["access_key_id"] != old_key:
            return record
        assert time.monotonic() < deadline, "requests never used refreshed credentials"
        await asyncio.sleep(0.2)
    raise AssertionError("unreachable")


async def until(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"never happened within {timeout}s: {what}")
        await asyncio.sleep(0.02)


# ---------------------------------------------------------------------------- pure helpers


def test_session_name_is_the_tenant_id_within_sts_rules() -> None:
    assert role_session_name("acme") == "hubgate-acme"
    assert role_session_name("a.b@c,d=e+f_g-h") == "hubgate-a.b@c,d=e+f_g-h"
    odd = role_session_name("acme corp/eu")
    assert odd.startswith("hubgate-acme-corp-eu-") and len(odd) == len("hubgate-acme-corp-eu-") + 8
    # Sanitising must not merge two tenants into one session name.
    assert role_session_name("acme corp") != role_session_name("acme/corp")
    assert role_session_name("acme corp") != role_session_name("acme-corp")
    long = role_session_name("t" * 128)
    assert len(long) == 64 and long != role_session_name("t" * 127)
    for tenant in ("acme", "ünïcode", "x" * 200, "a b", "é" * 64, "#"):
        name = role_session_name(tenant)
        assert 2 <= len(name) <= 64
        assert all(ch.isascii() and (ch.isalnum() or ch in "_+=,.@-") for ch in name), name


def test_tenant_tag_value_keeps_what_sts_allows() -> None:
    assert tenant_tag_value("acme") == "acme"
    assert tenant_tag_value("Ünïcode 42 a_b.c:d/e=f+g-h@i") == "Ünïcode 42 a_b.c:d/e=f+g-h@i"
    assert tenant_tag_value("a!b#c") == "a_b_c"
    assert len(tenant_tag_value("x" * 300)) == 256


def test_assume_role_arguments() -> None:
    arn = f"arn:aws:iam::{ACCOUNT}:role/spoke"
    assert assume_role_arguments("acme", arn, "ext-id-123", 3600) == {
        "RoleArn": arn,
        "RoleSessionName": "hubgate-acme",
        "DurationSeconds": 3600,
        "Tags": [{"Key": "tenant_id", "Value": "acme"}],
        "ExternalId": "ext-id-123",
    }
    assert "ExternalId" not in assume_role_arguments("acme", arn, None, 900)


def test_route_target() -> None:
    hub = {"hub_region": "us-east-1", "hub_endpoint_url": None}
    arn = f"arn:aws:iam::{ACCOUNT}:role/spoke"
    assert route_target("acme", None, **hub) is None
    # A route that only repeats the hub's settings is the hub's client.
    assert route_target("acme", Route(region="us-east-1"), **hub) is None
    # Region or endpoint alone: hub credentials, one client shared by every tenant going there.
    eu = route_target("acme", Route(region="eu-west-1"), **hub)
    assert eu == Target(region="eu-west-1", endpoint_url=None)
    assert route_target("globex", Route(region="eu-west-1"), **hub) == eu
    vpce = route_target("acme", Route(endpoint_url="https://vpce.example"), **hub)
    assert vpce == Target(region="us-east-1", endpoint_url="https://vpce.example")
    # A role is assumed per tenant: the session name and tag carry the tenant.
    spoke = Route(role_arn=arn, external_id="x" * 16)
    assert route_target("acme", spoke, **hub) == Target("us-east-1", None, arn, "x" * 16, "acme")
    assert route_target("acme", spoke, **hub) != route_target("globex", spoke, **hub)
    routed = route_target(
        "acme", Route(region="eu-west-1", role_arn=arn), hub_region="us-east-1", hub_endpoint_url="http://e"
    )
    assert routed == Target("eu-west-1", "http://e", arn, None, "acme")


def test_refresh_windows_must_be_ordered() -> None:
    common: dict[str, Any] = {
        "region": "us-east-1",
        "bedrock_endpoint_url": None,
        "sts_endpoint_url": None,
        "connect_timeout": 1.0,
        "read_timeout": 1.0,
        "max_attempts": 1,
    }
    with pytest.raises(ValueError):
        RouteClients(**common, role_duration_seconds=900)  # the 15-minute advisory window >= 900 s
    with pytest.raises(ValueError):
        RouteClients(**common, advisory_refresh_seconds=60, mandatory_refresh_seconds=120)
    RouteClients(
        **common, role_duration_seconds=900, advisory_refresh_seconds=300, mandatory_refresh_seconds=120
    )


# ---------------------------------------------------------------------------- through the gateway


async def test_assumed_role_credentials_sign_the_spoke_tenants_requests(
    emulator: EmulatorServer, moto_server: MotoServer, sts: StsProxy, tmp_path: Path
) -> None:
    spoke_role = role("hubgate-spoke")
    external_id = f"ext-{uuid.uuid4().hex}"
    path = tenants_file(
        tmp_path,
        {
            "hubonly": {},
            "spoke": {"role_arn": spoke_role, "external_id": external_id},
            "samehub": {"region": "us-east-1"},  # repeats the hub's region: the hub's client
        },
    )
    settings = gateway_settings(
        emulator.url, tenants_file=path, sts_endpoint_url=sts.url, max_streams_per_connection=32
    )
    marker = uuid.uuid4().hex
    async with running_gateway(settings):
        spoke = await Client.open(ws_url(settings), token("spoke"))
        # Many first requests at once, while STS is slow: one AssumeRole, one client.
        sts.delay = 0.3
        for i in range(12):
            await spoke.send(
                {
                    "type": "chat",
                    "id": f"s{i}",
                    "messages": [{"role": "user", "content": f"{marker}-spoke-{i} hi"}],
                }
            )
        replies = [await spoke.until_terminal(f"s{i}") for i in range(12)]
        hub = await Client.open(ws_url(settings), token("hubonly"))
        hub_frames = await hub.chat("h", f"{marker}-hub hello")
        same = await Client.open(ws_url(settings), token("samehub"))
        same_frames = await same.chat("h", f"{marker}-same hello")
        for client in (spoke, hub, same):
            await client.close()

    assert all(frames[-1]["type"] == "end" and text_of(frames) for frames in replies)
    assert hub_frames[-1]["type"] == "end" and same_frames[-1]["type"] == "end"

    [call] = sts.calls_for(spoke_role)
    assert call["RoleSessionName"] == "hubgate-spoke"
    assert call["ExternalId"] == external_id
    assert call["DurationSeconds"] == "3600"
    assert (call["Tags.member.1.Key"], call["Tags.member.1.Value"]) == ("tenant_id", "spoke")
    [assumed] = await moto_assumed(moto_server, spoke_role)
    assert assumed["access_key_id"].startswith("ASIA")

    spoke_records = await emulator.requests_with(f"{marker}-spoke-")
    assert len(spoke_records) == 12
    for record in spoke_records:
        assert record["access_key_id"] == assumed["access_key_id"]
        assert record["security_token_present"] is True
    for suffix in ("hub", "same"):
        [record] = await emulator.requests_with(f"{marker}-{suffix} ")
        assert record["access_key_id"] == hub_key()
        assert record["security_token_present"] is False


async def test_sts_refusal_is_an_upstream_error_frame_and_other_tenants_go_on(
    emulator: EmulatorServer, moto_server: MotoServer, sts: StsProxy, tmp_path: Path
) -> None:
    refused_role, good_role = role("hubgate-refused"), role("hubgate-good")
    sts.denied.add(refused_role)
    path = tenants_file(
        tmp_path,
        {"refused": {"role_arn": refused_role}, "good": {"role_arn": good_role}, "hubonly": {}},
    )
    settings = gateway_settings(emulator.url, tenants_file=path, sts_endpoint_url=sts.url)
    marker = uuid.uuid4().hex
    async with running_gateway(settings):
        refused = await Client.open(ws_url(settings), token("refused"))
        first = await refused.chat("r1", f"{marker} hello")
        again = await refused.chat("r2", f"{marker} hello")  # within the retry interval: no STS call
        good = await Client.open(ws_url(settings), token("good"))
        hub = await Client.open(ws_url(settings), token("hubonly"))
        good_frames, hub_frames = await asyncio.gather(
            good.chat("g", f"{marker}-good hi"), hub.chat("h", f"{marker}-hub hi")
        )
        # The refused tenant's connection stays usable.
        assert (await refused.chat("r3", "x", model="not-allowed"))[-1]["code"] == "model_not_allowed"
        for client in (refused, good, hub):
            await client.close()

    for frames in (first, again):
        assert [f["type"] for f in frames] == ["error"]
        assert frames[0]["code"] == "upstream_error"
        assert frames[0]["message"] == "cannot assume the tenant's role"
        assert ACCOUNT not in str(frames) and "arn:" not in str(frames)
    assert len(sts.calls_for(refused_role)) == 1
    assert await emulator.requests_with(f"{marker} ") == []
    assert good_frames[-1]["type"] == "end" and hub_frames[-1]["type"] == "end"
    [assumed] = await moto_assumed(moto_server, good_role)
    assert (await key_used(emulator, f"{marker}-good"))["access_key_id"] == assumed["access_key_id"]
    assert (await key_used(emulator, f"{marker}-hub"))["access_key_id"] == hub_key()


async def test_route_endpoint_and_region_override_the_hubs(
    emulator: EmulatorServer, second_emulator: EmulatorServer, sts: StsProxy, tmp_path: Path
) -> None:
    path = tenants_file(
        tmp_path,
        {
            "vpce": {"region": "eu-west-1", "endpoint_url": second_emulator.url},
            "vpce2": {"region": "eu-west-1", "endpoint_url": second_emulator.url},
            "hubonly": {},
        },
    )
    settings: Settings = gateway_settings(emulator.url, tenants_file=path, sts_endpoint_url=sts.url)
    marker = uuid.uuid4().hex
    async with running_gateway(settings):
        for tenant in ("vpce", "vpce2", "hubonly"):
            client = await Client.open(ws_url(settings), token(tenant))
            assert (await client.chat("c", f"{marker}-{tenant} hi"))[-1]["type"] == "end"
            await client.close()

    for tenant in ("vpce", "vpce2"):
        [record] = await second_emulator.requests_with(f"{marker}-{tenant} ")
        assert record["access_key_id"] == hub_key()  # no role: the hub's own credentials
        assert await emulator.requests_with(f"{marker}-{tenant} ") == []
    assert len(await emulator.requests_with(f"{marker}-hubonly ")) == 1
    assert sts.calls == []


# ---------------------------------------------------------------------------- the resolver itself


async def test_one_client_per_tenant_and_role_under_concurrent_first_requests(
    emulator: EmulatorServer, sts: StsProxy
) -> None:
    shared = Route(role_arn=role("hubgate-shared"))
    sts.delay = 0.3  # a slow STS: every caller arrives while the first AssumeRole is in flight
    async with route_clients(emulator, sts) as routes:
        first = await asyncio.gather(*(routes.provider_for("acme", shared) for _ in range(40)))
        second = await asyncio.gather(*(routes.provider_for("globex", shared) for _ in range(40)))
        assert len({id(p) for p in first}) == 1 and len({id(p) for p in second}) == 1
        assert first[0] is not second[0]  # one role, two tenants: two sessions
        assert await routes.provider_for("acme", shared) is first[0]
        assert await routes.provider_for("acme", None) is await routes.provider_for("initech", None)
        assert routes.clients == 3
        calls = sts.calls_for(shared.role_arn or "")
        assert sorted(call["RoleSessionName"] for call in calls) == ["hubgate-acme", "hubgate-globex"]
    assert routes.clients == 0
    with pytest.raises(UpstreamError):
        await routes.provider_for("acme", None)
    assert not [t for t in asyncio.all_tasks() if t.get_name().startswith("hubgate-credentials-")]


async def test_credentials_are_refreshed_before_expiry_without_holding_streams_up(
    emulator: EmulatorServer, moto_server: MotoServer, sts: StsProxy
) -> None:
    route = Route(role_arn=role("hubgate-refresh"))
    arn = route.role_arn or ""
    # 900 s credentials (STS's minimum) refreshed from 897 s before expiry: about 3 s after issue.
    async with route_clients(
        emulator, sts, role_duration_seconds=900, advisory_refresh_seconds=897, mandatory_refresh_seconds=600
    ) as routes:
        marker = uuid.uuid4().hex
        await reply(routes, "fresh", route, f"{marker}-a hi")
        [issued] = await moto_assumed(moto_server, arn)
        assert (await key_used(emulator, f"{marker}-a "))["access_key_id"] == issued["access_key_id"]

        # A stream that is still running when the credentials are refreshed.
        long = asyncio.create_task(
            reply(
                routes,
                "fresh",
                route,
                f"{marker}-long [[emulator:tokens=60]] [[emulator:token_delay_ms=100]]",
            )
        )
        # The background refresh starts on its own; make STS slow to answer it.
        sts.delay = 2.0
        await until(lambda: len(sts.calls_for(arn)) == 2, 10, "a second AssumeRole")
        # While it is in flight, requests sign with the current credentials and are not held up.
        _, took = await reply(routes, "fresh", route, f"{marker}-b hi")
        assert took < 1.0
        assert (await key_used(emulator, f"{marker}-b "))["access_key_id"] == issued["access_key_id"]
        sts.delay = 0.0

        # Once STS answers, new requests sign with the new credentials.
        used = await key_after_refresh(routes, emulator, "fresh", route, marker, issued["access_key_id"])
        assert used["access_key_id"] in {r["access_key_id"] for r in await moto_assumed(moto_server, arn)}
        assert used["security_token_present"] is True

        text, _ = await long
        assert len(text.split()) == 60  # the stream that began before the refresh ran to its end
        assert routes.clients == 2  # still the one client, with new credentials


async def test_failed_refresh_keeps_the_valid_credentials_then_recovers(
    emulator: EmulatorServer, moto_server: MotoServer, sts: StsProxy
) -> None:
    route = Route(role_arn=role("hubgate-flaky"))
    arn = route.role_arn or ""
    # Both windows open within 3 s of issue: past the mandatory one botocore alone would fail
    # every request whose refresh fails, although the credentials are good for 15 more minutes.
    async with route_clients(
        emulator,
        sts,
        role_duration_seconds=900,
        advisory_refresh_seconds=898,
        mandatory_refresh_seconds=897,
        retry_seconds=0.2,
    ) as routes:
        marker = uuid.uuid4().hex
        await reply(routes, "flaky", route, f"{marker}-a hi")
        [issued] = await moto_assumed(moto_server, arn)
        sts.denied.add(arn)
        # Background refreshes begin 2 s after issue and back off (0.2, 0.4, 0.8 s): the fourth
        # call is 3.4 s after issue, inside the mandatory window.
        await until(lambda: len(sts.calls_for(arn)) >= 4, 10, "refreshes refused by STS")

        # In the mandatory window, with STS refusing, requests still sign with the current
        # credentials and are served (generous bound: a refused refresh must not stall them).
        for letter in "bcd":
            await asyncio.sleep(0.25)
            _, took = await reply(routes, "flaky", route, f"{marker}-{letter} hi")
            assert took < 3.0
            record = await key_used(emulator, f"{marker}-{letter} ")
            assert record["access_key_id"] == issued["access_key_id"]
        assert len(await moto_assumed(moto_server, arn)) == 1

        sts.denied.discard(arn)
        used = await key_after_refresh(routes, emulator, "flaky", route, marker, issued["access_key_id"])
        assert used["access_key_id"] in {r["access_key_id"] for r in await moto_assumed(moto_server, arn)}
