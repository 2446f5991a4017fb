"""Dependency faults under a steady load of streaming chats.

Starts a private redis-server, the Bedrock emulator, a JWKS server, moto's DynamoDB (behind a
switchable TCP proxy) holding the tenants table, and two `hubgate serve` processes that share
them: one with `HUBGATE_RATE_LIMIT_FAILURE_MODE=local`, one with `closed`. Clients open a new
connection for every chat (so every handshake meets the current fault) or keep one open, and
stream replies from both gateways while, one at a time:

- Redis is killed (SIGKILL) and restarted;
- the emulator is killed mid-stream (SIGKILL) and restarted on the same port;
- replies stall (`[[emulator:fault=stall]]`) past `HUBGATE_UPSTREAM_READ_TIMEOUT`;
- the JWKS endpoint stops answering (keys fetched at start must keep working);
- DynamoDB becomes unreachable (the last good copy of the tenants must keep being served).

After each fault both gateways must be alive (`/healthz` 200) and serve again without a restart.
At the end: every chat got exactly one terminal frame (streams lost = 0) with the documented
outcome of its fault, every request that reached the model is metered exactly once (one EMF line
per request id on the gateway's stdout), and no stream or connection is left behind.
The figures go into docs/reliability.md between `<!-- faults:begin -->` and `<!-- faults:end -->`.

    .venv/bin/python loadtests/faults.py [--short] [--no-write | --doc PATH]

`--short` is the CI size (about a minute); the default is the full run (a few minutes). Every
server listens on 127.0.0.1 on free ports; clients and time are bounded.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import yaml
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.support.emulator_server import EmulatorServer
from tests.support.gateway_server import AWS_ENV, GatewayProcess, free_port, gateway_settings
from tests.support.jwks_server import JwksServer, RsaKeySet
from tests.support.process_checks import error_records, readyz, vm_rss_kib
from tests.support.redis_server import RedisServer
from tests.support.tcp_proxy import TcpProxy

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "reliability.md"
BEGIN, END = "<!-- faults:begin -->", "<!-- faults:end -->"
NOVA = "amazon.nova-lite-v1:0"
TENANT = "faultco"
TABLE = "hubgate-faults"
ISSUER = "https://cognito-idp.us-east-1.amazonaws.com/us-east-1_FAULTS"
AUDIENCE = "hubgate-faults"
READ_TIMEOUT = 2.0  # HUBGATE_UPSTREAM_READ_TIMEOUT: a stalled reply fails after this long
REDIS_TIMEOUT_MS = 500  # HUBGATE_REDIS_TIMEOUT_MS
CHAT_DEADLINE = 30.0  # a chat without its terminal frame by then counts as lost
REFUSAL_BACKOFF = 0.2  # seconds a client waits after a refusal before its next request
# Codes a request can be refused with before it reaches the model: those are not metered.
NOT_ADMITTED = {
    "rate_limited",
    "token_rate_limited",
    "limiter_unavailable",
    "too_many_streams",
    "budget_exhausted",
}


@dataclass(frozen=True)
class Plan:
    mode: str
    clients_per_gateway: int
    baseline: float  # seconds of load before the first fault
    hold: float  # how long each fault lasts
    reply_tokens: int
    token_delay_ms: int
    recovery_timeout: float


SHORT = Plan("short", clients_per_gateway=4, baseline=2.0, hold=3.0, reply_tokens=12, token_delay_ms=25,
             recovery_timeout=30.0)  # fmt: skip
FULL = Plan("full", clients_per_gateway=20, baseline=10.0, hold=15.0, reply_tokens=20, token_delay_ms=25,
            recovery_timeout=60.0)  # fmt: skip


@dataclass(eq=False)
class Chat:
    request_id: str
    gateway: str
    phase: str
    probe: bool
    stall: bool
    started: float
    deltas: int = 0
    outcome: str | None = None  # "end" or the error code; None while running, or if lost
    ended: float | None = None


@dataclass
class Phase:
    name: str
    fault: str
    allowed: frozenset[str]  # outcomes documented for this fault
    allowed_refusals: frozenset[str] = frozenset()  # "<status> <code>" handshake refusals allowed
    connections: int = 0
    refusals: Counter[str] = field(default_factory=Counter)
    memory: dict[str, list[int]] = field(default_factory=dict)  # gateway -> [before, after] KiB
    recovery: dict[str, float] = field(default_factory=dict)  # gateway -> seconds to serve again
    notes: list[str] = field(default_factory=list)


class Run:
    """The shared state of one run: servers, the current phase, every chat."""

    def __init__(self, plan: Plan) -> None:
        self.plan = plan
        self.keys = RsaKeySet(rsa_kid="faults-rsa", ec_kid="faults-ec")
        self.redis = RedisServer()
        self.emulator = EmulatorServer(port=free_port())
        self.jwks = JwksServer(self.keys)
        self.moto: Any = None
        self.dynamo_proxy: TcpProxy | None = None
        self.gateways: dict[str, GatewayProcess] = {}
        self.phase: Phase | None = None
        self.phases: list[Phase] = []
        self.chats: list[Chat] = []
        self.in_flight: set[Chat] = set()
        self.stopping = False
        self.failures: list[str] = []
        self.metering: dict[str, int] = {}
        self.errors_logged: dict[str, Counter[str]] = {}
        self.tmp = Path(tempfile.mkdtemp(prefix="hubgate-faults-"))

    # ------------------------------------------------------------------ setup and teardown

    def dynamodb_available(self) -> bool:
        return (
            importlib.util.find_spec("hubgate.registry.dynamodb") is not None
            and Path(sys.executable).with_name("moto_server").exists()
        )

    async def start(self) -> None:
        await asyncio.to_thread(self.redis.start)
        await asyncio.to_thread(self.emulator.start)
        self.jwks.start()
        tenants = {
            "tenants": {
                TENANT: {
                    "models": [NOVA],
                    "default_max_tokens": 64,
                    # Generous (the run is about faults, not limits), but limited: every decision
                    # goes through the limiter, and in `local` mode through its fallback.
                    "limits": {
                        "requests_per_minute": 60_000,
                        "tokens_per_minute": 50_000_000,
                        "max_connections": 2_000,
                        "max_concurrent_streams": 1_000,
                    },
                }
            }
        }
        tenants_path = self.tmp / "tenants.yaml"
        tenants_path.write_text(yaml.safe_dump(tenants))
        table_settings: dict[str, Any] = {"tenants_file": str(tenants_path)}
        if self.dynamodb_available():
            table_settings = await self.start_dynamodb(tenants_path)
        base = gateway_settings(
            self.emulator.url,
            jwt_hs256_secret=None,
            jwt_jwks_url=self.jwks.url,
            jwt_issuer=ISSUER,
            jwt_audience=AUDIENCE,
            redis_url=self.redis.url,
            upstream_read_timeout=READ_TIMEOUT,
            # Everything shares two cores here: a busy moment can exceed the 50 ms default, which
            # the `closed` gateway would count as a Redis failure. A dead Redis fails at once.
            redis_timeout_ms=REDIS_TIMEOUT_MS,
            log_level="info",
            **table_settings,
        )
        for mode in ("local", "closed"):
            name = f"gw-{mode}"
            settings = base.replace(port=free_port(), instance_id=name, rate_limit_failure_mode=mode)
            gateway = GatewayProcess(settings)
            await asyncio.to_thread(gateway.start)
            self.gateways[name] = gateway

    async def start_dynamodb(self, tenants_path: Path) -> dict[str, Any]:
        from tests.support.moto_server import MOTO_ENV, MotoServer

        self.moto = MotoServer()
        await asyncio.to_thread(self.moto.start)
        self.dynamo_proxy = TcpProxy(self.moto.port)
        await self.dynamo_proxy.start()
        endpoint = f"http://127.0.0.1:{self.dynamo_proxy.port}"
        env = {
            **os.environ,
            **MOTO_ENV,
            **AWS_ENV,
            "HUBGATE_TENANTS_TABLE": TABLE,
            "HUBGATE_DYNAMODB_ENDPOINT_URL": endpoint,
        }
        for args in (["create-table"], ["import", str(tenants_path)]):
            done = await asyncio.to_thread(
                subprocess.run,
                [sys.executable, "-m", "hubgate", "tenants", *args],
                env=env,
                capture_output=True,
                text=True,
                timeout=120,
            )
            if done.returncode != 0:
                raise RuntimeError(f"hubgate tenants {args[0]} failed: {done.stderr}")
        return {"tenants_table": TABLE, "dynamodb_endpoint_url": endpoint, "registry_refresh_seconds": 1.0}

    async def stop(self) -> None:
        for gateway in self.gateways.values():
            await asyncio.to_thread(gateway.stop)
        if self.dynamo_proxy is not None:
            await self.dynamo_proxy.stop()
        if self.moto is not None:
            await asyncio.to_thread(self.moto.stop)
        self.jwks.stop()
        await asyncio.to_thread(self.emulator.stop)
        await asyncio.to_thread(self.redis.stop)
        shutil.rmtree(self.tmp, ignore_errors=True)

    # ------------------------------------------------------------------ clients

    def token(self, user: str) -> str:
        now = int(time.time())
        claims = {
            "sub": user,
            "custom:tenant_id": TENANT,
            "iss": ISSUER,
            "aud": AUDIENCE,
            "token_use": "id",
            "iat": now,
            "exp": now + 3600,
        }
        return self.keys.mint(claims)

    async def open(self, gateway: str, token: str, *, probe: bool = False) -> ClientConnection | None:
        """A connection that received `ready`, retrying refused handshakes; None if the run stops."""
        assert self.phase is not None
        phase = self.phase
        while True:
            try:
                ws = await connect(
                    self.gateways[gateway].url,
                    additional_headers={"Authorization": f"Bearer {token}"},
                    compression=None,
                    open_timeout=10,
                    ping_interval=None,
                )
                ready = json.loads(await asyncio.wait_for(ws.recv(), 10))
                if ready.get("type") != "ready":
                    raise RuntimeError(f"{gateway} answered {ready} instead of ready")
                phase.connections += 1
                return ws
            except InvalidStatus as exc:
                body = json.loads(exc.response.body or b"{}")
                phase.refusals[f"{exc.response.status_code} {body.get('error', {}).get('code')}"] += 1
            except (OSError, TimeoutError, ConnectionClosed) as exc:
                phase.refusals[f"connect {type(exc).__name__}"] += 1
            if self.stopping and not probe:
                return None
            await asyncio.sleep(0.2)

    async def chat(
        self, ws: ClientConnection, gateway: str, *, probe: bool = False, stall: bool = False
    ) -> Chat:
        """Send one chat on `ws` and read until its terminal frame (the chat is lost without one)."""
        assert self.phase is not None
        plan = self.plan
        directive = (
            "[[emulator:fault=stall]] [[emulator:after=2]]"
            if stall
            else f"[[emulator:tokens={plan.reply_tokens}]] [[emulator:token_delay_ms={plan.token_delay_ms}]]"
        )
        chat = Chat(uuid.uuid4().hex, gateway, self.phase.name, probe, stall, time.monotonic())
        message = {
            "type": "chat",
            "id": chat.request_id,
            "messages": [{"role": "user", "content": directive}],
        }
        self.chats.append(chat)
        self.in_flight.add(chat)
        try:
            async with asyncio.timeout(CHAT_DEADLINE):
                await ws.send(json.dumps(message))
                async for raw in ws:
                    frame = json.loads(raw)
                    if frame.get("code") == "message_rate_limited":
                        chat.outcome = frame["code"]  # our one message in flight was dropped
                        break
                    if frame.get("id") != chat.request_id:
                        continue
                    if frame["type"] == "delta":
                        chat.deltas += 1
                    elif frame["type"] in ("end", "error"):
                        chat.outcome = "end" if frame["type"] == "end" else frame["code"]
                        break
        except (ConnectionClosed, TimeoutError, OSError):
            pass  # no terminal frame: the chat is lost
        finally:
            chat.ended = time.monotonic()
            self.in_flight.discard(chat)
        return chat

    async def client(self, gateway: str, n: int) -> None:
        """One load client: a new connection per chat, or one kept open; every other one stalls."""
        token = self.token(f"{gateway}-user-{n}")
        keep_open = n % 4 >= 2
        ws: ClientConnection | None = None
        try:
            while not self.stopping:
                if ws is None:
                    ws = await self.open(gateway, token)
                    if ws is None:
                        return
                assert self.phase is not None
                chat = await self.chat(ws, gateway, stall=self.phase.name == "stall" and n % 2 == 0)
                if not keep_open or chat.outcome is None:
                    await ws.close()
                    ws = None
                if chat.outcome in NOT_ADMITTED:
                    await asyncio.sleep(REFUSAL_BACKOFF)  # as the protocol asks of a refused client
        finally:
            if ws is not None:
                await ws.close()

    async def probe(self, gateway: str, token: str) -> Chat:
        ws = await self.open(gateway, token, probe=True)
        assert ws is not None
        try:
            return await self.chat(ws, gateway, probe=True)
        finally:
            await ws.close()

    # ------------------------------------------------------------------ phases

    def memory(self) -> dict[str, int]:
        return {name: vm_rss_kib(g.process.pid) for name, g in self.gateways.items() if g.process}

    async def enter(self, phase: Phase) -> None:
        """Make `phase` current, once every chat started under the previous one has finished."""
        for name, kib in self.memory().items():
            phase.memory[name] = [kib, kib]
        self.phase = phase
        self.phases.append(phase)
        await until(lambda: not any(c.phase != phase.name for c in self.in_flight), 2 * CHAT_DEADLINE)
        print(f"[{stamp()}] {phase.name}: {phase.fault}", flush=True)

    def leave(self, phase: Phase) -> None:
        for name, kib in self.memory().items():
            phase.memory[name][1] = kib

    async def recovered(self, phase: Phase, cleared: float) -> None:
        """Both gateways alive and serving a chat again, without a restart."""
        for name, gateway in self.gateways.items():
            deadline = time.monotonic() + self.plan.recovery_timeout
            token = self.token(f"probe-{name}")
            while True:
                await self.check_alive(name, gateway)
                chat = await self.probe(name, token)
                if chat.outcome == "end":
                    phase.recovery[name] = round(time.monotonic() - cleared, 2)
                    break
                if time.monotonic() > deadline:
                    self.failures.append(f"{phase.name}: {name} did not recover within the deadline")
                    break
                await asyncio.sleep(0.2)

    async def check_alive(self, name: str, gateway: GatewayProcess) -> None:
        assert gateway.process is not None
        if gateway.process.poll() is not None:
            raise RuntimeError(f"{name} exited with {gateway.process.returncode}")
        async with httpx.AsyncClient() as http:
            answer = await http.get(f"{gateway.http}/healthz", timeout=5)
        if answer.status_code != 200:
            raise RuntimeError(f"{name} /healthz answered {answer.status_code}")

    async def baseline(self) -> None:
        phase = self.phases[0]
        await asyncio.sleep(self.plan.baseline)
        await self.recovered(phase, time.monotonic())
        self.leave(phase)

    async def redis_fault(self) -> None:
        phase = Phase(
            "redis",
            f"Redis SIGKILL, down {self.plan.hold:g} s, restarted empty",
            frozenset({"end", "limiter_unavailable"}),
            frozenset({"503 limiter_unavailable"}),
        )
        await self.enter(phase)
        await asyncio.to_thread(self.redis.kill)
        await asyncio.sleep(self.plan.hold)
        await asyncio.to_thread(self.redis.start)
        await self.recovered(phase, time.monotonic())
        self.leave(phase)

    async def emulator_fault(self) -> None:
        phase = Phase(
            "bedrock",
            "emulator SIGKILL mid-stream, down ~1 s, restarted on its port",
            frozenset({"end", "upstream_error"}),
        )
        await self.enter(phase)
        await until(lambda: any(c.deltas and c.phase == phase.name for c in self.in_flight), 30)
        assert self.emulator.process is not None
        self.emulator.process.kill()
        await asyncio.to_thread(self.emulator.process.wait, 10)
        self.emulator.process = None
        await asyncio.sleep(1.0)
        await asyncio.to_thread(self.emulator.start)
        await self.recovered(phase, time.monotonic())
        self.leave(phase)
        cut = [c for c in self.chats if c.phase == phase.name and c.deltas and c.outcome == "upstream_error"]
        phase.notes.append(f"{len(cut)} cut mid-stream")
        if not cut:
            self.failures.append("bedrock: no stream was cut mid-stream")

    async def stall_fault(self) -> None:
        phase = Phase(
            "stall",
            f"half the replies stall after 2 tokens, for {self.plan.hold:g} s "
            f"(read timeout {READ_TIMEOUT:g} s)",
            frozenset({"end", "upstream_timeout"}),
        )
        await self.enter(phase)
        await asyncio.sleep(self.plan.hold)
        await self.recovered(phase, time.monotonic())
        self.leave(phase)
        stalled = [c for c in self.chats if c.phase == phase.name and c.stall]
        slowest = max((c.ended - c.started for c in stalled if c.ended), default=0.0)
        phase.notes.append(f"slowest stalled chat {slowest:.1f} s")
        if not stalled or any(c.outcome != "upstream_timeout" for c in stalled if c.ended):
            self.failures.append("stall: a stalled reply did not end with upstream_timeout")

    async def jwks_fault(self) -> None:
        phase = Phase("jwks", f"JWKS endpoint down for {self.plan.hold:g} s", frozenset({"end"}))
        await self.enter(phase)
        fetched = self.jwks.requests
        self.jwks.stop()
        await asyncio.sleep(self.plan.hold)
        self.jwks.start()
        await self.recovered(phase, time.monotonic())
        self.leave(phase)
        phase.notes.append(f"{self.jwks.requests - fetched} JWKS fetches")

    async def dynamodb_fault(self) -> None:
        if self.dynamo_proxy is None:
            phase = Phase("dynamodb", "skipped: no DynamoDB registry or no moto_server", frozenset({"end"}))
            await self.enter(phase)
            self.leave(phase)
            return
        phase = Phase(
            "dynamodb",
            f"DynamoDB unreachable for {max(self.plan.hold, 3.0):g} s (refresh every 1 s)",
            frozenset({"end"}),
        )
        await self.enter(phase)
        await self.dynamo_proxy.stop()
        await asyncio.sleep(max(self.plan.hold, 3.0))
        for name, gateway in self.gateways.items():
            if "serving the last good copy" not in gateway.output():
                self.failures.append(f"dynamodb: {name} never noticed the outage")
        await self.dynamo_proxy.start()
        cleared = time.monotonic()
        try:
            await until(
                lambda: all(
                    "tenant registry refresh recovered" in g.output() for g in self.gateways.values()
                ),
                self.plan.recovery_timeout,
            )
        except TimeoutError:
            self.failures.append("dynamodb: a registry refresh never recovered")
        await self.recovered(phase, cleared)
        self.leave(phase)

    # ------------------------------------------------------------------ the run

    async def execute(self) -> None:
        await self.start()
        try:
            await self.enter(Phase("baseline", "none (steady load)", frozenset({"end"})))
            clients = [
                asyncio.create_task(self.client(name, n))
                for name in self.gateways
                for n in range(self.plan.clients_per_gateway)
            ]
            for step in (
                self.baseline,
                self.redis_fault,
                self.emulator_fault,
                self.stall_fault,
                self.jwks_fault,
                self.dynamodb_fault,
            ):
                await step()
            self.stopping = True
            await asyncio.wait_for(asyncio.gather(*clients, return_exceptions=True), 2 * CHAT_DEADLINE)
            for name, gateway in self.gateways.items():
                try:
                    await until_async(lambda g=gateway: idle(g), 30)
                except TimeoutError:
                    self.failures.append(
                        f"{name}: connections or streams left behind: {await readyz(gateway)}"
                    )
                await self.check_alive(name, gateway)
            self.check()
        finally:
            await self.stop()

    def check(self) -> None:
        """Outcomes, losses and metering against what each fault documents."""
        for phase in self.phases:
            chats = [c for c in self.chats if c.phase == phase.name and not c.probe]
            lost = [c for c in self.chats if c.phase == phase.name and c.outcome is None]
            if lost:
                details = [f"{c.request_id} on {c.gateway} after {c.deltas} deltas" for c in lost[:5]]
                self.failures.append(f"{phase.name}: {len(lost)} streams lost: {'; '.join(details)}")
            odd = Counter(
                c.outcome for c in chats if c.outcome is not None and c.outcome not in phase.allowed
            )
            if odd:
                self.failures.append(f"{phase.name}: undocumented outcomes {dict(odd)}")
            refused = {k: v for k, v in phase.refusals.items() if k not in phase.allowed_refusals}
            if refused:
                self.failures.append(f"{phase.name}: handshake refusals {refused}")
            if phase.name == "redis":
                local = [c.outcome for c in chats if c.gateway == "gw-local" and c.outcome != "end"]
                if local:
                    self.failures.append(f"redis: the local-mode gateway refused chats: {Counter(local)}")
        emf = self.emf_lines()
        self.metering = {
            "expected": 0,
            "lines": sum(emf.values()),
            "missing": 0,
            "duplicated": 0,
            "unknown": 0,
        }
        ids = set()
        for chat in self.chats:
            ids.add(chat.request_id)
            reached = chat.outcome == "end" or (chat.outcome is not None and chat.outcome not in NOT_ADMITTED)
            self.metering["expected"] += reached
            seen = emf.get(chat.request_id, 0)
            if reached and seen == 0:
                self.metering["missing"] += 1
            elif seen > int(reached):
                self.metering["duplicated"] += 1
        self.metering["unknown"] = sum(1 for request_id in emf if request_id not in ids)
        if self.metering["missing"] or self.metering["duplicated"] or self.metering["unknown"]:
            self.failures.append(f"metering: {self.metering}")
        for name, gateway in self.gateways.items():
            records = error_records(gateway)
            # An exception nobody handled reaches uvicorn's or asyncio's logger; hubgate's own
            # error lines (a Redis write that failed, say) are handled and only counted.
            unhandled = [m for logger, m in records if not logger.startswith("hubgate")]
            if unhandled or "Exception in ASGI application" in gateway.output():
                self.failures.append(f"{name}: unhandled exceptions logged: {unhandled[:3]}")
            self.errors_logged[name] = Counter(re.sub(r"[0-9a-f]{32}", "<id>", m) for _, m in records)

    def emf_lines(self) -> Counter[str]:
        counts: Counter[str] = Counter()
        for gateway in self.gateways.values():
            for line in gateway.output().splitlines():
                if line.startswith('{"_aws"'):
                    counts[json.loads(line)["request_id"]] += 1
        return counts

    # ------------------------------------------------------------------ report

    def table(self, seconds: float) -> str:
        plan = self.plan
        lines = [
            f"Last run: `{plan.mode}` mode, {datetime.now(UTC).strftime('%Y-%m-%d %H:%M UTC')}, "
            f"{seconds:.0f} s, {plan.clients_per_gateway} clients on each of 2 gateways "
            f"(`local` and `closed` failure modes), half of them opening a new connection for every chat, "
            f"replies of {plan.reply_tokens} tokens {plan.token_delay_ms} ms apart; "
            f"`HUBGATE_UPSTREAM_READ_TIMEOUT={READ_TIMEOUT:g}`, "
            f"`HUBGATE_REDIS_TIMEOUT_MS={REDIS_TIMEOUT_MS}`. "
            f"Result: **{'pass' if not self.failures else 'FAIL'}**.",
            "",
            "| Phase | Fault injected | Connections | Streams | Outcomes (by code) | Handshakes refused "
            "| Recovery (local / closed) | Memory before → after, MiB (local / closed) | Streams lost |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        for phase in self.phases:
            chats = [c for c in self.chats if c.phase == phase.name]
            outcomes = Counter(c.outcome or "lost" for c in chats if not c.probe)
            lost = sum(1 for c in chats if c.outcome is None)
            memory = " / ".join(
                f"{before / 1024:.0f} → {after / 1024:.0f}" for before, after in phase.memory.values()
            )
            recovery = " / ".join(f"{phase.recovery.get(n, float('nan')):.1f} s" for n in self.gateways)
            fault = phase.fault + (f" ({'; '.join(phase.notes)})" if phase.notes else "")
            lines.append(
                f"| {phase.name} | {fault} | {phase.connections} | {len(chats)} | {fmt(outcomes)} "
                f"| {fmt(phase.refusals) or '—'} | {recovery} | {memory} | {lost} |"
            )
        m = self.metering
        lines += [
            "",
            f"Metering: {m['expected']} requests reached the model, {m['lines']} EMF lines; "
            f"{m['missing']} missing, {m['duplicated']} metered twice, {m['unknown']} unknown. "
            "Streams counts include the recovery probes; outcomes exclude them.",
        ]
        logged = {n: dict(c) for n, c in self.errors_logged.items() if c}
        if logged:
            lines.append(f"Error-level log lines: {json.dumps(logged, sort_keys=True)}.")
        if self.failures:
            lines += ["", "Failures:", *[f"- {f}" for f in self.failures]]
        return "\n".join(lines)


def fmt(counter: Counter[str]) -> str:
    return ", ".join(f"{key} {value}" for key, value in sorted(counter.items()))


def stamp() -> str:
    return datetime.now(UTC).strftime("%H:%M:%S")


async def idle(gateway: GatewayProcess) -> bool:
    state = await readyz(gateway)
    return state.get("connections") == 0 and state.get("streams") == 0


async def until(predicate: Callable[[], bool], timeout: float) -> None:
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.02)


async def until_async(predicate: Callable[[], Awaitable[bool]], timeout: float) -> None:
    async with asyncio.timeout(timeout):
        while not await predicate():
            await asyncio.sleep(0.05)


def write_table(table: str, path: Path = DOC) -> None:
    text = path.read_text()
    if BEGIN not in text or END not in text:
        raise SystemExit(f"{path} has no {BEGIN} ... {END} markers")
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    path.write_text(f"{head}{BEGIN}\n{table}\n{END}{tail}")


async def main(plan: Plan, doc: Path | None) -> int:
    run = Run(plan)
    started = time.monotonic()
    try:
        await run.execute()
    except (RuntimeError, OSError, TimeoutError, AssertionError) as exc:  # a gateway died, a server
        # would not start, a deadline passed: report it and exit non-zero
        run.failures.append(f"run aborted: {exc!r}")
        print(f"run aborted: {exc!r}", file=sys.stderr)
        return 1
    table = run.table(time.monotonic() - started)
    print(table)
    if doc is not None:
        write_table(table, doc)
    return 0 if not run.failures else 1


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--short", action="store_true", help="the CI size: about a minute")
    parser.add_argument("--no-write", action="store_true", help="print the table without updating the doc")
    parser.add_argument("--doc", type=Path, default=DOC, help="the document to update (docs/reliability.md)")
    args = parser.parse_args()
    raise SystemExit(asyncio.run(main(SHORT if args.short else FULL, None if args.no_write else args.doc)))
