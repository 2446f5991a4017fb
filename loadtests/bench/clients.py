"""Load clients: the same chat stream three ways, timed the same way.

- ``DirectClient``: aioboto3 ConverseStream straight to the emulator (the floor);
- ``HubgateClient``: one hubgate WebSocket per worker (``websockets``, no compression);
- ``LitellmClient``: LiteLLM's OpenAI-compatible ``/chat/completions`` with ``stream: true`` (SSE).

Each ``stream`` returns a ``StreamResult``: time to first token measured from just before the
request is sent, and every gap between two tokens. ``run_closed_loop`` keeps N streams in
flight for a fixed time and gathers the results.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import orjson

MODEL = "anthropic.claude-3-5-haiku-20241022-v1:0"


@dataclass(frozen=True, slots=True)
class Workload:
    """One reply shape, set per request with emulator directives."""

    tokens: int
    token_delay_ms: float = 0.0
    ttft_ms: float = 0.0

    def prompt(self) -> str:
        # A fresh word per request keeps replies distinct; the directives fix length and pacing.
        return (
            f"benchmark {uuid.uuid4().hex[:8]} [[emulator:tokens={self.tokens}]] "
            f"[[emulator:token_delay_ms={self.token_delay_ms:g}]] [[emulator:ttft_ms={self.ttft_ms:g}]]"
        )


@dataclass(slots=True)
class StreamResult:
    ok: bool
    code: str | None = None  # refusal or error code when not ok
    ttft: float | None = None  # seconds from sending the request to the first token
    gaps: list[float] = field(default_factory=list)  # seconds between consecutive tokens
    tokens: int = 0
    duration: float = 0.0


class Client(Protocol):
    async def open(self) -> str | None:
        """Prepare this worker; a refusal code when the connection is refused."""
        ...

    async def stream(self, workload: Workload) -> StreamResult: ...

    async def close(self) -> None: ...


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


@dataclass
class RunStats:
    """Everything one closed-loop run produced."""

    results: list[StreamResult]
    seconds: float
    refused_connections: Counter[str] = field(default_factory=Counter)

    @property
    def ok(self) -> list[StreamResult]:
        return [r for r in self.results if r.ok]

    @property
    def errors(self) -> Counter[str]:
        return Counter(r.code or "error" for r in self.results if not r.ok) + self.refused_connections

    @property
    def tokens(self) -> int:
        return sum(r.tokens for r in self.results)

    def ttfts(self) -> list[float]:
        return [r.ttft for r in self.ok if r.ttft is not None]

    def gaps(self) -> list[float]:
        return [g for r in self.ok for g in r.gaps]

    def summary(self) -> dict[str, Any]:
        ttfts, gaps = self.ttfts(), self.gaps()
        return {
            "streams": len(self.ok),
            "errors": dict(self.errors),
            "tokens": self.tokens,
            "seconds": round(self.seconds, 3),
            "ttft_p50_ms": percentile(ttfts, 0.50) * 1000,
            "ttft_p99_ms": percentile(ttfts, 0.99) * 1000,
            "gap_p50_ms": percentile(gaps, 0.50) * 1000,
            "gap_p99_ms": percentile(gaps, 0.99) * 1000,
        }


# ------------------------------------------------------------------------------ direct (floor)


class DirectPool:
    """One aioboto3 client shared by every worker, as one gateway process would hold it."""

    def __init__(self, endpoint_url: str, pool: int) -> None:
        self.endpoint_url = endpoint_url
        self.pool = pool
        self._stack = contextlib.AsyncExitStack()
        self.client: Any = None

    async def __aenter__(self) -> DirectPool:
        import aioboto3
        from botocore.config import Config

        session = aioboto3.Session(
            aws_access_key_id="AKIDHUBGATEBENCH",
            aws_secret_access_key="bench-secret",
            region_name="us-east-1",
        )
        config = Config(
            retries={"total_max_attempts": 1},
            max_pool_connections=self.pool,
            read_timeout=60,
            connect_timeout=10,
        )
        self.client = await self._stack.enter_async_context(
            session.client("bedrock-runtime", endpoint_url=self.endpoint_url, config=config)
        )
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._stack.aclose()

    def worker(self) -> DirectClient:
        return DirectClient(self)


class DirectClient:
    def __init__(self, pool: DirectPool) -> None:
        self.pool = pool

    async def open(self) -> str | None:
        return None

    async def close(self) -> None:
        return None

    async def stream(self, workload: Workload) -> StreamResult:
        from botocore.exceptions import BotoCoreError, ClientError

        result = StreamResult(ok=False)
        sent = time.perf_counter()
        last = sent
        try:
            response = await self.pool.client.converse_stream(
                modelId=MODEL,
                messages=[{"role": "user", "content": [{"text": workload.prompt()}]}],
                inferenceConfig={"maxTokens": workload.tokens},
            )
            async for event in response["stream"]:
                if "contentBlockDelta" in event:
                    now = time.perf_counter()
                    if result.ttft is None:
                        result.ttft = now - sent
                    else:
                        result.gaps.append(now - last)
                    last = now
                    result.tokens += 1
                elif "metadata" in event:
                    result.ok = True
            if not result.ok:
                result.code = "incomplete"
        except ClientError as exc:
            result.code = str(exc.response.get("Error", {}).get("Code", "client_error"))
        except (BotoCoreError, OSError, TimeoutError) as exc:
            result.code = type(exc).__name__
        result.duration = time.perf_counter() - sent
        return result


# ------------------------------------------------------------------------------ hubgate


class HubgateClient:
    """One WebSocket connection; streams run one after another on it."""

    def __init__(self, url: str, token: str) -> None:
        self.url = url
        self.token = token
        self.ws: Any = None

    async def open(self) -> str | None:
        import websockets
        from websockets.exceptions import InvalidStatus

        try:
            self.ws = await websockets.connect(
                self.url,
                subprotocols=["hubgate.v1"],
                additional_headers={"Authorization": f"Bearer {self.token}"},
                compression=None,
                open_timeout=60,
                ping_interval=None,  # the gateway pings; the library answers on its own
                max_queue=None,
            )
        except InvalidStatus as exc:
            code = "refused"
            with contextlib.suppress(ValueError, KeyError, TypeError):
                code = orjson.loads(exc.response.body or b"{}")["error"]["code"]
            return f"http_{exc.response.status_code}:{code}"
        except (OSError, TimeoutError) as exc:
            return type(exc).__name__
        ready = orjson.loads(await self.ws.recv())
        if ready.get("type") != "ready":
            return f"unexpected:{ready.get('type')}"
        return None

    async def close(self) -> None:
        if self.ws is not None:
            with contextlib.suppress(Exception):
                await self.ws.close()
            self.ws = None

    async def stream(self, workload: Workload) -> StreamResult:
        from websockets.exceptions import ConnectionClosed

        request_id = uuid.uuid4().hex
        message = orjson.dumps(
            {
                "type": "chat",
                "id": request_id,
                "max_tokens": workload.tokens,
                "messages": [{"role": "user", "content": workload.prompt()}],
            }
        ).decode()
        result = StreamResult(ok=False)
        sent = time.perf_counter()
        last = sent
        try:
            await self.ws.send(message)
            while True:
                frame = orjson.loads(await self.ws.recv())
                kind = frame.get("type")
                if kind == "delta":
                    now = time.perf_counter()
                    if result.ttft is None:
                        result.ttft = now - sent
                    else:
                        result.gaps.append(now - last)
                    last = now
                    result.tokens += 1
                elif kind == "end":
                    result.ok = True
                    break
                elif kind == "error" and frame.get("id") == request_id:
                    # Without seq the refusal is the connection's own cap, not the tenant's.
                    suffix = "" if "seq" in frame else "(connection)"
                    result.code = f"{frame.get('code', 'error')}{suffix}"
                    break
        except ConnectionClosed as exc:
            result.code = f"closed_{exc.rcvd.code if exc.rcvd else 1006}"
        result.duration = time.perf_counter() - sent
        return result


# ------------------------------------------------------------------------------ LiteLLM


class LitellmPool:
    """One httpx client shared by every worker (keep-alive connections, like a browser's pool)."""

    def __init__(self, base_url: str, key: str, pool: int) -> None:
        import httpx

        self.url = f"{base_url}/chat/completions"
        self.headers = {"Authorization": f"Bearer {key}"}
        self.http = httpx.AsyncClient(
            limits=httpx.Limits(max_connections=pool, max_keepalive_connections=pool),
            timeout=httpx.Timeout(120.0, connect=30.0),
            trust_env=False,
        )

    async def __aenter__(self) -> LitellmPool:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.http.aclose()

    def worker(self) -> LitellmClient:
        return LitellmClient(self)


class LitellmClient:
    def __init__(self, pool: LitellmPool) -> None:
        self.pool = pool

    async def open(self) -> str | None:
        return None

    async def close(self) -> None:
        return None

    async def stream(self, workload: Workload) -> StreamResult:
        import httpx

        body = {
            "model": "bench",
            "stream": True,
            "max_tokens": workload.tokens,
            "messages": [{"role": "user", "content": workload.prompt()}],
        }
        result = StreamResult(ok=False)
        sent = time.perf_counter()
        last = sent
        try:
            async with self.pool.http.stream(
                "POST", self.pool.url, json=body, headers=self.pool.headers
            ) as reply:
                if reply.status_code != 200:
                    await reply.aread()
                    result.code = f"http_{reply.status_code}"
                else:
                    async for line in reply.aiter_lines():
                        if not line.startswith("data: "):
                            continue
                        data = line[6:]
                        if data == "[DONE]":
                            result.ok = True
                            break
                        choices = orjson.loads(data).get("choices") or [{}]
                        if choices[0].get("delta", {}).get("content"):
                            now = time.perf_counter()
                            if result.ttft is None:
                                result.ttft = now - sent
                            else:
                                result.gaps.append(now - last)
                            last = now
                            result.tokens += 1
                    if not result.ok:
                        result.code = "incomplete"  # the stream ended without its [DONE]
        except httpx.HTTPError as exc:
            result.code = type(exc).__name__
        result.duration = time.perf_counter() - sent
        return result


# ------------------------------------------------------------------------------ running load


async def run_closed_loop(
    make_client: Callable[[int], Client],
    *,
    concurrency: int,
    seconds: float,
    workload: Workload,
    stagger: float = 0.0,
    open_parallel: int = 64,
    retry_refused_after: float | None = None,
    on_started: Callable[[], Awaitable[None]] | None = None,
    on_finished: Callable[[], Awaitable[None]] | None = None,
) -> RunStats:
    """Keep ``concurrency`` streams in flight for ``seconds``; every worker ends its last stream.

    Workers connect first (``open_parallel`` at a time), then each starts after a random delay in
    [0, stagger) so that paced token ticks do not all fall on the same instant. A refused stream
    is retried after ``retry_refused_after`` seconds (with jitter) when set. ``on_started`` runs
    once every connection is open, ``on_finished`` after the last stream and before closing, so
    that CPU read there belongs to the streams alone.
    """
    clients = [make_client(i) for i in range(concurrency)]
    gate = asyncio.Semaphore(open_parallel)
    refused: Counter[str] = Counter()

    async def connect(client: Client) -> bool:
        async with gate:
            code = await client.open()
        if code is not None:
            refused[code] += 1
            return False
        return True

    opened = await asyncio.gather(*(connect(c) for c in clients))
    live = [c for c, ok in zip(clients, opened, strict=True) if ok]
    results: list[StreamResult] = []
    if on_started is not None:
        await on_started()
    started = time.perf_counter()
    deadline = started + seconds

    async def worker(client: Client) -> None:
        if stagger:
            await asyncio.sleep(random.uniform(0, stagger))
        while time.perf_counter() < deadline:
            result = await client.stream(workload)
            results.append(result)
            if not result.ok:
                if retry_refused_after is None:
                    await asyncio.sleep(0.05)
                else:
                    await asyncio.sleep(retry_refused_after * random.uniform(0.5, 1.5))

    try:
        await asyncio.gather(*(worker(c) for c in live))
        if on_finished is not None:
            await on_finished()
    finally:
        elapsed = time.perf_counter() - started
        await asyncio.gather(*(c.close() for c in live), return_exceptions=True)
    return RunStats(results, elapsed, refused)


async def open_idle_websockets(url: str, tokens: list[str], count: int, parallel: int = 64) -> list[Any]:
    """``count`` authenticated hubgate connections that stay open and idle."""
    gate = asyncio.Semaphore(parallel)
    clients = [HubgateClient(url, tokens[i % len(tokens)]) for i in range(count)]

    async def one(client: HubgateClient) -> str | None:
        async with gate:
            return await client.open()

    codes = await asyncio.gather(*(one(c) for c in clients))
    failed = [code for code in codes if code is not None]
    if failed:
        await asyncio.gather(*(c.close() for c in clients))
        raise RuntimeError(
            f"{len(failed)} of {count} idle connections failed: {Counter(failed).most_common(3)}"
        )
    return clients


async def open_idle_http(host: str, port: int, path: str, count: int, parallel: int = 64) -> list[Any]:
    """``count`` HTTP/1.1 keep-alive connections, each after one small request, left idle."""
    gate = asyncio.Semaphore(parallel)
    request = f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nConnection: keep-alive\r\n\r\n".encode()

    async def one() -> asyncio.StreamWriter:
        async with gate:
            reader, writer = await asyncio.open_connection(host, port)
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n"):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":", 1)[1])
            await reader.readexactly(length)
            return writer

    return list(await asyncio.gather(*(one() for _ in range(count))))
