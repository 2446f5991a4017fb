"""`hubgate chat`: a terminal client for the `hubgate.v1` protocol.

Type a message and press Enter; the reply streams in as it arrives. Ctrl-C while a reply is
streaming cancels that reply; Ctrl-C at the prompt (or Ctrl-D) quits. The conversation is kept
in a server-side session. When the connection drops (1006) or the server restarts (1012) the
client reconnects with backoff and resumes the reply in progress from the last frame it saw.
Commands: ``/model NAME``, ``/models``, ``/new``, ``/system TEXT``, ``/usage``, ``/quit``.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
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

# Close codes worth reconnecting for: abnormal closure (network), going away, service restart.
RECONNECT_CODES = frozenset({1001, 1006, 1012, None})
BACKOFF_FIRST = 0.25
BACKOFF_MAX = 5.0
RECONNECT_ATTEMPTS = 8

# Estimated list prices (USD per 1k tokens: input, output) for the demo models; /usage shows
# them as an estimate. Unknown models show tokens only.
PRICES: dict[str, tuple[float, float]] = {
    "anthropic.claude-3-5-haiku-20241022-v1:0": (0.0008, 0.004),
    "amazon.nova-lite-v1:0": (0.00006, 0.00024),
    "amazon.nova-pro-v1:0": (0.0008, 0.0032),
}


@dataclass(slots=True)
class Usage:
    input_tokens: int = 0
    output_tokens: int = 0
    replies: int = 0
    cost_usd: float = 0.0


@dataclass(slots=True)
class ChatState:
    model: str | None = None
    system: str | None = None
    max_tokens: int | None = None
    models: list[str] = field(default_factory=list)
    session: str | None = None
    usage: Usage = field(default_factory=Usage)


def describe_error(frame: dict[str, Any]) -> str:
    """One plain line for an `error` frame."""
    code = frame.get("code", "error")
    message = frame.get("message", "")
    retry = frame.get("retry_after")
    suffix = f" (retry in {retry:.1f}s)" if isinstance(retry, int | float) else ""
    return f"[{code}] {message}{suffix}"


def status_line(end: dict[str, Any], elapsed: float) -> str:
    """`ttft 312 ms · in 12 / out 42 tokens · 38.1 tok/s · end_turn`"""
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


def cost_of(model: str | None, input_tokens: int, output_tokens: int) -> float:
    price = PRICES.get(model or "")
    if price is None:
        return 0.0
    return input_tokens / 1000 * price[0] + output_tokens / 1000 * price[1]


class Disconnected(Exception):
    """The connection is gone and could not be re-established."""


class ChatClient:
    def __init__(self, url: str, token: str, state: ChatState, out: TextIO = sys.stdout) -> None:
        self.url = url
        self.token = token
        self.state = state
        self.out = out
        self.ws: ClientConnection | None = None
        self.current: str | None = None  # the request whose reply is streaming
        self.last_seq = -1
        self.frames: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.replies: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.closing = False

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

    async def request(self, message: dict[str, Any]) -> dict[str, Any]:
        """Send a non-streaming message (session.*) and wait for its answer."""
        assert self.ws is not None
        message = {**message, "id": uuid.uuid4().hex}
        await self.ws.send(orjson.dumps(message).decode())
        while True:
            frame = await self.replies.get()
            if frame.get("id") == message["id"]:
                return frame

    async def new_session(self) -> None:
        answer = await self.request({"type": "session.create", "system": self.state.system})
        if answer.get("type") != "session":
            raise RuntimeError(describe_error(answer))
        self.state.session = answer["session"]

    async def receive_loop(self) -> None:
        """Read frames; on a drop or a restart reconnect and resume the reply in progress."""
        while True:
            assert self.ws is not None
            try:
                async for raw in self.ws:
                    self._route(orjson.loads(raw))
                code = self.ws.close_code
            except ConnectionClosed as exc:
                code = exc.rcvd.code if exc.rcvd is not None else None
            if self.closing:
                return
            if code not in RECONNECT_CODES:
                raise Disconnected(f"connection closed by the server ({code})")
            await self._reconnect()

    def _route(self, frame: dict[str, Any]) -> None:
        kind = frame.get("type")
        if kind in ("start", "delta", "end", "error") and "seq" in frame:
            if frame.get("id") != self.current or frame["seq"] <= self.last_seq:
                return  # another request's, or a repeat after a resume
            self.last_seq = frame["seq"]
            self.frames.put_nowait(frame)
        elif kind == "error" and self.current is not None and frame.get("id") == self.current:
            # Refused before it started (no seq): invalid_message, model_not_allowed,
            # token_expired, message_rate_limited, or stream_not_found after a resume.
            self.frames.put_nowait(frame)
        elif kind == "auth.expiring":
            self.print("\n(the token expires soon; start the client again with a fresh one)")
        elif kind == "draining":
            pass  # the close (1012) that follows triggers the reconnect
        else:
            self.replies.put_nowait(frame)

    async def _reconnect(self) -> None:
        delay = BACKOFF_FIRST
        for _ in range(RECONNECT_ATTEMPTS):
            self.print("\n(reconnecting...)", end="")
            await asyncio.sleep(delay * random.uniform(0.5, 1.0))
            try:
                await self.connect()
            except (OSError, InvalidStatus, TimeoutError):
                delay = min(BACKOFF_MAX, delay * 2)
                continue
            self.print(" (reconnected)")
            if self.current is not None and self.ws is not None:
                resume = {"type": "resume", "id": self.current, "after": self.last_seq}
                await self.ws.send(orjson.dumps(resume).decode())
            return
        raise Disconnected("could not reconnect")

    async def ask(self, text: str) -> None:
        assert self.ws is not None
        request_id = uuid.uuid4().hex
        self.current, self.last_seq = request_id, -1
        message: dict[str, Any] = {
            "type": "chat",
            "id": request_id,
            "messages": [{"role": "user", "content": text}],
        }
        if self.state.session:
            message["session"] = self.state.session
        if self.state.model:
            message["model"] = self.state.model
        if self.state.system:
            message["system"] = self.state.system
        if self.state.max_tokens:
            message["max_tokens"] = self.state.max_tokens
        sent_at = time.monotonic()
        await self.ws.send(orjson.dumps(message).decode())
        try:
            await self._show_reply(sent_at)
        finally:
            self.current = None

    async def _show_reply(self, sent_at: float) -> None:
        printed = False
        while True:
            frame = await self.frames.get()
            kind = frame["type"]
            if kind == "delta":
                self.print(frame["text"], end="")
                printed = True
            elif kind == "end":
                self.print()
                self.print(status_line(frame, time.monotonic() - sent_at))
                usage = frame.get("usage", {})
                u = self.state.usage
                u.input_tokens += int(usage.get("input_tokens", 0))
                u.output_tokens += int(usage.get("output_tokens", 0))
                u.cost_usd += cost_of(
                    self.state.model, int(usage.get("input_tokens", 0)), int(usage.get("output_tokens", 0))
                )
                u.replies += 1
                return
            elif kind == "error":
                if printed:
                    self.print()
                self.print(describe_error(frame))
                return

    async def cancel(self) -> None:
        if self.ws is not None and self.current is not None:
            with contextlib.suppress(ConnectionClosed):
                await self.ws.send(orjson.dumps({"type": "cancel", "id": self.current}).decode())

    async def command(self, line: str) -> bool:
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
            await self.new_session()
            self.state.usage = Usage()
            self.print("new conversation")
        elif name == "/system":
            self.state.system = arg or None
            self.print("system prompt " + ("set" if arg else "cleared"))
        elif name == "/usage":
            u = self.state.usage
            self.print(
                f"{u.replies} replies · {u.input_tokens} input + {u.output_tokens} output tokens"
                f" · ~${u.cost_usd:.5f} (estimate)"
            )
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
    receiver = asyncio.create_task(client.receive_loop())
    try:
        await client.new_session()
    except RuntimeError as exc:
        client.print(f"cannot start a session: {exc}")
        receiver.cancel()
        return 1
    client.print(
        f"connected as {ready['user']} of {ready['tenant']} · model {state.model} · /help for commands"
    )
    stdin = await _stdin_reader()
    loop = asyncio.get_running_loop()
    quit_event = asyncio.Event()
    pending: set[asyncio.Future[None]] = set()

    def on_sigint() -> None:
        if client.current is not None:
            future = asyncio.ensure_future(client.cancel())
            pending.add(future)
            future.add_done_callback(pending.discard)
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
                if not await client.command(line):
                    break
                continue
            ask = asyncio.ensure_future(client.ask(line))
            done, _ = await asyncio.wait({ask, receiver}, return_when=asyncio.FIRST_COMPLETED)
            if receiver in done:
                ask.cancel()
                break
    finally:
        client.closing = True
        if receiver.done() and not receiver.cancelled() and receiver.exception() is not None:
            client.print(f"\n{receiver.exception()}")
            code = 1
        receiver.cancel()
        if client.ws is not None:
            await client.ws.close()
    client.print()
    return code
