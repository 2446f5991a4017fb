"""Requests waiting for a stream slot (`stream_queue_ms`): the line itself, then as clients see it."""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from hubgate.ratelimit.policy import LimitPolicy
from hubgate.settings import Settings
from hubgate.slots import SlotQueue
from hubgate.tenants import TenantConfigError, parse_tenants
from tests.conftest import ws_url
from tests.support.client import Client
from tests.support.emulator_server import EmulatorServer
from tests.support.gateway_server import free_port, gateway_settings, running_gateway
from tests.support.redis_server import RedisServer
from tests.test_limits_gateway import QUICK, slow_chat, tenants_file

Mint = Callable[..., str]
LONG_POLL = 3600.0  # a poll that never fires within a test


# ---------------------------------------------------------------------------- the line


async def test_release_wakes_waiters_first_come_first_served() -> None:
    queue = SlotQueue(poll=LONG_POLL)
    order: list[str] = []

    async def waiter(name: str) -> None:
        await queue.wait("t", 60)
        order.append(name)

    tasks = []
    for name in ("a", "b", "c"):
        tasks.append(asyncio.create_task(waiter(name)))
        await asyncio.sleep(0)  # each joins the line before the next is created
    assert queue.waiting("t") == 3 and queue.waiting() == 3 and queue.waiting("other") == 0
    queue.release("t")
    await tasks[0]
    assert order == ["a"] and queue.waiting("t") == 2
    queue.release("t")
    queue.release("t")
    await asyncio.gather(*tasks)
    assert order == ["a", "b", "c"] and queue.waiting() == 0
    queue.release("t")  # nobody waiting: nothing happens


async def test_a_woken_waiter_that_waits_again_goes_first() -> None:
    queue = SlotQueue(poll=LONG_POLL)
    first = asyncio.create_task(queue.wait("t", 60))
    await asyncio.sleep(0)
    second = asyncio.create_task(queue.wait("t", 60))
    await asyncio.sleep(0)
    queue.release("t")
    await first
    again = asyncio.create_task(queue.wait("t", 60, first=True))  # refused again: keeps its place
    await asyncio.sleep(0)
    queue.release("t")
    await again
    assert not second.done() and queue.waiting("t") == 1
    queue.release("t")
    await second


async def test_a_waiter_whose_time_runs_out_leaves_the_line() -> None:
    queue = SlotQueue(poll=LONG_POLL)
    waiting = asyncio.create_task(queue.wait("t", 60))
    await asyncio.sleep(0)
    started = time.monotonic()
    await queue.wait("t", 0.05)
    assert time.monotonic() - started >= 0.04
    assert queue.waiting("t") == 1  # only the one still waiting
    queue.release("t")
    await waiting
    assert queue.waiting() == 0


async def test_a_cancelled_waiter_leaves_the_line() -> None:
    queue = SlotQueue(poll=LONG_POLL)
    cancelled = asyncio.create_task(queue.wait("t", 60))
    await asyncio.sleep(0)
    behind = asyncio.create_task(queue.wait("t", 60))
    await asyncio.sleep(0)
    cancelled.cancel()
    with pytest.raises(asyncio.CancelledError):
        await cancelled
    assert queue.waiting("t") == 1
    queue.release("t")  # goes to the one still there
    await asyncio.wait_for(behind, 5)


async def test_the_head_of_a_line_is_woken_every_poll_while_anyone_waits() -> None:
    """A slot freed on another instance wakes nobody here: the poll makes the head ask again."""
    queue = SlotQueue(poll=0.02)
    woken = 0
    while woken < 3:
        await asyncio.wait_for(queue.wait("t", 60, first=True), 5)
        woken += 1
    assert queue.waiting() == 0
    # No line, no timer: a poll with nobody waiting is not armed.
    assert not queue._ticks


# ---------------------------------------------------------------------------- configuration


