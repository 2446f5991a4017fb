"""Upgrade requests whose headers the WebSocket parser refuses are answered and closed.

httptools accepts header lines of any length, so the header deadline is cancelled; websockets'
parser then refuses a request line or header line over 8 KiB (or more than 128 headers) and
queues a 431/414 response that uvicorn's websockets-sansio protocol does not write by itself; the
gateway writes it and closes the socket.
"""

from __future__ import annotations

import asyncio

import pytest

from tests.support.emulator_server import EmulatorServer
from tests.support.gateway_server import gateway_settings, running_gateway

UPGRADE = (
    "GET /v1/stream{query} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n{extra}\r\n"
)


@pytest.mark.parametrize(
    ("query", "extra"),
    [
        ("", "Authorization: Bearer eyJ" + "A" * 9000 + "\r\n"),  # a token over 8 KiB
        ("", "X-Pad: " + "A" * 9000 + "\r\n"),
        ("", "".join(f"X-H{i}: v\r\n" for i in range(200))),
        ("?q=" + "a" * 9000, ""),
    ],
    ids=["long token", "long header", "many headers", "long request line"],
)
async def test_an_upgrade_the_websocket_parser_refuses_is_answered_and_closed(
    emulator: EmulatorServer, query: str, extra: str
) -> None:
    settings = gateway_settings(emulator.url, handshake_timeout_seconds=1.0)
    async with running_gateway(settings):
        reader, writer = await asyncio.open_connection("127.0.0.1", settings.port)
        writer.write(UPGRADE.format(query=query, extra=extra).encode())
        await writer.drain()
        # An HTTP 4xx answer and EOF, within the handshake deadline.
        data = await asyncio.wait_for(reader.read(), timeout=5)
        assert data.startswith(b"HTTP/1.1 4") or data == b"", data[:80]
        writer.close()
