"""Rate limits as a client sees them: frames, retry_after, caps, Redis failure, and a fleet of gateways."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from redis.asyncio import Redis
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from tests.conftest import ws_url
from tests.support.client import Client
from tests.support.emulator_server import EmulatorServer
from tests.support.gateway_server import GatewayProcess, free_port, gateway_settings, running_gateway
from tests.support.redis_server import RedisServer

Mint = Callable[..., str]
NOVA = "amazon.nova-lite-v1:0"
QUICK = "[[emulator:tokens=2]]"


def tenants_file(tmp_path: Path, limits: dict[str, Any], tenant: str | None = None) -> tuple[str, str]:
    """A tenants file with one tenant (a fresh id, so tests sharing a Redis never collide)."""
    tenant_id = tenant or f"t-{uuid.uuid4().hex[:10]}"
    path = tmp_path / f"{tenant_id}.yaml"
    document = {
        "tenants": {
            tenant_id: {"models": [NOVA], "default_model": NOVA, "default_max_tokens": 64, "limits": limits}
        }
    }
    path.write_text(yaml.safe_dump(document))
    return str(path), tenant_id


def slow_chat(request_id: str, tokens: int = 40, delay_ms: int = 20, **fields: Any) -> dict[str, Any]:
    text = f"[[emulator:tokens={tokens}]] [[emulator:token_delay_ms={delay_ms}]]"
    return {"type": "chat", "id": request_id, "messages": [{"role": "user", "content": text}], **fields}


async def test_request_bucket_refuses_with_exact_retry_after(
    emulator: EmulatorServer, mint: Mint, tmp_path: Path, limiter_url: str | None
) -> None:
    path, tenant = tenants_file(tmp_path, {"requests_per_minute": 60, "request_burst": 2})
    settings = gateway_settings(emulator.url, tenants_file=path, redis_url=limiter_url)
    async with running_gateway(settings):
        client = await Client.open(ws_url(settings), mint(tenant))
        first = await client.chat("a", QUICK)
        assert first[0]["limits"]["requests_remaining"] == 1
        assert (await client.chat("b", QUICK))[0]["limits"]["requests_remaining"] == 0
        refused = (await client.chat("c", QUICK))[-1]
        assert refused["type"] == "error" and refused["code"] == "rate_limited"
        # 60 per minute refills one request a second; two were just taken.
        assert 0 < refused["retry_after"] <= 1.0
        await asyncio.sleep(refused["retry_after"])
        assert (await client.chat("d", QUICK))[-1]["type"] == "end"
        await client.close()


async def test_token_reservation_refuses_then_refunds(
    emulator: EmulatorServer, mint: Mint, tmp_path: Path, limiter_url: str | None
) -> None:
    path, tenant = tenants_file(tmp_path, {"tokens_per_minute": 600, "token_burst": 600})
    settings = gateway_settings(emulator.url, tenants_file=path, redis_url=limiter_url)
    async with running_gateway(settings):
        client = await Client.open(ws_url(settings), mint(tenant))
        await client.send(slow_chat("big", tokens=5, delay_ms=50, max_tokens=500))
        await client.until_frame("big")
        # The first request reserved ~500 tokens of 600: a second one of that size cannot fit.
        refused = await client.chat("second", QUICK, max_tokens=500)
        assert refused[-1]["code"] == "token_rate_limited" and refused[-1]["retry_after"] > 0
        done = await client.until_terminal("big")
        assert done[-1]["type"] == "end" and done[-1]["usage"]["output_tokens"] == 5
        # Settlement refunded what the first reply did not use: the same request now fits.
        assert (await client.chat("third", QUICK, max_tokens=500))[-1]["type"] == "end"
        await client.close()


async def test_per_user_bucket(
    emulator: EmulatorServer, mint: Mint, tmp_path: Path, limiter_url: str | None
) -> None:
    path, tenant = tenants_file(tmp_path, {"per_user_requests_per_minute": 1})
    settings = gateway_settings(emulator.url, tenants_file=path, redis_url=limiter_url)
    async with running_gateway(settings):
        alice = await Client.open(ws_url(settings), mint(tenant, "alice"))
        bob = await Client.open(ws_url(settings), mint(tenant, "bob"))
        assert (await alice.chat("1", QUICK))[-1]["type"] == "end"
        assert (await alice.chat("2", QUICK))[-1]["code"] == "rate_limited"
        assert (await bob.chat("1", QUICK))[-1]["type"] == "end"
        await alice.close()
        await bob.close()


async def test_tenant_stream_cap_across_connections(
    emulator: EmulatorServer, mint: Mint, tmp_path: Path, limiter_url: str | None
) -> None:
    path, tenant = tenants_file(tmp_path, {"max_concurrent_streams": 2})
    settings = gateway_settings(emulator.url, tenants_file=path, redis_url=limiter_url)
    async with running_gateway(settings):
        one = await Client.open(ws_url(settings), mint(tenant))
        two = await Client.open(ws_url(settings), mint(tenant, "bob"))
        await one.send(slow_chat("s1"))
        await two.send(slow_chat("s2"))
        while not (one.by_id["s1"] and two.by_id["s2"]):
            await asyncio.wait_for(asyncio.gather(one.next_frame(), two.next_frame()), 10)
        assert (await one.chat("s3", QUICK))[-1]["code"] == "too_many_streams"
        assert (await one.until_terminal("s1"))[-1]["type"] == "end"
        assert (await one.chat("s4", QUICK))[-1]["type"] == "end"
        await one.close()
        await two.close()


async def test_a_full_tenant_is_refused_without_asking_redis_again(
    emulator: EmulatorServer, mint: Mint, tmp_path: Path, fresh_redis_server: RedisServer
) -> None:
    """Once Redis says the tenant's stream cap is full, an instance refuses that tenant's next
    requests itself for a moment (cheap refusals under overload); a slot freed on another
    instance is usable within that moment."""
    path, tenant = tenants_file(tmp_path, {"max_concurrent_streams": 1})
    # Leases renewed far apart, so every EVALSHA below is an admission or a settlement.
    base = gateway_settings(
        emulator.url, tenants_file=path, redis_url=fresh_redis_server.url, lease_ttl_seconds=600
    )
    one, two = base, base.replace(port=free_port(), instance_id="two")
    redis = Redis.from_url(fresh_redis_server.url)

    async def evalsha_calls() -> int:
        stats = await redis.info("commandstats")
        return int(stats.get("cmdstat_evalsha", {}).get("calls", 0))

    async with running_gateway(one), running_gateway(two):
        holder = await Client.open(ws_url(one), mint(tenant))
        other = await Client.open(ws_url(two), mint(tenant, "bob"))
        await holder.send(slow_chat("held"))
        await holder.until_frame("held")
        assert (await other.chat("r1", QUICK))[-1]["code"] == "too_many_streams"  # Redis said so
        before = await evalsha_calls()
        held = await other.chat("r2", QUICK)  # instance two said so, with the same frame
        assert [(f["type"], f["seq"], f["code"]) for f in held] == [("error", 0, "too_many_streams")]
        assert await evalsha_calls() == before
        assert (await holder.until_terminal("held"))[-1]["type"] == "end"
        # The slot was freed on instance one; instance two admits again once its hold is over.
        deadline = time.monotonic() + 10
        attempt = 0
        while True:
            attempt += 1
            frames = await other.chat(f"after{attempt}", QUICK)
            if frames[-1]["type"] == "end":
                break
            assert frames[-1]["code"] == "too_many_streams"
            assert time.monotonic() < deadline, "instance two never admitted the tenant again"
            await asyncio.sleep(0.02)  # a client's back-off between attempts
        await holder.close()
        await other.close()
    await redis.aclose()


async def test_connection_cap(
    emulator: EmulatorServer, mint: Mint, tmp_path: Path, limiter_url: str | None
) -> None:
    path, tenant = tenants_file(tmp_path, {"max_connections": 2})
    settings = gateway_settings(emulator.url, tenants_file=path, redis_url=limiter_url)
    async with running_gateway(settings):
        held = [await Client.open(ws_url(settings), mint(tenant)) for _ in range(2)]
        with pytest.raises(InvalidStatus) as refused:
            await connect(ws_url(settings), additional_headers={"Authorization": f"Bearer {mint(tenant)}"})
        assert refused.value.response.status_code == 429
        # The same cap after an in-band `auth`: the socket is already open, so close 1013.
        late = await Client.open(ws_url(settings))
        await late.send({"type": "auth", "token": mint(tenant)})
        assert (await late.wait_closed())[0] == 1013
        # A closed connection gives its lease back.
        await held[0].close()
        async with asyncio.timeout(10):
            while True:
                try:
                    again = await Client.open(ws_url(settings), mint(tenant))
                    break
                except InvalidStatus:
                    await asyncio.sleep(0.02)
        await again.close()
        await held[1].close()


async def test_closed_mode_refuses_while_redis_is_down(
    emulator: EmulatorServer, mint: Mint, tmp_path: Path, fresh_redis_server: RedisServer
) -> None:
    path, tenant = tenants_file(tmp_path, {"requests_per_minute": 600})
    settings = gateway_settings(
        emulator.url, tenants_file=path, redis_url=fresh_redis_server.url, rate_limit_failure_mode="closed"
    )
    async with running_gateway(settings):
        client = await Client.open(ws_url(settings), mint(tenant))
        assert (await client.chat("before", QUICK))[-1]["type"] == "end"
        fresh_redis_server.kill()
        started = time.monotonic()
        refused = await client.chat("during", QUICK)
        assert refused[-1]["code"] == "limiter_unavailable"
        assert time.monotonic() - started < 2.0  # milliseconds in practice; never a hang
        fresh_redis_server.start()
        async with asyncio.timeout(30):
            n = 0
            while True:
                n += 1
                frames = await client.chat(f"after-{n}", QUICK)
                if frames[-1]["type"] == "end":
                    break
                assert frames[-1]["code"] == "limiter_unavailable"
                await asyncio.sleep(0.1)
        await client.close()


async def test_local_mode_keeps_serving_while_redis_is_down(
    emulator: EmulatorServer, mint: Mint, tmp_path: Path, fresh_redis_server: RedisServer
) -> None:
    # 4 requests per minute over 2 expected instances: the local fallback allows 2 here.
    path, tenant = tenants_file(tmp_path, {"requests_per_minute": 4})
    settings = gateway_settings(
        emulator.url, tenants_file=path, redis_url=fresh_redis_server.url, expected_instances=2
    )
    async with running_gateway(settings):
        client = await Client.open(ws_url(settings), mint(tenant))
        fresh_redis_server.kill()
        outcomes = [(await client.chat(f"r{i}", QUICK))[-1] for i in range(3)]
        assert [f["type"] for f in outcomes[:2]] == ["end", "end"]
        assert outcomes[2]["code"] == "rate_limited"  # never unlimited
        await client.close()


# ---------------------------------------------------------------------------- a fleet


@pytest.mark.slow
async def test_three_gateways_share_one_budget_exactly(
    emulator: EmulatorServer, mint: Mint, tmp_path: Path, redis_server: RedisServer
) -> None:
    rate_per_minute, burst = 600, 20  # 10 requests a second
    path, tenant = tenants_file(tmp_path, {"requests_per_minute": rate_per_minute, "request_burst": burst})
    # Three gateways, Redis, the emulator and 24 clients share two cores here: a generous Redis
    # timeout keeps every decision in Redis (the point of this test), checked in the logs below.
    # Clients retry at once when refused; the per-connection message cap is not under test here.
    base = gateway_settings(
        emulator.url,
        tenants_file=path,
        redis_url=redis_server.url,
        redis_timeout_ms=2000,
        max_messages_per_second=10_000,
    )
    fleet = [GatewayProcess(base.replace(port=free_port(), instance_id=f"gw{i}")) for i in range(3)]
    for gateway in fleet:
        gateway.start()
    try:
        clients = [await Client.open(fleet[i % 3].url, mint(tenant, f"user{i}")) for i in range(36)]
        admitted: list[float] = []
        sent: list[float] = []
        refused = 0
        duration = 6.0
        start = time.time()
        deadline = start + duration

        async def hammer(client: Client, n: int) -> None:
            nonlocal refused
            i = 0
            while time.time() < deadline:
                i += 1
                sent.append(time.time())
                frames = await client.chat(f"{n}-{i}", QUICK)
                if frames[-1]["type"] == "end":
                    admitted.append(time.time())
                else:
                    assert frames[-1]["code"] == "rate_limited", frames[-1]
                    refused += 1

        await asyncio.gather(*(hammer(c, n) for n, c in enumerate(clients)))
        elapsed = time.time() - start
        ceiling = burst + rate_per_minute / 60 * elapsed
        assert refused > 0
        assert len(admitted) <= ceiling, (len(admitted), ceiling)
        # What the bucket could admit between the first and the last request sent, 98% of it at least
        # (the last request may be sent a little before the deadline on a busy machine).
        floor = 0.98 * (burst + rate_per_minute / 60 * (max(sent) - min(sent)))
        assert len(admitted) >= floor, (len(admitted), floor)
        for client in clients:
            await client.close()
        for gateway in fleet:
            assert "deciding locally" not in gateway.output()
    finally:
        for gateway in fleet:
            gateway.stop()