def test_the_queue_is_a_tenant_limit_and_is_not_split_between_instances() -> None:
    limits_block = {"max_concurrent_streams": 4, "stream_queue_ms": 2000}
    tenants = parse_tenants({"tenants": {"a": {"models": ["m"], "limits": limits_block}}})
    limits = tenants["a"].limits
    assert limits.stream_queue_ms == 2000
    shared = limits.scaled(4)
    assert shared.max_concurrent_streams == 1 and shared.stream_queue_ms == 2000
    assert not LimitPolicy(stream_queue_ms=0).has_zero_limit  # no queue is not a closed door
    with pytest.raises(TenantConfigError, match="stream_queue_ms"):
        parse_tenants({"tenants": {"a": {"models": ["m"], "limits": {"stream_queue_ms": -1}}}})


# ---------------------------------------------------------------------------- through the gateway


def queued_now(text: str) -> float:
    match = re.search(r"^hubgate_streams_queued (\S+)$", text, re.M)
    assert match is not None, "no hubgate_streams_queued gauge"
    return float(match.group(1))


async def until_queued(settings: Settings, count: int) -> None:
    """Wait (bounded) until the gateway reports ``count`` requests waiting for a slot."""
    url = f"http://127.0.0.1:{settings.port}/metrics"
    async with httpx.AsyncClient() as http, asyncio.timeout(10):
        while queued_now((await http.get(url)).text) != count:
            await asyncio.sleep(0.01)


async def test_a_request_over_the_cap_waits_for_a_slot_instead_of_being_refused(
    emulator: EmulatorServer, mint: Mint, tmp_path: Path, limiter_url: str | None
) -> None:
    path, tenant = tenants_file(tmp_path, {"max_concurrent_streams": 1, "stream_queue_ms": 30000})
    settings = gateway_settings(emulator.url, tenants_file=path, redis_url=limiter_url)
    async with running_gateway(settings):
        holder = await Client.open(ws_url(settings), mint(tenant))
        waiter = await Client.open(ws_url(settings), mint(tenant, "bob"))
        await holder.send(slow_chat("held", tokens=20, delay_ms=20))
        await holder.until_frame("held")
        await waiter.send({"type": "chat", "id": "q", "messages": [{"role": "user", "content": QUICK}]})
        await until_queued(settings, 1)
        assert not waiter.by_id["q"]
        assert (await holder.until_terminal("held"))[-1]["type"] == "end"
        frames = await waiter.until_terminal("q")
        assert [f["type"] for f in frames] == ["start", "delta", "delta", "end"]
        await until_queued(settings, 0)
        await holder.close()
        await waiter.close()


async def test_a_request_that_waits_too_long_is_refused_and_the_line_holds_at_most_the_cap(
    emulator: EmulatorServer, mint: Mint, tmp_path: Path, limiter_url: str | None
) -> None:
    path, tenant = tenants_file(tmp_path, {"max_concurrent_streams": 1, "stream_queue_ms": 300})
    settings = gateway_settings(emulator.url, tenants_file=path, redis_url=limiter_url)
    async with running_gateway(settings):
        holder = await Client.open(ws_url(settings), mint(tenant))
        other = await Client.open(ws_url(settings), mint(tenant, "bob"))
        await holder.send(slow_chat("held", tokens=200, delay_ms=20))
        await holder.until_frame("held")
        sent = time.monotonic()
        await other.send({"type": "chat", "id": "q1", "messages": [{"role": "user", "content": QUICK}]})
        await until_queued(settings, 1)
        # The line is as long as the cap (1): the next request is refused at once.
        over = await other.chat("q2", QUICK)
        assert [(f["type"], f["code"]) for f in over] == [("error", "too_many_streams")]
        timed_out = await other.until_terminal("q1")
        assert time.monotonic() - sent >= 0.3
        assert [(f["type"], f["code"]) for f in timed_out] == [("error", "too_many_streams")]
        await until_queued(settings, 0)
        holder_frames = await holder.until_terminal("held")
        assert holder_frames[-1]["type"] == "end"
        await holder.close()
        await other.close()


