"""`hubgate chat` as a user runs it: a child process fed on stdin, against real gateways."""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections.abc import Callable

import httpx
import pytest

from tests.support.emulator_server import EmulatorServer
from tests.support.gateway_server import GatewayProcess, free_port, gateway_settings, running_gateway
from tests.support.redis_server import RedisServer
from tests.support.tcp_proxy import TcpProxy

Mint = Callable[..., str]


async def start_chat(url: str, token: str, *options: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "hubgate",
        "chat",
        "--url",
        url,
        "--token",
        token,
        *options,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )


async def read_until(
    process: asyncio.subprocess.Process, needle: str, seen: list[str], timeout: float = 30
) -> None:
    assert process.stdout is not None
    async with asyncio.timeout(timeout):
        while needle not in "".join(seen):
            chunk = await process.stdout.read(4096)
            if not chunk:
                raise AssertionError(f"chat exited before printing {needle!r}:\n{''.join(seen)}")
            seen.append(chunk.decode())


async def send_line(process: asyncio.subprocess.Process, line: str) -> None:
    assert process.stdin is not None
    process.stdin.write((line + "\n").encode())
    await process.stdin.drain()


async def test_chat_streams_multi_turn_with_a_server_session(emulator: EmulatorServer, mint: Mint) -> None:
    settings = gateway_settings(emulator.url)
    async with running_gateway(settings):
        chat = await start_chat(f"ws://127.0.0.1:{settings.port}/v1/stream", mint())
        out: list[str] = []
        await read_until(chat, "connected as alice of acme", out)
        marker = f"cli{time.time_ns()}"
        await send_line(chat, f"{marker} one [[emulator:reply=red green blue]]")
        await read_until(chat, "end_turn", out)
        await send_line(chat, f"{marker} two [[emulator:reply=cyan magenta]]")
        await read_until(chat, "cyan magenta", out)
        await send_line(chat, "/usage")
        await read_until(chat, "2 replies", out)
        await send_line(chat, "/model amazon.nova-lite-v1:0")
        await read_until(chat, "model: amazon.nova-lite-v1:0", out)
        await send_line(chat, "/model gpt-4")
        await read_until(chat, "unknown model", out)
        assert chat.stdin is not None
        chat.stdin.close()
        assert await asyncio.wait_for(chat.wait(), 15) == 0
        text = "".join(out)
        assert "red green blue" in text and "ttft" in text

        async with httpx.AsyncClient() as http:
            records = (await http.get(f"{emulator.url}/_emulator/requests")).json()
        second = [r for r in records if f"{marker} two" in json.dumps(r["body"])][-1]
        # The second turn carried the first one from the server-side session.
        assert len(second["body"]["messages"]) == 3
        assert second["body"]["messages"][1]["content"][0]["text"] == "red green blue"


@pytest.mark.parametrize(
    ("options", "code"),
    [
        (("--max-tokens", "300000"), "invalid_message"),
        (("--model", "bogus.model-v1:0"), "model_not_allowed"),
    ],
)
async def test_a_request_refused_before_it_starts_is_shown_and_the_client_goes_on(
    emulator: EmulatorServer, mint: Mint, options: tuple[str, ...], code: str
) -> None:
    settings = gateway_settings(emulator.url)
    async with running_gateway(settings):
        chat = await start_chat(f"ws://127.0.0.1:{settings.port}/v1/stream", mint(), *options)
        out: list[str] = []
        await read_until(chat, "connected as", out)
        await send_line(chat, "hello")
        await read_until(chat, f"[{code}]", out)
        await send_line(chat, "/usage")  # the prompt came back: the client is not stuck on the reply
        await read_until(chat, "0 replies", out)
        await send_line(chat, "/quit")
        assert await asyncio.wait_for(chat.wait(), 15) == 0


async def test_ctrl_c_cancels_the_reply_not_the_client(emulator: EmulatorServer, mint: Mint) -> None:
    settings = gateway_settings(emulator.url)
    async with running_gateway(settings):
        chat = await start_chat(f"ws://127.0.0.1:{settings.port}/v1/stream", mint())
        out: list[str] = []
        await read_until(chat, "connected as", out)
        words = " ".join(f"w{i}" for i in range(300))
        await send_line(chat, f"[[emulator:reply={words}]] [[emulator:token_delay_ms=20]]")
        await read_until(chat, "w3 ", out)
        chat.send_signal(2)  # SIGINT, as Ctrl-C
        await read_until(chat, "cancelled", out)
        await send_line(chat, "[[emulator:reply=still alive]]")
        await read_until(chat, "still alive", out)
        assert chat.stdin is not None
        chat.stdin.close()
        assert await asyncio.wait_for(chat.wait(), 15) == 0


@pytest.mark.slow
async def test_chat_resumes_across_a_rolling_restart(
    emulator: EmulatorServer, mint: Mint, redis_server: RedisServer
) -> None:
    base = gateway_settings(emulator.url, redis_url=redis_server.url, drain_seconds=30)
    old = GatewayProcess(base.replace(port=free_port(), instance_id="old"))
    new = GatewayProcess(base.replace(port=free_port(), instance_id="new"))
    old.start()
    new.start()
    balancer = TcpProxy(old.port)
    await balancer.start()
    try:
        chat = await start_chat(f"ws://127.0.0.1:{balancer.port}/v1/stream", mint())
        out: list[str] = []
        await read_until(chat, "connected as", out)
        words = " ".join(f"r{i}" for i in range(80))
        await send_line(chat, f"[[emulator:reply={words}]] [[emulator:token_delay_ms=40]]")
        await read_until(chat, "r5 ", out)
        balancer.switch(new.port)  # the load balancer stops sending new connections to `old`
        old.terminate()  # ...which drains: close 1012 at once, its stream keeps filling the buffer
        await read_until(chat, "end_turn", out, timeout=60)
        text = "".join(out)
        assert "(reconnected)" in text
        # The reply arrives whole: no word lost, none repeated, across the reconnect.
        reply = text.split("> ", 1)[1]
        tokens = [
            t
            for t in reply.replace("(reconnecting...)", " ").replace("(reconnected)", " ").split()
            if t.startswith("r") and t[1:].isdigit()
        ]
        assert tokens == words.split()
        assert chat.stdin is not None
        chat.stdin.close()
        assert await asyncio.wait_for(chat.wait(), 15) == 0
        assert old.wait(timeout=40) == 0
    finally:
        await balancer.stop()
        old.stop()
        new.stop()
