"""Rolling restart under load: no token lost, none duplicated.

Starts a private redis-server, the Bedrock emulator and two `hubgate serve` processes behind a
small TCP balancer (new connections go to a live instance, as an ALB does after deregistration),
runs a steady load of streaming chats, restarts each gateway in turn with SIGTERM (drain), and
checks every reply the clients assembled — across reconnects and resumes — against the text the
emulator was asked to send.

    .venv/bin/python loadtests/rolling_restart.py [--clients 20] [--seconds 30]

Everything listens on 127.0.0.1 (free ports); the load is bounded in clients and time.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import random
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.support.emulator_server import EmulatorServer
from tests.support.gateway_server import TEST_SECRET, GatewayProcess, free_port, gateway_settings
from tests.support.redis_server import RedisServer
from tests.support.tcp_proxy import TcpProxy

from hubgate.tokens import mint_dev_token


@dataclass
class Tally:
    completed: int = 0
    exact: int = 0
    lost_or_duplicated: int = 0
    resumes: int = 0
    errors: dict[str, int] = field(default_factory=dict)


async def one_chat(url: str, token: str, tally: Tally, words: list[str]) -> None:
    request_id = uuid.uuid4().hex
    expected = " ".join(words)
    message = {
        "type": "chat",
        "id": request_id,
        "messages": [
            {"role": "user", "content": f"[[emulator:reply={expected}]] [[emulator:token_delay_ms=30]]"}
        ],
    }
    texts: list[str] = []
    last = -1
    sent = False
    for attempt in range(20):
        try:
            async with connect(
                url,
                additional_headers={"Authorization": f"Bearer {token}"},
                compression=None,
                open_timeout=10,
            ) as ws:
                await ws.recv()  # ready
                if not sent:
                    await ws.send(json.dumps(message))
                    sent = True
                else:
                    tally.resumes += 1
                    await ws.send(json.dumps({"type": "resume", "id": request_id, "after": last}))
                async for raw in ws:
                    frame = json.loads(raw)
                    if frame.get("id") != request_id or "seq" not in frame:
                        continue
                    if frame["seq"] != last + 1:
                        tally.lost_or_duplicated += 1
                        return
                    last = frame["seq"]
                    if frame["type"] == "delta":
                        texts.append(frame["text"])
                    elif frame["type"] == "end":
                        tally.completed += 1
                        tally.exact += "".join(texts) == expected
                        if "".join(texts) != expected:
                            tally.lost_or_duplicated += 1
                        return
                    elif frame["type"] == "error":
                        tally.errors[frame["code"]] = tally.errors.get(frame["code"], 0) + 1
                        return
        except (ConnectionClosed, OSError, InvalidStatus, TimeoutError):
            await asyncio.sleep(min(2.0, 0.1 * 2**attempt) * random.uniform(0.5, 1.0))
    tally.errors["gave_up"] = tally.errors.get("gave_up", 0) + 1


async def main(clients: int, seconds: float) -> int:
    redis = RedisServer()
    redis.start()
    emulator = EmulatorServer()
    emulator.start()
    base = gateway_settings(emulator.url, redis_url=redis.url, drain_seconds=60)
    gateways = [GatewayProcess(base.replace(port=free_port(), instance_id=f"gw{i}")) for i in range(2)]
    for gateway in gateways:
        gateway.start()
    balancer = TcpProxy(gateways[0].port)
    await balancer.start()
    url = f"ws://127.0.0.1:{balancer.port}/v1/stream"
    tally = Tally()
    deadline = time.monotonic() + seconds
    counter = itertools.count()

    async def client(n: int) -> None:
        token = mint_dev_token(TEST_SECRET, tenant="acme", user=f"load-{n}", lifetime_seconds=3600)
        while time.monotonic() < deadline:
            i = next(counter)
            await one_chat(url, token, tally, [f"c{n}t{i}w{j}" for j in range(40)])

    async def restarts() -> None:
        for round_ in range(2):
            await asyncio.sleep(seconds / 4)
            victim, other = gateways[round_ % 2], gateways[(round_ + 1) % 2]
            balancer.switch(other.port)
            print(f"restarting {victim.settings.instance_id} (SIGTERM)", flush=True)
            victim.terminate()
            code = await asyncio.to_thread(victim.wait, 90)
            print(f"  exited with {code}", flush=True)
            victim.start()

    try:
        await asyncio.gather(restarts(), *(client(n) for n in range(clients)))
    finally:
        await balancer.stop()
        for gateway in gateways:
            gateway.stop()
        emulator.stop()
        redis.stop()
    print(
        f"completed {tally.completed} streams, exact {tally.exact}, resumed {tally.resumes} times, "
        f"lost or duplicated {tally.lost_or_duplicated}, errors {tally.errors}"
    )
    return 0 if tally.lost_or_duplicated == 0 and not tally.errors and tally.completed > 0 else 1


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--seconds", type=float, default=30.0)
    args = parser.parse_args()
    raise SystemExit(asyncio.run(main(min(args.clients, 200), min(args.seconds, 600.0))))
