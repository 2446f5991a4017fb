"""Clients that misbehave: floods, slow readers, handshakes that never finish."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Callable

from hubgate.gateway import MessageRate
from tests.conftest import ws_url
from tests.support.client import Client
from tests.support.emulator_server import EmulatorServer
from tests.support.gateway_server import gateway_settings, running_gateway

Mint = Callable[..., str]


def test_message_rate_allows_a_burst_then_drops_then_closes() -> None:
    rate = MessageRate(10)  # burst 50
    assert [rate.check(0.0) for _ in range(50)] == [MessageRate.ALLOW] * 50
    assert rate.check(0.0) == MessageRate.DROP
    # Half a second refills 5 messages (and drains 5 dropped ones).
    assert [rate.check(0.5) for _ in range(5)] == [MessageRate.ALLOW] * 5
    # A flood: drops pile up faster than they drain; past 5 seconds' worth the client is closed.
    verdicts = [rate.check(0.5) for _ in range(51)]
    assert set(verdicts[:-1]) == {MessageRate.DROP} and verdicts[-1] == MessageRate.CLOSE
    # A client that slows down recovers: allowed again after a pause, drops forgotten.
    calm = MessageRate(10)
    for _ in range(60):
        calm.check(0.0)
    assert calm.check(10.0) == MessageRate.ALLOW and calm.dropped == 0.0


async def test_a_flood_of_messages_is_refused_then_disconnected(emulator: EmulatorServer, mint: Mint) -> None:
    settings = gateway_settings(emulator.url, max_messages_per_second=5)
    async with running_gateway(settings):
        bystander = await Client.open(ws_url(settings), mint(user="bystander"))
        flooder = await Client.open(ws_url(settings), mint(user="flooder"))
        for i in range(200):
            await flooder.send({"type": "ping", "id": str(i)})
        code, _ = await flooder.wait_closed()
        assert code == 1008
        frames = await bystander.chat("ok", "[[emulator:tokens=3]]")
        assert frames[-1]["type"] == "end"
        await bystander.close()


async def test_a_client_that_never_finishes_its_handshake_is_dropped(emulator: EmulatorServer) -> None:
    settings = gateway_settings(emulator.url, handshake_timeout_seconds=0.5)
    async with running_gateway(settings):
        reader, writer = await asyncio.open_connection("127.0.0.1", settings.port)
        writer.write(b"GET /v1/stream HTTP/1.1\r\nHost: x\r\n")  # headers never end
        await writer.drain()
        started = time.monotonic()
        data = await asyncio.wait_for(reader.read(), timeout=10)  # EOF when the server closes
        assert data == b"" and time.monotonic() - started < 5
        writer.close()


async def test_a_client_that_stops_reading_is_disconnected(emulator: EmulatorServer, mint: Mint) -> None:
    settings = gateway_settings(emulator.url, send_timeout_seconds=1.0)
    async with running_gateway(settings) as server:
        services = server.hub_app.state.services
        slow = await Client.open(ws_url(settings), mint(user="slow"))
        # Stop reading at the TCP level: a tiny receive buffer, and nobody calls recv.
        sock = slow.ws.transport.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        slow.ws.transport.pause_reading()
        words = " ".join("x" * 200 for _ in range(2000))
        await slow.send(
            {
                "type": "chat",
                "id": "big",
                "messages": [{"role": "user", "content": f"[[emulator:reply={words}]]"}],
            }
        )
        async with asyncio.timeout(20):
            while any(c.id for c in services.connections if c.identity and c.identity.user == "slow"):
                await asyncio.sleep(0.05)
        other = await Client.open(ws_url(settings), mint(user="fine"))
        assert (await other.chat("ok", "[[emulator:tokens=2]]"))[-1]["type"] == "end"
        await other.close()
