"""Rate-limiter latency on loopback: admit and settle next to a bare EVALSHA (the floor).

    .venv/bin/python loadtests/bench_limiter.py [--redis-url redis://127.0.0.1:PORT/0]
        [--seconds 5] [--concurrency 16] [--markdown FILE]

Without --redis-url it starts its own redis-server on a free 127.0.0.1 port and stops it after.
Each phase runs for --seconds (and at most --max-ops calls); only loopback URLs are accepted.
The limiter is the one the gateway builds (``build_limiter``: blocking pool, ResilientLimiter);
the floor runs ``return 1`` with EVALSHA over the same client, so the difference is the cost of
the limiter's own scripts and Python work. Goal: admit p99 within 1.5x of the floor's p99.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import redis

from hubgate.errors import GatewayError
from hubgate.ratelimit import LimitPolicy, RedisLimiter, ResilientLimiter, build_limiter

LOOPBACK = {"127.0.0.1", "localhost", "::1"}
GOAL = 1.5


@dataclass(frozen=True, slots=True)
class Result:
    name: str
    latencies_ns: list[int]
    seconds: float
    refused: int = 0

    @property
    def ops(self) -> int:
        return len(self.latencies_ns)

    @property
    def rate(self) -> float:
        return self.ops / self.seconds if self.seconds else 0.0

    def percentile_us(self, q: float) -> float:
        ordered = sorted(self.latencies_ns)
        if not ordered:
            return float("nan")
        return ordered[min(len(ordered) - 1, int(q * (len(ordered) - 1) + 0.5))] / 1000


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def private_redis() -> Iterator[str]:
    """A throwaway redis-server on a free loopback port."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise SystemExit("redis-server not found; install it or pass --redis-url")
    port = free_port()
    workdir = tempfile.mkdtemp(prefix="hubgate-bench-")
    process = subprocess.Popen(
        [
            binary,
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            workdir,
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                    break
            except OSError:
                if time.monotonic() > deadline or process.poll() is not None:
                    raise SystemExit("redis-server did not start") from None
                time.sleep(0.02)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
        shutil.rmtree(workdir, ignore_errors=True)


async def run_phase(
    name: str, op: Callable[[int, int], Awaitable[bool]], *, seconds: float, concurrency: int, max_ops: int
) -> Result:
    """Run ``op(worker, i)`` from ``concurrency`` tasks until time or count runs out.

    ``op`` returns False when the limiter refused the call (counted, and timed like the rest).
    """
    latencies: list[int] = []
    refused = 0
    deadline = time.perf_counter() + seconds

    async def worker(w: int) -> None:
        nonlocal refused
        i = 0
        while time.perf_counter() < deadline and len(latencies) < max_ops:
            started = time.perf_counter_ns()
            ok = await op(w, i)
            latencies.append(time.perf_counter_ns() - started)
            refused += not ok
            i += 1

    started = time.perf_counter()
    await asyncio.gather(*(worker(w) for w in range(concurrency)))
    return Result(name, latencies, time.perf_counter() - started, refused)


async def bench(url: str, *, seconds: float, concurrency: int, max_ops: int, tenants: int) -> list[Result]:
    limiter = build_limiter(url, mode="local", expected_instances=2, timeout_ms=50, max_connections=64)
    assert isinstance(limiter, ResilientLimiter)
    primary: RedisLimiter = limiter.primary
    await primary.client.flushdb()
    policy = LimitPolicy(
        requests_per_minute=6_000_000,
        tokens_per_minute=10**9,
        per_user_requests_per_minute=600_000,
        max_connections=10_000,
        max_concurrent_streams=100_000,
    )

    async def floor(w: int, i: int) -> bool:
        await primary.run(RedisLimiter.NOOP, (), ())
        return True

    admit_ns: list[int] = []
    settle_ns: list[int] = []

    async def admit_settle(w: int, i: int) -> bool:
        tenant = f"tenant-{(w * 7919 + i) % tenants}"
        user = f"user-{i % 20}"
        now = time.time()
        started = time.perf_counter_ns()
        try:
            admission = await limiter.admit(
                tenant, user, policy, lease=f"bench:{w}:{i}", estimate_tokens=1200, now=now
            )
        except GatewayError:
            return False
        finally:
            admit_ns.append(time.perf_counter_ns() - started)
        started = time.perf_counter_ns()
        await limiter.settle(admission, policy, used_tokens=340, now=now)
        settle_ns.append(time.perf_counter_ns() - started)
        return True

    # Warm up: connections opened, scripts loaded, code paths hot.
    await run_phase("warmup", floor, seconds=0.3, concurrency=concurrency, max_ops=max_ops)
    await run_phase("warmup", admit_settle, seconds=0.3, concurrency=concurrency, max_ops=max_ops)
    admit_ns.clear()
    settle_ns.clear()

    results: list[Result] = []
    # Two rounds, alternating, so a drift of the machine's load affects both sides alike.
    halves: dict[str, list[Result]] = {"floor": [], "pair": []}
    for _ in range(2):
        halves["floor"].append(
            await run_phase("floor", floor, seconds=seconds / 2, concurrency=concurrency, max_ops=max_ops)
        )
        halves["pair"].append(
            await run_phase(
                "pair", admit_settle, seconds=seconds / 2, concurrency=concurrency, max_ops=max_ops
            )
        )
    floor_result = _merge("EVALSHA `return 1` (floor)", halves["floor"])
    pair = _merge("admit + settle (pair)", halves["pair"])
    results.append(floor_result)
    results.append(Result("admit", admit_ns, pair.seconds, pair.refused))
    results.append(Result("settle", settle_ns, pair.seconds))
    results.append(pair)
    stats = limiter.stats
    await limiter.aclose()
    if stats.fallbacks or stats.redis_failures:
        print(f"warning: {stats.redis_failures} Redis failures, {stats.fallbacks} fallbacks during the run")
    return results


def _merge(name: str, parts: list[Result]) -> Result:
    return Result(
        name,
        [ns for part in parts for ns in part.latencies_ns],
        sum(part.seconds for part in parts),
        sum(part.refused for part in parts),
    )


def table(results: list[Result], *, markdown: bool) -> str:
    header = ["operation", "calls", "calls/s", "p50 µs", "p90 µs", "p99 µs", "refused"]
    rows = [
        [
            r.name,
            f"{r.ops:,}",
            f"{r.rate:,.0f}",
            f"{r.percentile_us(0.50):.0f}",
            f"{r.percentile_us(0.90):.0f}",
            f"{r.percentile_us(0.99):.0f}",
            f"{r.refused:,}",
        ]
        for r in results
    ]
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
        lines += ["| " + " | ".join(row) + " |" for row in rows]
        return "\n".join(lines)
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(header)]
    fmt = "  ".join(f"{{:<{w}}}" if i == 0 else f"{{:>{w}}}" for i, w in enumerate(widths))
    return "\n".join([fmt.format(*header), *(fmt.format(*row) for row in rows)])


def verdict(results: list[Result]) -> str:
    floor, admit = results[0], results[1]
    p99 = admit.percentile_us(0.99) / floor.percentile_us(0.99)
    p50 = admit.percentile_us(0.50) / floor.percentile_us(0.50)
    return (
        f"admit / floor: p99 {p99:.2f}x (goal <= {GOAL}x: {'met' if p99 <= GOAL else 'NOT met'}), "
        f"p50 {p50:.2f}x; {results[3].rate:,.0f} admit+settle decisions/s"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--redis-url", help="a loopback Redis to use (default: start a private one)")
    parser.add_argument("--seconds", type=float, default=5.0, help="seconds per side (default 5)")
    parser.add_argument("--concurrency", type=int, default=16, help="concurrent callers (default 16)")
    parser.add_argument("--max-ops", type=int, default=1_000_000, help="cap on calls per phase")
    parser.add_argument("--tenants", type=int, default=50, help="tenants spread over (default 50)")
    parser.add_argument("--markdown", type=Path, help="also write the results as a markdown section here")
    parser.add_argument("--no-uvloop", action="store_true", help="use the stock asyncio loop")
    args = parser.parse_args(argv)
    if not 0 < args.seconds <= 600 or not 1 <= args.concurrency <= 1024:
        parser.error("--seconds must be in (0, 600] and --concurrency in [1, 1024]")
    if args.redis_url is not None and urlparse(args.redis_url).hostname not in LOOPBACK:
        parser.error("only a loopback Redis (127.0.0.1) is benchmarked")

    loop_name = "asyncio"
    runner: Callable[..., object] = asyncio.run
    if not args.no_uvloop:
        with contextlib.suppress(ImportError):
            import uvloop

            runner, loop_name = uvloop.run, "uvloop"

    def go(url: str) -> list[Result]:
        coro = bench(
            url,
            seconds=args.seconds,
            concurrency=args.concurrency,
            max_ops=args.max_ops,
            tenants=args.tenants,
        )
        result = runner(coro)
        assert isinstance(result, list)
        return result

    if args.redis_url is None:
        with private_redis() as url:
            results = go(url)
            server = redis.Redis.from_url(url).info("server")["redis_version"]
    else:
        results = go(args.redis_url)
        server = redis.Redis.from_url(args.redis_url).info("server")["redis_version"]

    setup = (
        f"Python {platform.python_version()} ({loop_name}), redis-py {redis.__version__}, "
        f"Redis {server} on 127.0.0.1, concurrency {args.concurrency}, {args.seconds:g} s per side, "
        f"{args.tenants} tenants"
    )
    print(setup)
    print(table(results, markdown=False))
    print(verdict(results))
    if args.markdown is not None:
        args.markdown.write_text(
            "## Rate limiter latency (loopback)\n\n"
            f"{setup}.\n\n{table(results, markdown=True)}\n\n{verdict(results)}.\n",
            encoding="utf-8",
        )
        print(f"wrote {args.markdown}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
