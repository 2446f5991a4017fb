"""Clients that abuse the gateway by their numbers or their silence (beyond tests/test_abuse.py).

Thousands of idle connections cost bounded memory and all go away; a flood of connections over a
tenant's cap is refused with 429/1013 without admitting one too many, and every lease comes back;
a client that stops answering pings is cut off; crowds that never authenticate, or never finish
their handshake, are all dropped on time. Every figure is bounded in count and time.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import resource
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from redis.asyncio import Redis
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from hubgate.ratelimit.base import tenant_keys
from hubgate.tokens import mint_dev_token
from tests.conftest import ws_url
from tests.support.client import Client
from tests.support.emulator_server import EmulatorServer
from tests.support.gateway_server import TEST_SECRET, GatewayProcess, gateway_settings, running_gateway
from tests.support.process_checks import assert_healthy, readyz, vm_rss_kib, wait_idle
from tests.support.redis_server import RedisServer

NOVA = "amazon.nova-lite-v1:0"
QUICK = "[[emulator:tokens=2]]"
SUFFIX = uuid.uuid4().hex[:8]
OPEN, CAPPED = f"crowd-{SUFFIX}", f"capped-{SUFFIX}"
IDLE_CONNECTIONS = 2000
CAP = 20


def token(tenant: str, user: str = "alice") -> str:
    return mint_dev_token(TEST_SECRET, tenant=tenant, user=user, lifetime_seconds=900)


@pytest.fixture(scope="module")
def crowd_gateway(
    emulator: EmulatorServer, redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[GatewayProcess]:
    """`hubgate serve` (child process, Redis limits) with one open tenant and one capped at CAP."""
    # Thousands of sockets on both ends: raise this process's descriptor limit to the hard limit
    # (the gateway inherits it).
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = hard if hard != resource.RLIM_INFINITY else 65536
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, wanted), hard))
    if resource.getrlimit(resource.RLIMIT_NOFILE)[0] < 2 * IDLE_CONNECTIONS + 200:
        pytest.fail(
            f"the open-files limit ({resource.getrlimit(resource.RLIMIT_NOFILE)[0]}) is too low for "
            f"{IDLE_CONNECTIONS} connections; raise it (ulimit -n) and run again"
        )
    tenants = {
        OPEN: {"models": [NOVA]},
        CAPPED: {"models": [NOVA], "limits": {"max_connections": CAP}},
    }
    path: Path = tmp_path_factory.mktemp("crowd") / "tenants.yaml"
    path.write_text(yaml.safe_dump({"tenants": tenants}))
    # A generous Redis budget: on a busy machine a decision over the 50 ms default would fall back
    # to the local limiter (half the cap per instance), and this module is about the exact cap.
    gateway = GatewayProcess(
        gateway_settings(
            emulator.url, tenants_file=str(path), redis_url=redis_server.url, redis_timeout_ms=2000
        )
    )
    gateway.start()
    try:
        yield gateway
    finally:
        gateway.stop()


async def open_bare(url: str, bearer: str | None) -> ClientConnection:
    """A minimal client: no keepalive task of its own, reads the `ready` frame when authenticated."""
    headers = {"Authorization": f"Bearer {bearer}"} if bearer else {}
    ws = await connect(
        url,
        additional_headers=headers,
        subprotocols=["hubgate.v1"],  # type: ignore[list-item]
        compression=None,
        ping_interval=None,
        open_timeout=30,
    )
    if bearer:
        assert json.loads(await ws.recv())["type"] == "ready"
    return ws


async def gather_bounded(calls: list[Any], limit: int = 64) -> list[Any]:
    semaphore = asyncio.Semaphore(limit)

    async def one(call: Any) -> Any:
        async with semaphore:
            return await call

    return await asyncio.gather(*(one(c) for c in calls), return_exceptions=True)


async def chat_once(url: str, bearer: str) -> str:
    client = await Client.open(url, bearer)
    frames = await client.chat(uuid.uuid4().hex, QUICK)
    await client.close()
    return str(frames[-1]["type"])


# ---------------------------------------------------------------------------- idle crowds


async def test_thousands_of_idle_connections_cost_bounded_memory_and_all_go_away(
    crowd_gateway: GatewayProcess,
) -> None:
    assert crowd_gateway.process is not None
    pid = crowd_gateway.process.pid
    # Warm up first (first connections and first chat allocate caches once), then measure.
    assert await chat_once(crowd_gateway.url, token(OPEN)) == "end"
    warm = await gather_bounded([open_bare(crowd_gateway.url, token(OPEN, f"w{i}")) for i in range(50)])
    await gather_bounded([ws.close() for ws in warm])
    await wait_idle(crowd_gateway)
    before = vm_rss_kib(pid)

    opened = await gather_bounded(
        [open_bare(crowd_gateway.url, token(OPEN, f"idle-{i}")) for i in range(IDLE_CONNECTIONS)]
    )
    sockets = [ws for ws in opened if isinstance(ws, ClientConnection)]
    failures = [repr(ws) for ws in opened if not isinstance(ws, ClientConnection)]
    assert not failures, failures[:3]
    assert (await readyz(crowd_gateway))["connections"] == IDLE_CONNECTIONS
    during = vm_rss_kib(pid)
    per_connection = (during - before) / IDLE_CONNECTIONS
    # Generous: a connection's state is a few KiB; this catches a leak of buffers per socket.
    assert per_connection < 100, f"{per_connection:.1f} KiB per idle connection"

    # While they idle, others are served as usual.
    assert await chat_once(crowd_gateway.url, token(OPEN, "bystander")) == "end"

    await gather_bounded([ws.close() for ws in sockets], limit=200)
    await wait_idle(crowd_gateway, timeout=60)
    assert await chat_once(crowd_gateway.url, token(OPEN, "after")) == "end"
    print(
        f"\n{IDLE_CONNECTIONS} idle connections: VmRSS {before} KiB -> {during} KiB "
        f"({per_connection:.1f} KiB each), after closing {vm_rss_kib(pid)} KiB"
    )
    assert_healthy(crowd_gateway)


# ---------------------------------------------------------------------------- connection floods


async def live_connection_leases(redis_server: RedisServer, tenant: str) -> int:
    client = Redis.from_url(redis_server.url)
    try:
        return int(await client.zcard(tenant_keys(tenant).connections))
    finally:
        await client.aclose()


async def test_a_connection_flood_over_the_cap_is_refused_and_every_lease_comes_back(
    crowd_gateway: GatewayProcess, redis_server: RedisServer
) -> None:
    async def attempt(i: int) -> ClientConnection | int:
        try:
            return await open_bare(crowd_gateway.url, token(CAPPED, f"flood-{i}"))
        except InvalidStatus as exc:
            body = json.loads(exc.response.body or b"{}")
            assert body["error"]["code"] == "too_many_connections", body
            assert exc.response.headers["Retry-After"] == "1"
            return exc.response.status_code

    # Ten times the cap at once: exactly the cap gets in, never one more.
    outcomes = await gather_bounded([attempt(i) for i in range(10 * CAP)])
    admitted = [o for o in outcomes if isinstance(o, ClientConnection)]
    assert [o for o in outcomes if not isinstance(o, ClientConnection)] == [429] * (9 * CAP)
    assert len(admitted) == CAP
    assert await live_connection_leases(redis_server, CAPPED) == CAP

    # Over the cap after an in-band `auth`, the socket is already open: close 1013, nothing leaks.
    async def in_band(i: int) -> int | None:
        ws = await open_bare(crowd_gateway.url, None)
        await ws.send(json.dumps({"type": "auth", "token": token(CAPPED, f"late-{i}")}))
        with contextlib.suppress(ConnectionClosed):
            async with asyncio.timeout(10):
                async for _ in ws:
                    pass
        return ws.close_code

    assert await gather_bounded([in_band(i) for i in range(50)]) == [1013] * 50
    assert await live_connection_leases(redis_server, CAPPED) == CAP
    assert await chat_once(crowd_gateway.url, token(OPEN)) == "end"  # other tenants unaffected

    await gather_bounded([ws.close() for ws in admitted])
    async with asyncio.timeout(10):
        while await live_connection_leases(redis_server, CAPPED):
            await asyncio.sleep(0.02)
    await wait_idle(crowd_gateway)

    # Every lease came back: the whole cap is available again, and still not one more.
    again = await gather_bounded([attempt(i) for i in range(CAP + 5)])
    assert len([o for o in again if isinstance(o, ClientConnection)]) == CAP
    await gather_bounded([o.close() for o in again if isinstance(o, ClientConnection)])
    await wait_idle(crowd_gateway)
    assert_healthy(crowd_gateway)
    assert "deciding locally" not in crowd_gateway.output()  # every decision was Redis's


# ---------------------------------------------------------------------------- silence


async def test_a_client_that_stops_answering_pings_is_closed(emulator: EmulatorServer) -> None:
    settings = gateway_settings(emulator.url, ping_interval_seconds=0.3, ping_timeout_seconds=0.3)
    async with running_gateway(settings) as server:
        services = server.hub_app.state.services
        good = await Client.open(ws_url(settings), token("acme", "good"))  # answers pings itself
        mute = await open_bare(ws_url(settings), token("acme", "mute"))
        # Stop reading at the TCP level: pings sit unread in the socket, nobody answers them.
        mute.transport.pause_reading()
        async with asyncio.timeout(10):
            while any(c.identity and c.identity.user == "mute" for c in services.connections):
                await asyncio.sleep(0.02)
        mute.transport.resume_reading()
        with contextlib.suppress(ConnectionClosed):
            async with asyncio.timeout(10):
                async for _ in mute:
                    pass
        assert mute.close_code == 1011  # the documented keepalive close
        # The client that answers its pings has been through several rounds and still chats.
        assert (await good.chat(uuid.uuid4().hex, QUICK))[-1]["type"] == "end"
        assert [c.identity.user for c in services.connections if c.identity] == ["good"]
        await good.close()


async def test_a_crowd_that_never_authenticates_is_closed_4408(emulator: EmulatorServer) -> None:
    settings = gateway_settings(emulator.url, auth_timeout_seconds=1.0)
    async with running_gateway(settings) as server:
        baseline = len(server.server_state.connections)
        crowd = await gather_bounded([open_bare(ws_url(settings), None) for _ in range(300)])
        assert all(isinstance(ws, ClientConnection) for ws in crowd), crowd[:3]
        bystander = await Client.open(ws_url(settings), token("acme", "bystander"))

        async def close_code(ws: ClientConnection) -> int | None:
            with contextlib.suppress(ConnectionClosed):
                async with asyncio.timeout(15):
                    async for _ in ws:
                        pass
            return ws.close_code

        assert await asyncio.gather(*(close_code(ws) for ws in crowd)) == [4408] * 300
        assert (await bystander.chat(uuid.uuid4().hex, QUICK))[-1]["type"] == "end"
        await bystander.close()
        async with asyncio.timeout(10):
            while len(server.server_state.connections) > baseline:
                await asyncio.sleep(0.02)
        assert not server.hub_app.state.services.connections


async def test_a_crowd_that_never_finishes_its_handshake_is_dropped(emulator: EmulatorServer) -> None:
    settings = gateway_settings(emulator.url, handshake_timeout_seconds=0.5)
    async with running_gateway(settings) as server:
        baseline = len(server.server_state.connections)
        partial = [
            b"",  # connects and says nothing
            b"GET /v1/stream HTTP/1.1\r\n",  # a request line, then nothing
            b"GET /v1/stream HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n",  # headers never end
        ]
        streams = []
        for i in range(150):
            reader, writer = await asyncio.open_connection("127.0.0.1", settings.port)
            writer.write(partial[i % len(partial)])
            streams.append((reader, writer))
        bystander = await Client.open(ws_url(settings), token("acme", "bystander"))

        async def eof(reader: asyncio.StreamReader) -> bytes:
            with contextlib.suppress(ConnectionError):
                return await asyncio.wait_for(reader.read(), timeout=10)
            return b""

        assert await asyncio.gather(*(eof(r) for r, _ in streams)) == [b""] * 150
        for _, writer in streams:
            writer.close()
        assert (await bystander.chat(uuid.uuid4().hex, QUICK))[-1]["type"] == "end"
        await bystander.close()
        async with asyncio.timeout(10):
            while len(server.server_state.connections) > baseline:
                await asyncio.sleep(0.02)