async def test_a_waiting_request_can_be_cancelled(
    emulator: EmulatorServer, mint: Mint, tmp_path: Path
) -> None:
    path, tenant = tenants_file(tmp_path, {"max_concurrent_streams": 1, "stream_queue_ms": 30000})
    settings = gateway_settings(emulator.url, tenants_file=path)
    async with running_gateway(settings):
        client = await Client.open(ws_url(settings), mint(tenant))
        await client.send(slow_chat("held", tokens=200, delay_ms=20))
        await client.until_frame("held")
        await client.send({"type": "chat", "id": "q", "messages": [{"role": "user", "content": QUICK}]})
        await until_queued(settings, 1)
        await client.send({"type": "cancel", "id": "q"})
        frames = await client.until_terminal("q")
        assert [f["type"] for f in frames] == ["start", "end"]
        assert frames[-1]["stop_reason"] == "cancelled" and frames[-1]["usage"]["output_tokens"] == 0
        await until_queued(settings, 0)
        await client.send({"type": "cancel", "id": "held"})
        assert (await client.until_terminal("held"))[-1]["stop_reason"] == "cancelled"
        await client.close()


async def test_waiting_requests_are_admitted_in_arrival_order(
    emulator: EmulatorServer, mint: Mint, tmp_path: Path, limiter_url: str | None
) -> None:
    path, tenant = tenants_file(tmp_path, {"max_concurrent_streams": 2, "stream_queue_ms": 30000})
    settings = gateway_settings(emulator.url, tenants_file=path, redis_url=limiter_url)
    async with running_gateway(settings):
        client = await Client.open(ws_url(settings), mint(tenant))
        await client.send(slow_chat("short", tokens=10, delay_ms=20))
        await client.send(slow_chat("long", tokens=400, delay_ms=20))
        await client.until_frame("short")
        await client.until_frame("long")
        for request_id, count in (("q1", 1), ("q2", 2)):
            await client.send(slow_chat(request_id, tokens=400, delay_ms=20))
            await until_queued(settings, count)
        # "short" frees a slot: the first in line gets it; the second still waits for "long".
        assert (await client.until_terminal("short"))[-1]["type"] == "end"
        await client.until_frame("q1")
        await until_queued(settings, 1)
        assert not client.by_id["q2"]
        await client.send({"type": "cancel", "id": "long"})
        assert (await client.until_terminal("long"))[-1]["stop_reason"] == "cancelled"
        await client.until_frame("q2")
        assert client.by_id["q2"][0]["type"] == "start"
        await until_queued(settings, 0)
        for request_id in ("q1", "q2"):
            await client.send({"type": "cancel", "id": request_id})
            assert (await client.until_terminal(request_id))[-1]["stop_reason"] == "cancelled"
        await client.close()


async def test_a_slot_freed_on_another_instance_is_found_without_the_client_retrying(
    emulator: EmulatorServer, mint: Mint, tmp_path: Path, fresh_redis_server: RedisServer
) -> None:
    path, tenant = tenants_file(tmp_path, {"max_concurrent_streams": 1, "stream_queue_ms": 30000})
    one = gateway_settings(emulator.url, tenants_file=path, redis_url=fresh_redis_server.url)
    two = one.replace(port=free_port(), instance_id="two")
    async with running_gateway(one), running_gateway(two):
        holder = await Client.open(ws_url(one), mint(tenant))
        waiter = await Client.open(ws_url(two), mint(tenant, "bob"))
        await holder.send(slow_chat("held", tokens=20, delay_ms=20))
        await holder.until_frame("held")
        await waiter.send({"type": "chat", "id": "q", "messages": [{"role": "user", "content": QUICK}]})
        await until_queued(two, 1)
        assert (await holder.until_terminal("held"))[-1]["type"] == "end"
        assert (await waiter.until_terminal("q"))[-1]["type"] == "end"
        await holder.close()
        await waiter.close()
