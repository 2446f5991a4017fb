"""`hubgate chat`: a terminal client for the `hubgate.v1` protocol.

Type a message and press Enter; the reply streams in as it arrives. Ctrl-C while a reply is
streaming cancels that reply; Ctrl-C at the prompt (or Ctrl-D) quits. Commands:
``/model NAME``, ``/models``, ``/new``, ``/system TEXT``, ``/usage``, ``/quit``.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, TextIO

import orjson
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from hubgate.protocol import SUBPROTOCOL


@dataclass(slots=True)
class Usage:
    input_tokens: int = 0
    output_tokens: int = 0
    replies: int = 0


@dataclass(slots=True)
class ChatState:
    """What the client remembers between turns (the conversation lives client-side)."""

    model: str | None = None
    system: str | None = None
    max_tokens: int | None = None
    models: list[str] = field(default_factory=list)
    history: list[dict[str, str]] = field(default_factory=list)
    usage: Usage = field(default_factory=Usage)


def describe_error(frame: dict[str, Any]) -> str:
    """One plain line for an `error` frame."""
    code = frame.get("code", "error")
    message = frame.get("message", "")
    retry = frame.get("retry_after")
    suffix = f" (retry in {retry:.1f}s)" if isinstance(retry, int | float) else ""
    return f"[{code}] {message}{suffix}"


def status_line(end: dict[str, Any], elapsed: float) -> str:
    """`ttft 312 ms · 42 tokens · 38.1 tok/s · end_turn`"""
    usage = end.get("usage", {})
    metrics = end.get("metrics", {})
    out_tokens = int(usage.get("output_tokens", 0))
    ttft = metrics.get("ttft_ms")
    rate = out_tokens / elapsed if elapsed > 0 else 0.0
    ttft_text = f"ttft {ttft:.0f} ms" if isinstance(ttft, int | float) else "ttft -"
    return (
        f"{ttft_text} · in {usage.get('input_tokens', 0)} / out {out_tokens} tokens · "
        f"{rate:.1f} tok/s · {end.get('stop_reason', '?')}"
    )


class ChatClient:
    def __init__(self, url: str, token: str, state: ChatState, out: TextIO = sys.stdout) -> None:
        self.url = url
        self.token = token
        self.state = state
        self.out = out
        self.ws: ClientConnection | None = None
        self.current: str | None = None
        self.frames: asyncio.Queue[dict[str, Any]] = asyncio.Queue()

    def print(self, text: str = "", end: str = "\n") -> None:
        self.out.write(text + end)
        self.out.flush()

    async def connect(self) -> dict[str, Any]:
        self.ws = await connect(
            self.url,
            additional_headers={"Authorization": f"Bearer {self.token}"},
            subprotocols=[SUBPROTOCOL],  # type: ignore[list-item]
            compression=None,
            open_timeout=10,
        )
        ready = orjson.loads(await self.ws.recv())
        if ready.get("type") != "ready":
            raise RuntimeError(f"unexpected first frame {ready!r}")
        self.state.models = list(ready.get("models", []))
        if self.state.model is None:
            self.state.model = ready.get("default_model")
        return dict(ready)

    async def receive_loop(self) -> None:
        assert self.ws is not None
        async for raw in self.ws:
            frame = orjson.loads(raw)
            kind = frame.get("type")
            if kind == "auth.expiring":
                self.print("\n(the token expires soon; reconnect with a fresh one)")
            elif kind in ("start", "delta", "end", "error"):
                await self.frames.put(frame)

    async def ask(self, text: str) -> None:
        assert self.ws is not None
        request_id = uuid.uuid4().hex
        self.current = request_id
        messages = [*self.state.history, {"role": "user", "content": text}]
        message: dict[str, Any] = {"type": "chat", "id": request_id, "messages": messages}
        if self.state.model:
            message["model"] = self.state.model
        if self.state.system:
            message["system"] = self.state.system
        if self.state.max_tokens:
            message["max_tokens"] = self.state.max_tokens
        sent_at = time.monotonic()
        await self.ws.send(orjson.dumps(message).decode())
        reply: list[str] = []
        while True:
            frame = await self.frames.get()
            if frame.get("id") != request_id:
                continue
            kind = frame["type"]
            if kind == "delta":
                reply.append(frame["text"])
                self.print(frame["text"], end="")
            elif kind == "end":
                self.print()
                self.print(status_line(frame, time.monotonic() - sent_at))
                usage = frame.get("usage", {})
                self.state.usage.input_tokens += int(usage.get("input_tokens", 0))
                self.state.usage.output_tokens += int(usage.get("output_tokens", 0))
                self.state.usage.replies += 1
                if frame.get("stop_reason") != "cancelled":
                    self.state.history += [
                        {"role": "user", "content": text},
                        {"role": "assistant", "content": "".join(reply)},
                    ]
                break
            elif kind == "error":
                if reply:
                    self.print()
                self.print(describe_error(frame))
                break
        self.current = None

    async def cancel(self) -> None:
        if self.ws is not None and self.current is not None:
            await self.ws.send(orjson.dumps({"type": "cancel", "id": self.current}).decode())

    def command(self, line: str) -> bool:
        """Handle a /command; False to quit."""
        name, _, arg = line.partition(" ")
        arg = arg.strip()
        if name in ("/quit", "/exit"):
            return False
        if name == "/model":
            if arg and self.state.models and arg not in self.state.models:
                self.print(f"unknown model; choose one of: {', '.join(self.state.models)}")
            elif arg:
                self.state.model = arg
                self.print(f"model: {arg}")
            else:
                self.print(f"model: {self.state.model}")
        elif name == "/models":
            for model in self.state.models:
                self.print(("* " if model == self.state.model else "  ") + model)
        elif name == "/new":
            self.state.history.clear()
            self.state.usage = Usage()
            self.print("new conversation")
        elif name == "/system":
            self.state.system = arg or None
            self.print("system prompt " + ("set" if arg else "cleared"))
        elif name == "/usage":
            u = self.state.usage
            self.print(f"{u.replies} replies · {u.input_tokens} input + {u.output_tokens} output tokens")
        else:
            self.print("commands: /model NAME, /models, /new, /system TEXT, /usage, /quit")
        return True


async def _stdin_reader() -> asyncio.StreamReader:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    return reader


async def run_chat(url: str, token: str, *, model: str | None = None, max_tokens: int | None = None) -> int:
    state = ChatState(model=model, max_tokens=max_tokens)
    client = ChatClient(url, token, state)
    try:
        ready = await client.connect()
    except InvalidStatus as exc:
        body = exc.response.body.decode("utf-8", "replace") if exc.response.body else ""
        client.print(f"connection refused: HTTP {exc.response.status_code} {body}")
        return 1
    except OSError as exc:
        client.print(f"cannot connect to {url}: {exc}")
        return 1
    client.print(
        f"connected as {ready['user']} of {ready['tenant']} · model {state.model} · /help for commands"
    )
    receiver = asyncio.create_task(client.receive_loop())
    stdin = await _stdin_reader()
    loop = asyncio.get_running_loop()
    quit_event = asyncio.Event()
    pending: set[asyncio.Future[None]] = set()

    def on_sigint() -> None:
        if client.current is not None:
            pending.add(asyncio.ensure_future(client.cancel()))
        else:
            quit_event.set()

    with contextlib.suppress(NotImplementedError):
        loop.add_signal_handler(signal.SIGINT, on_sigint)
    code = 0
    try:
        while not quit_event.is_set():
            client.print("> ", end="")
            line_task = asyncio.ensure_future(stdin.readline())
            quit_task = asyncio.ensure_future(quit_event.wait())
            done, _ = await asyncio.wait(
                {line_task, quit_task, receiver}, return_when=asyncio.FIRST_COMPLETED
            )
            quit_task.cancel()
            if receiver in done:
                line_task.cancel()
                client.print("\nconnection closed by the server")
                code = 1
                break
            if line_task not in done:
                line_task.cancel()
                break
            raw = line_task.result()
            if not raw:
                break
            line = raw.decode().strip()
            if not line:
                continue
            if line.startswith("/"):
                if not client.command(line):
                    break
                continue
            ask = asyncio.ensure_future(client.ask(line))
            done, _ = await asyncio.wait({ask, receiver}, return_when=asyncio.FIRST_COMPLETED)
            if receiver in done:
                ask.cancel()
                client.print("\nconnection closed by the server")
                code = 1
                break
    except ConnectionClosed:
        client.print("\nconnection closed")
        code = 1
    finally:
        receiver.cancel()
        if client.ws is not None:
            await client.ws.close()
    client.print()
    return code
