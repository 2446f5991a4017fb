"""`hubgate dev` as the README runs it: a child process that prints how to connect, then serves."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import sys
from collections.abc import AsyncIterator

import httpx
import pytest

from tests.support.client import Client, text_of
from tests.support.emulator_server import EmulatorServer
from tests.support.redis_server import free_port

DEMO_TENANTS = {"acme", "globex", "initech"}  # src/hubgate/data/demo-tenants.yaml
CHAT_COMMAND = re.compile(r"hubgate chat --url (\S+) --token (\S+)\n")


class Dev:
    def __init__(self, process: asyncio.subprocess.Process, banner: str) -> None:
        self.process = process
        self.banner = banner

    def token(self, tenant: str) -> str:
        match = re.search(rf"^  {tenant}\s+(\S+)", self.banner, re.MULTILINE)
        assert match, self.banner
        return match.group(1)


@contextlib.asynccontextmanager
async def running_dev(*options: str) -> AsyncIterator[Dev]:
    """`hubgate dev` with `options`, once it has printed its banner (ending with the chat command)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("HUBGATE_")}
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "hubgate",
        "dev",
        *options,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        env=env,
    )
    assert process.stdout is not None
    seen: list[str] = []
    try:
        async with asyncio.timeout(60):
            while not CHAT_COMMAND.search("".join(seen)):
                line = await process.stdout.readline()
                if not line:
                    raise AssertionError(f"hubgate dev exited:\n{''.join(seen)}")
                seen.append(line.decode())
        yield Dev(process, "".join(seen))
    finally:
        if process.returncode is None:
            process.terminate()
            await asyncio.wait_for(process.wait(), 30)


@pytest.fixture
async def dev() -> AsyncIterator[Dev]:
    port, emulator_port = free_port(), free_port()
    async with running_dev("--port", str(port), "--emulator-port", str(emulator_port)) as running:
        yield running


async def test_dev_prints_how_to_connect_and_serves_a_chat(dev: Dev) -> None:
    url = re.search(r"gateway\s+(ws://\S+)", dev.banner)
    assert url, dev.banner
    assert "emulator  http://127.0.0.1:" in dev.banner and "limiter   in memory" in dev.banner
    assert {t for t in DEMO_TENANTS if re.search(rf"^  {t}\s+\S+", dev.banner, re.MULTILINE)} == DEMO_TENANTS
    command = CHAT_COMMAND.search(dev.banner)
    assert command and command.group(1) == url.group(1)

    client = await Client.open(command.group(1), command.group(2))
    frames = await client.chat("r1", "[[emulator:reply=red green blue]] [[emulator:ttft_ms=0]]")
    assert frames[-1]["type"] == "end" and frames[-1]["stop_reason"] == "end_turn"
    assert text_of(frames) == "red green blue"
    await client.close()

    http_base = url.group(1).replace("ws://", "http://").removesuffix("/v1/stream")
    async with httpx.AsyncClient() as http:
        auth = {"Authorization": f"Bearer {dev.token('acme')}"}
        models = await http.get(f"{http_base}/v1/models", headers=auth)
        assert models.status_code == 200 and models.json()["tenant"] == "acme" and models.json()["models"]
        assert (await http.get(f"{http_base}/playground")).status_code == 200


async def test_dev_uses_another_bedrock_stand_in_when_named(emulator: EmulatorServer) -> None:
    port, unused = free_port(), free_port()
    options = ("--port", str(port), "--emulator-port", str(unused), "--bedrock-url", emulator.url)
    async with running_dev(*options) as dev:
        assert f"bedrock   {emulator.url}" in dev.banner and "emulator  " not in dev.banner
        client = await Client.open(f"ws://127.0.0.1:{port}/v1/stream", dev.token("acme"))
        marker = f"standin{port}"
        frames = await client.chat("r1", f"{marker} [[emulator:tokens=3]] [[emulator:ttft_ms=0]]")
        assert frames[-1]["type"] == "end"
        await client.close()
        async with httpx.AsyncClient() as http:
            records = (await http.get(f"{emulator.url}/_emulator/requests")).json()
            assert [r for r in records if marker in json.dumps(r["body"])]  # served by the named endpoint
            with pytest.raises(httpx.ConnectError):  # and no embedded emulator was started
                await http.get(f"http://127.0.0.1:{unused}/_emulator/health")
