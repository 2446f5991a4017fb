"""The Bedrock provider reading a malformed event stream from a real HTTP server, through aioboto3."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from hubgate.emulator.eventstream import encode_message, event_message
from hubgate.errors import UpstreamError
from hubgate.providers.base import Completion, ProviderRequest, Turn
from hubgate.providers.bedrock import BedrockProvider

START = event_message("messageStart", {"role": "assistant"})
DELTA = event_message("contentBlockDelta", {"contentBlockIndex": 0, "delta": {"text": "hello"}})
NOT_JSON = encode_message(
    [(":event-type", "contentBlockDelta"), (":content-type", "application/json"), (":message-type", "event")],
    b"{not json",
)


def flipped(message: bytes) -> bytes:
    """The message with one payload byte changed: its message checksum no longer matches."""
    at = len(message) - 6
    return message[:at] + bytes([message[at] ^ 0xFF]) + message[at + 1 :]


async def serve_body(body: bytes) -> tuple[asyncio.Server, str]:
    """A one-answer HTTP server on a free loopback port: 200, an event-stream body, then close."""

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        length = next(
            (
                int(line.split(b":")[1])
                for line in head.split(b"\r\n")
                if line.lower().startswith(b"content-length")
            ),
            0,
        )
        await reader.readexactly(length)
        writer.write(
            b"HTTP/1.1 200 OK\r\ncontent-type: application/vnd.amazon.eventstream\r\n"
            + f"content-length: {len(body)}\r\nconnection: close\r\n\r\n".encode()
            + body
        )
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(answer, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    return server, f"http://127.0.0.1:{port}"


async def collect(items: AsyncIterator[str | Completion]) -> list[str | Completion]:
    return [item async for item in items]


@pytest.mark.parametrize(
    ("body", "message", "texts"),
    [
        # The whole body arrives in one read: the corrupt chunk is refused as a whole.
        (START + DELTA + flipped(DELTA), "corrupted", []),
        (START + NOT_JSON, "corrupted", []),
        (START + DELTA + DELTA[:20], "ended before it was complete", ["hello"]),
    ],
    ids=["bad-checksum", "payload-not-json", "cut-mid-message"],
)
async def test_a_malformed_stream_ends_with_an_upstream_error(
    body: bytes, message: str, texts: list[str]
) -> None:
    server, url = await serve_body(body)
    provider = BedrockProvider(
        region="us-east-1",
        endpoint_url=url,
        connect_timeout=5,
        read_timeout=5,
        max_attempts=1,
        credentials=("AKIDEXAMPLE", "secret"),
    )
    await provider.start()
    received: list[str | Completion] = []
    try:
        request = ProviderRequest(
            model="amazon.nova-lite-v1:0", messages=(Turn("user", "hi"),), max_tokens=16
        )
        with pytest.raises(UpstreamError, match=message):
            async for item in provider.stream(request):
                received.append(item)
    finally:
        await provider.aclose()
        server.close()
        await server.wait_closed()
    assert received == texts
