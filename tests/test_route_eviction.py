"""Route clients are closed once no tenant's requests use them: after a tenant's route changes, the
old client (its connections and its credential refresher) goes, never under a running stream and
never while another tenant still maps to it. Real STS (moto), the real Bedrock emulator.

``TcpProxy`` (tests/support) sits between a route's client and the emulator and counts the client's open TCP
connections, so a test sees the client's connection pool really close.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from hubgate.errors import UpstreamError
from hubgate.providers.base import Completion, ProviderRequest, Route, Turn
from hubgate.providers.routes import RouteAssignments, RouteClient, RouteClients, Target, retirement_delay
from hubgate.registry import FileRegistry
from hubgate.tenants import Tenant
from tests.conftest import ws_url
from tests.support.client import Client, text_of
from tests.support.emulator_server import EmulatorServer
from tests.support.gateway_server import gateway_settings, running_gateway
from tests.support.moto_server import MotoServer
from tests.support.sts_proxy import StsProxy
from tests.support.tcp_proxy import TcpProxy
from tests.test_routes import (
    MODEL,
    moto_assumed,
    reply,
    role,
    route_clients,
    tenants_file,
    token,
)

PACED = "[[emulator:tokens=30]] [[emulator:token_delay_ms=20]]"


# ---------------------------------------------------------------------------- fixtures and helpers


@pytest.fixture
async def forwarder(emulator: EmulatorServer) -> AsyncIterator[TcpProxy]:
    server = TcpProxy(emulator.port)
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


def request(text: str) -> ProviderRequest:
    return ProviderRequest(model=MODEL, messages=(Turn("user", text),), max_tokens=200)


async def route_client(routes: RouteClients, tenant: str, route: Route) -> RouteClient:
    client = await routes.provider_for(tenant, route)
    assert isinstance(client, RouteClient)
    return client


async def closed(client: RouteClient, timeout: float = 5.0) -> None:
    async with asyncio.timeout(timeout):
        await client.wait_closed()


def registered(tenant_id: str, route: Route | None) -> Tenant:
    return Tenant(
        id=tenant_id, name=tenant_id, enabled=True, models=(MODEL,), default_model=MODEL, route=route
    )


def refreshers(tenant: str) -> list[asyncio.Task[object]]:
    return [t for t in asyncio.all_tasks() if t.get_name() == f"hubgate-credentials-{tenant}"]


# ---------------------------------------------------------------------------- pure decisions


def test_retirement_waits_for_running_streams_then_for_the_grace() -> None:
    assert retirement_delay(1, last_used=0.0, now=1000.0, grace=60.0) is None
    assert retirement_delay(3, last_used=0.0, now=0.0, grace=0.0) is None
    assert retirement_delay(0, last_used=100.0, now=110.0, grace=60.0) == 50.0
    assert retirement_delay(0, last_used=100.0, now=160.0, grace=60.0) == 0.0
    assert retirement_delay(0, last_used=100.0, now=500.0, grace=60.0) == 0.0
    assert retirement_delay(0, last_used=100.0, now=100.0, grace=0.0) == 0.0


def test_assignments_report_a_target_when_its_last_tenant_leaves() -> None:
    eu, us2 = Target("eu-west-1", None), Target("us-west-2", None)
    assignments = RouteAssignments()
    assert assignments.assign("acme", eu) is None
    assert assignments.assign("globex", eu) is None
    assert assignments.assign("acme", eu) is None  # the same route again: nothing changes
    assert eu in assignments
    assert assignments.assign("acme", us2) is None  # globex still maps to eu
    assert eu in assignments and us2 in assignments
    assert assignments.assign("globex", None) == eu  # to the hub: eu has no tenant left
    assert eu not in assignments
    assert assignments.assign("initech", None) is None  # hub tenants are not recorded
    assert assignments.assign("acme", eu) == us2
    assert assignments.assign("acme", eu) is None
    assert eu in assignments and us2 not in assignments


# ---------------------------------------------------------------------------- the resolver


async def test_a_changed_role_route_closes_the_old_client_and_its_refresher(
    emulator: EmulatorServer, moto_server: MotoServer, sts: StsProxy, forwarder: TcpProxy
) -> None:
    old_route = Route(role_arn=role("hubgate-old"), endpoint_url=forwarder.url)
    new_route = Route(role_arn=role("hubgate-new"))
    async with route_clients(emulator, sts, retire_grace_seconds=0) as routes:
        old = await route_client(routes, "mover", old_route)
        await reply(routes, "mover", old_route, "before the change")
        await forwarder.wait_open(1)  # the old client's pooled connection
        [old_refresher] = refreshers("mover")

        new = await route_client(routes, "mover", new_route)
        assert new is not old
        await closed(old)
        await forwarder.wait_open(0)
        assert old_refresher.done()
        with pytest.raises(UpstreamError):
            await anext(old.stream(request("too late")))

        # The new client serves, signed with the new role's credentials.
        text, _ = await reply(routes, "mover", new_route, "after-the-change hi")
        assert text
        [assumed] = await moto_assumed(moto_server, new_route.role_arn or "")
        [record] = await emulator.requests_with("after-the-change ")
        assert record["access_key_id"] == assumed["access_key_id"]
        assert [t.done() for t in refreshers("mover")] == [False]
        assert routes.clients == 2  # the hub's and the new route's
        assert not new.closed
    assert new.closed and refreshers("mover") == []


async def test_a_stream_on_the_old_client_finishes_before_the_client_closes(
    emulator: EmulatorServer, sts: StsProxy, forwarder: TcpProxy
) -> None:
    old_route = Route(region="eu-west-1", endpoint_url=forwarder.url)
    new_route = Route(region="eu-west-2")
    async with route_clients(emulator, sts, retire_grace_seconds=0) as routes:
        old = await route_client(routes, "mover", old_route)
        stream = old.stream(request(f"running {PACED}"))
        first = await anext(stream)
        assert isinstance(first, str)

        new = await route_client(routes, "mover", new_route)
        assert new is not old
        text, _ = await reply(routes, "mover", new_route, "meanwhile")  # the new client serves
        assert text
        # Still running on the old client, over its own connection.
        assert not old.closed and forwarder.open == 1

        items = [first] + [item async for item in stream]
        completion = items[-1]
        assert isinstance(completion, Completion) and completion.stop_reason == "end_turn"
        assert len("".join(str(item) for item in items[:-1]).split()) == 30
        # Its end was the last use: the old client closes now.
        await closed(old)
        await forwarder.wait_open(0)
        assert not new.closed and routes.clients == 2


async def test_a_client_shared_by_two_tenants_stays_open_while_one_still_uses_it(
    emulator: EmulatorServer, sts: StsProxy, forwarder: TcpProxy
) -> None:
    shared = Route(region="eu-west-1", endpoint_url=forwarder.url)
    async with route_clients(emulator, sts, retire_grace_seconds=0) as routes:
        client = await route_client(routes, "acme", shared)
        assert await route_client(routes, "globex", shared) is client
        await reply(routes, "acme", shared, "acme before")

        assert await routes.provider_for("acme", None) is not client  # acme moves to the hub
        # globex still maps to the shared client: it keeps serving over the same connection.
        text, _ = await reply(routes, "globex", shared, "globex after")
        assert text
        assert await routes.provider_for("globex", shared) is client
        assert not client.closed and forwarder.open == 1 and routes.clients == 2

        await routes.provider_for("globex", Route(region="eu-west-2"))  # globex moves too
        await closed(client)
        await forwarder.wait_open(0)


async def test_an_old_client_handed_out_within_the_grace_stays_usable(
    emulator: EmulatorServer, sts: StsProxy, forwarder: TcpProxy
) -> None:
    # A request that resolved the old route just before the change (e.g. between two retries of
    # its upstream call, when no stream runs) can still use the client it was given.
    old_route, new_route = Route(region="eu-west-1", endpoint_url=forwarder.url), Route(region="eu-west-2")
    async with route_clients(emulator, sts, retire_grace_seconds=60) as routes:
        old = await route_client(routes, "mover", old_route)
        await route_client(routes, "mover", new_route)
        items = [item async for item in old.stream(request("late attempt"))]
        assert isinstance(items[-1], Completion)
        assert not old.closed and routes.clients == 3
        # The tenant moving back within the grace gets the same client again.
        assert await route_client(routes, "mover", old_route) is old
    assert old.closed
    await forwarder.wait_open(0)


async def test_a_tenant_gone_from_the_registry_lets_go_of_its_client(
    emulator: EmulatorServer, sts: StsProxy, forwarder: TcpProxy
) -> None:
    route = Route(region="eu-west-1", endpoint_url=forwarder.url)
    kept = Route(region="eu-west-2")
    registry = {"stayer": registered("stayer", kept)}
    async with route_clients(emulator, sts, retire_grace_seconds=0) as routes:
        leaver = await route_client(routes, "leaver", route)
        stayer = await route_client(routes, "stayer", kept)
        await reply(routes, "leaver", route, "before removal")
        await forwarder.wait_open(1)

        # No request of the removed tenant comes again: the periodic look at the registry is
        # what closes its client. The tenant still there keeps its own. A look that fails (the
        # first one here) is tried again at the next interval.
        looks = 0

        def lookup(tenant_id: str) -> Tenant | None:
            nonlocal looks
            looks += 1
            if looks == 1:
                raise RuntimeError("registry lookup failed")
            return registry.get(tenant_id)

        follower = asyncio.create_task(routes.follow(lookup, interval=0.05))
        try:
            await closed(leaver)
            await forwarder.wait_open(0)
        finally:
            follower.cancel()
        assert looks > 1 and not stayer.closed and routes.clients == 2
        assert await route_client(routes, "stayer", kept) is stayer


async def test_a_route_changed_in_the_registry_lets_go_of_the_old_client_without_a_request(
    emulator: EmulatorServer, sts: StsProxy, forwarder: TcpProxy
) -> None:
    old_route, new_route = Route(region="eu-west-1", endpoint_url=forwarder.url), Route(region="eu-west-2")
    async with route_clients(emulator, sts, retire_grace_seconds=0) as routes:
        old = await route_client(routes, "mover", old_route)
        await reply(routes, "mover", old_route, "before the move")
        routes.reconcile({"mover": registered("mover", old_route)}.get)
        assert not old.closed  # unchanged: nothing to let go of

        routes.reconcile({"mover": registered("mover", new_route)}.get)
        await closed(old)
        await forwarder.wait_open(0)
        new = await route_client(routes, "mover", new_route)  # created on the next request
        assert not new.closed and routes.clients == 2


# ---------------------------------------------------------------------------- through the gateway


async def test_a_reloaded_route_serves_new_requests_while_a_running_stream_ends_normally(
    emulator: EmulatorServer, second_emulator: EmulatorServer, sts: StsProxy, tmp_path: Path
) -> None:
    old_route = {"region": "eu-west-1"}
    new_route = {"region": "eu-west-1", "endpoint_url": second_emulator.url}
    path = tenants_file(tmp_path, {"mover": old_route})
    registry = FileRegistry.from_file(path)
    settings = gateway_settings(emulator.url, tenants_file=path, sts_endpoint_url=sts.url)
    async with running_gateway(settings, tenants=registry):
        # The gateway looks at the registry for tenants that left their route (tested above).
        [follower] = [t for t in asyncio.all_tasks() if t.get_name() == "hubgate-routes"]
        before = await Client.open(ws_url(settings), token("mover"))
        await before.send(
            {"type": "chat", "id": "long", "messages": [{"role": "user", "content": f"old-route {PACED}"}]}
        )
        await before.until_frame("long", "delta")

        tenants_file(tmp_path, {"mover": new_route})
        await registry.refresh()
        after = await Client.open(ws_url(settings), token("mover"))
        new_frames = await after.chat("short", "new-route hello")
        old_frames = await before.until_terminal("long")
        for client in (before, after):
            await client.close()

    assert follower.done()  # stopped with the gateway
    assert new_frames[-1]["type"] == "end"
    assert len(await second_emulator.requests_with("new-route ")) == 1
    assert old_frames[-1]["type"] == "end" and old_frames[-1]["stop_reason"] == "end_turn"
    assert len(text_of(old_frames).split()) == 30
    assert len(await emulator.requests_with("old-route ")) == 1
