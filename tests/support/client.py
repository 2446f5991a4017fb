"""A small real WebSocket client for tests (websockets' asyncio client)."""

from __future__ import annotations

import asyncio
import json
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

TERMINAL = ("end", "error")


class Client:
    """Sends JSON messages and sorts incoming frames by request id."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self.by_id: defaultdict[str, list[dict[str, Any]]] = defaultdict(list)
        self.other: list[dict[str, Any]] = []

    @classmethod
    async def open(
        cls,
        url: str,
        token: str | None = None,
        *,
        via: str = "header",
        subprotocols: Sequence[str] = ("hubgate.v1",),
        headers: dict[str, str] | None = None,
        expect_ready: bool = True,
    ) -> Client:
        extra = dict(headers or {})
        protocols = list(subprotocols)
        if token is not None and via == "header":
            extra["Authorization"] = f"Bearer {token}"
        elif token is not None and via == "subprotocol":
            protocols.append(f"bearer.{token}")
        ws = await connect(
            url,
            additional_headers=extra,
            subprotocols=protocols or None,  # type: ignore[arg-type]
            compression=None,
            open_timeout=10,
            max_size=2**22,
        )
        client = cls(ws)
        if expect_ready and token is not None:
            ready = await client.recv()
            assert ready["type"] == "ready", ready
            client.ready = ready
        return client

    ready: dict[str, Any]

    async def send(self, message: dict[str, Any] | str) -> None:
        await self.ws.send(message if isinstance(message, str) else json.dumps(message))

    async def recv(self, timeout: float = 10.0) -> dict[str, Any]:
        raw = await asyncio.wait_for(self.ws.recv(), timeout)
        frame: dict[str, Any] = json.loads(raw)
        return frame

    async def next_frame(self, timeout: float = 10.0) -> dict[str, Any]:
        """The next frame, also filed under its request id."""
        frame = await self.recv(timeout)
        if "id" in frame and frame.get("type") in ("start", "delta", "end", "error"):
            self.by_id[frame["id"]].append(frame)
        else:
            self.other.append(frame)
        return frame

    async def until_terminal(self, request_id: str, timeout: float = 20.0) -> list[dict[str, Any]]:
        """Read until `request_id` has its end/error frame; its frames in arrival order."""
        async with asyncio.timeout(timeout):
            while not (self.by_id[request_id] and self.by_id[request_id][-1]["type"] in TERMINAL):
                await self.next_frame(timeout)
        return self.by_id[request_id]

    async def until_frame(self, request_id: str, kind: str | None = None, timeout: float = 10.0) -> None:
        """Read until `request_id` has a frame (of type `kind`, when given): it started streaming."""
        async with asyncio.timeout(timeout):
            while not any(kind is None or f["type"] == kind for f in self.by_id[request_id]):
                await self.next_frame(timeout)

    async def chat(self, request_id: str, text: str, **fields: Any) -> list[dict[str, Any]]:
        await self.send(
            {"type": "chat", "id": request_id, "messages": [{"role": "user", "content": text}], **fields}
        )
        return await self.until_terminal(request_id)

    async def wait_closed(self, timeout: float = 10.0) -> tuple[int | None, str | None]:
        """Drain until the server closes; (code, reason)."""
        try:
            async with asyncio.timeout(timeout):
                while True:
                    await self.ws.recv()
        except ConnectionClosed as exc:
            rcvd = exc.rcvd
            return (rcvd.code, rcvd.reason) if rcvd is not None else (None, None)

    async def close(self) -> None:
        await self.ws.close()


def text_of(frames: list[dict[str, Any]]) -> str:
    return "".join(f["text"] for f in frames if f["type"] == "delta")


def seqs_of(frames: list[dict[str, Any]]) -> list[int]:
    return [f["seq"] for f in frames]
