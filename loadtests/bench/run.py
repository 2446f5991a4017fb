"""hubgate against its floor (aioboto3 straight to the emulator) and LiteLLM's proxy, on this machine.

    .venv/bin/python loadtests/bench/run.py --smoke [--skip-litellm] [--only ttft,cpu,...]
    .venv/bin/python loadtests/bench/run.py --full            # writes BENCHMARKS.md and charts

One run starts its own stack on free 127.0.0.1 ports: the Bedrock emulator, a private
redis-server, ``hubgate serve`` and (unless --skip-litellm) LiteLLM's proxy installed into
loadtests/.litellm-venv. The gateway under test is pinned to core 1 (``taskset -c 1``); the
emulator, Redis, py-spy and this load generator share core 0. CPU time and memory are read from
the gateway's own /proc entries before and after each phase.

Phases (``--only`` takes a comma-separated subset): ttft, cpu, saturation, shed, idle, request,
redis, profile. Every load loop is bounded in streams and seconds. Exit status 0 means the
phases ran and produced numbers, not that the targets were met (BENCHMARKS.md says which are).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import io
import json
import math
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import clients
import procs
import report
from clients import DirectPool, HubgateClient, LitellmPool, RunStats, Workload, run_closed_loop

from hubgate.ratelimit.redis_backend import RedisLimiter
from hubgate.tokens import mint_dev_token

REPO = Path(__file__).resolve().parents[2]
LITELLM_VENV = REPO / "loadtests" / ".litellm-venv"
TOOLS_VENV = REPO / "loadtests" / ".tools-venv"
PHASES = ("ttft", "cpu", "saturation", "shed", "idle", "request", "redis", "profile")
PACED_DELAY_MS = 20.0  # 50 tokens/s, a fast model's pace
GAP_SLACK_MS = report.GAP_SLACK_MS
SHED_QUEUE_MS = 1000  # the shedding phase's second run: requests over the cap wait up to this
SHED_RETRY_S = 0.25  # a refused client's pause before it tries again (±50 %)
# The shedding phase's tenant cap as a share of the saturation figure. At the saturation figure the
# core is nearly full with streams alone, and refusing the rest costs CPU too: an operator sets the
# cap that sheds with headroom below what a core holds (docs/rate-limits.md).
SHED_HEADROOM = 0.8
EXPLICIT_REFUSALS = frozenset(
    {
        "too_many_streams",
        "too_many_streams(connection)",
        "rate_limited",
        "token_rate_limited",
        "http_429:too_many_connections",
    }
)
GENEROUS = {
    "requests_per_minute": 10_000_000,
    "tokens_per_minute": 2_000_000_000,
    "max_connections": 100_000,
    "max_concurrent_streams": 100_000,
}
USERS_PER_TENANT = 20


@dataclass(frozen=True)
class Plan:
    """Counts and durations of one mode; every loop below is bounded by these."""

    ttft_levels: tuple[int, ...]
    ttft_seconds: float
    ttft_tokens: int
    cpu_seconds: float
    burst_concurrency: int
    burst_tokens: int
    paced_concurrency: int
    paced_tokens: int
    # Paced again at a concurrency LiteLLM keeps the pace at: at paced_concurrency it cannot (its
    # gaps collapse into bursts), and an overloaded relay's CPU per token is not a paced figure.
    paced_kept_concurrency: int
    sat_levels: tuple[int, ...]
    sat_seconds: float
    sat_tokens: int
    shed_seconds: float
    idle_connections: int
    request_count: int
    request_concurrency: int
    redis_requests: int
    profile_seconds: float
    profile_concurrency: int
    repeats: int  # repeated runs of the TTFT and CPU phases; medians are reported


SMOKE = Plan(
    ttft_levels=(1, 10),
    ttft_seconds=2.0,
    ttft_tokens=10,
    cpu_seconds=3.0,
    burst_concurrency=4,
    burst_tokens=200,
    paced_concurrency=20,
    paced_tokens=50,
    paced_kept_concurrency=5,
    sat_levels=(10, 25),
    sat_seconds=3.0,
    sat_tokens=50,
    shed_seconds=3.0,
    idle_connections=500,
    request_count=100,
    request_concurrency=5,
    redis_requests=20,
    profile_seconds=3.0,
    profile_concurrency=20,
    repeats=1,
)
FULL = Plan(
    ttft_levels=(1, 10, 100),
    ttft_seconds=8.0,
    ttft_tokens=25,
    cpu_seconds=12.0,
    burst_concurrency=10,
    burst_tokens=500,
    paced_concurrency=100,
    paced_tokens=100,
    paced_kept_concurrency=10,
    sat_levels=(10, 25, 50, 75, 100, 150, 200, 300, 400, 600, 800),
    sat_seconds=12.0,
    sat_tokens=100,
    shed_seconds=15.0,
    idle_connections=5000,
    request_count=1000,
    request_concurrency=10,
    redis_requests=100,
    profile_seconds=15.0,
    profile_concurrency=200,
    repeats=3,
)


def median(values: list[float]) -> float:
    finite = sorted(v for v in values if v is not None and not math.isnan(v))
    if not finite:
        return float("nan")
    mid = len(finite) // 2
    return finite[mid] if len(finite) % 2 else (finite[mid - 1] + finite[mid]) / 2


def revision() -> dict[str, Any]:
    """The commit measured, and any uncommitted changes under src/ (they are measured too)."""

    def git(*args: str) -> str:
        try:
            done = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.SubprocessError):
            return ""
        return done.stdout

    # Porcelain lines are "XY path": the status columns may start with a space, so no strip first.
    changed = [line[3:] for line in git("status", "--porcelain", "--", "src").splitlines() if line.strip()]
    return {"commit": git("rev-parse", "--short", "HEAD").strip(), "uncommitted_src": changed}


def snapshot_src(workdir: Path) -> Path:
    """HEAD's src/ exported into ``workdir``."""
    target = workdir / "snapshot"
    target.mkdir(parents=True, exist_ok=True)
    archive = subprocess.run(
        ["git", "archive", "HEAD", "src"], cwd=REPO, capture_output=True, check=True, timeout=60
    )
    with tarfile.open(fileobj=io.BytesIO(archive.stdout)) as tar:
        tar.extractall(target, filter="data")
    return target / "src"


def own_cpu() -> float:
    return time.process_time()


class Bench:
    def __init__(self, plan: Plan, args: argparse.Namespace) -> None:
        self.plan = plan
        self.args = args
        self.out: Path = args.out
        self.workdir = Path(tempfile.mkdtemp(prefix="hubgate-bench-"))
        self.secret = procs.new_secret()
        self.litellm_key = "sk-bench-" + procs.new_secret()
        cpus = procs.usable_cpus()
        self.pinned = len(cpus) >= 2
        self.load_cpus = str(cpus[0]) if self.pinned else None
        self.gateway_cpus = str(cpus[1]) if self.pinned else None
        self.gateway_core = cpus[1] if self.pinned else None
        self.emulator: procs.Child | None = None
        self.redis: procs.Child | None = None
        self.gateway: procs.Child | None = None
        self.litellm: procs.Child | None = None
        self.tokens: dict[str, list[str]] = {}
        self.results: dict[str, Any] = {
            "mode": args.mode,
            "started": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "machine": procs.machine(),
            "pinning": {
                "gateway": self.gateway_cpus,
                "load": self.load_cpus,
                "note": "taskset -c / sched_setaffinity" if self.pinned else "fewer than 2 cores: not pinned",
            },
            "loadavg_start": procs.loadavg(),
            "plan": asdict(plan),
            "command": " ".join([".venv/bin/python", "loadtests/bench/run.py", *sys.argv[1:]]),
            "revision": {**revision(), "measured": args.code},
            "phases": {},
            "litellm": {"status": "skipped (--skip-litellm)" if args.skip_litellm else "not started"},
            "notes": [],
        }

    # ------------------------------------------------------------------ stack

    def start(self) -> None:
        if self.args.code == "head":
            # Measure the committed code, not edits in progress in the working tree: the servers
            # import hubgate from an export of HEAD's src/ (PYTHONPATH precedes the editable path).
            os.environ["PYTHONPATH"] = str(snapshot_src(self.workdir))
        if self.pinned:
            os.sched_setaffinity(0, {int(self.load_cpus or 0)})
        self.results["fd_limit"] = procs.raise_fd_limit()
        self.emulator = procs.emulator(sys.executable, ttft_ms=0, token_delay_ms=0, cpus=self.load_cpus)
        self.emulator.start()
        self.redis = procs.redis(self.load_cpus)
        if self.redis is None:
            self.results["notes"].append("redis-server not found: hubgate ran with its in-memory limiter")
        else:
            self.redis.start()
        self.start_gateway()
        if not self.args.skip_litellm:
            self.start_litellm()

    def tenants(
        self, shed_cap: int | None = None, shed_queue_ms: int = 0
    ) -> dict[str, dict[str, int | None]]:
        tenants: dict[str, dict[str, int | None]] = {
            "bench": dict(GENEROUS),  # every limit checked, none reached: the limiter does its full job
            "open": {},  # no limits at all: what the limiter costs, by difference
            "shed": dict(GENEROUS),
        }
        if shed_cap is not None:
            tenants["shed"]["max_concurrent_streams"] = shed_cap
        if shed_queue_ms:
            tenants["shed"]["stream_queue_ms"] = shed_queue_ms
        return tenants

    def start_gateway(self, shed_cap: int | None = None, shed_queue_ms: int = 0) -> None:
        if self.gateway is not None:
            self.gateway.stop()
        assert self.emulator is not None
        tenants_file = self.workdir / "tenants.yaml"
        tenants = self.tenants(shed_cap, shed_queue_ms)
        tenants_file.write_text(procs.tenants_yaml(tenants))
        self.gateway = procs.gateway(
            sys.executable,
            emulator_url=self.emulator.url(),
            redis_url=None if self.redis is None else f"redis://{procs.LOOPBACK}:{self.redis.port}/0",
            tenants_file=tenants_file,
            secret=self.secret,
            cpus=self.gateway_cpus,
        )
        self.gateway.start()
        self.tokens = {
            tenant: [
                mint_dev_token(self.secret, tenant=tenant, user=f"user-{i}", lifetime_seconds=6 * 3600)
                for i in range(USERS_PER_TENANT)
            ]
            for tenant in tenants
        }

    def start_litellm(self) -> None:
        """Install (once) and start LiteLLM; on failure record why and carry on without it."""
        assert self.emulator is not None
        record = self.results["litellm"]
        try:
            print("LiteLLM: installing into loadtests/.litellm-venv (first run only) ...", flush=True)
            procs.ensure_venv(LITELLM_VENV, ["litellm[proxy]"], "litellm")
            version = subprocess.run(
                [
                    str(LITELLM_VENV / "bin" / "python"),
                    "-c",
                    "import importlib.metadata as m; print(m.version('litellm'))",
                ],
                capture_output=True,
                text=True,
                check=True,
                timeout=60,
            ).stdout.strip()
            child = procs.litellm(
                LITELLM_VENV,
                emulator_url=self.emulator.url(),
                master_key=self.litellm_key,
                workdir=self.workdir,
                cpus=self.gateway_cpus,
            )
            child.start(timeout=180)
        except (RuntimeError, TimeoutError, OSError, subprocess.SubprocessError) as exc:
            record.update(status="unavailable", reason=str(exc)[-1500:])
            print(f"LiteLLM unavailable, continuing without it: {str(exc)[-300:]}", flush=True)
            return
        self.litellm = child
        record.update(status="running", version=version, workers=1, endpoint="/chat/completions (SSE)")

    def close(self) -> None:
        for child in (self.litellm, self.gateway, self.redis, self.emulator):
            if child is not None:
                with contextlib.suppress(Exception):
                    child.stop()
        shutil.rmtree(self.workdir, ignore_errors=True)

    # ------------------------------------------------------------------ one measured run

    def systems(self) -> list[str]:
        return ["direct", "hubgate"] + (["litellm"] if self.litellm is not None else [])

    async def measure(
        self,
        system: str,
        *,
        concurrency: int,
        seconds: float,
        workload: Workload,
        tenant: str = "bench",
        retry_refused_after: float | None = None,
        stagger: float | None = None,
        on_started: Callable[[], None] | None = None,
    ) -> dict[str, Any]:
        """One closed-loop run against ``system``; latency figures plus CPU of every process.

        ``on_started`` runs once every connection is open, right before the streams start.
        """
        target = {"hubgate": self.gateway, "litellm": self.litellm}.get(system)
        marks: dict[str, float] = {}
        load_side = [c for c in (self.emulator, self.redis) if c is not None]

        async def started() -> None:
            if on_started is not None:
                on_started()
            marks["core0"] = procs.core_busy_seconds(self.gateway_core)
            marks["cpu0"] = target.cpu() if target else 0.0
            marks["own0"] = own_cpu()
            marks["load0"] = sum(c.cpu() for c in load_side)
            marks["wall0"] = time.perf_counter()

        async def finished() -> None:
            marks["cpu1"] = target.cpu() if target else 0.0
            marks["core1"] = procs.core_busy_seconds(self.gateway_core)
            marks["own1"] = own_cpu()
            marks["load1"] = sum(c.cpu() for c in load_side)
            marks["wall1"] = time.perf_counter()

        nominal = workload.ttft_ms / 1000 + workload.tokens * workload.token_delay_ms / 1000
        spread = min(2.0, nominal) if stagger is None else stagger
        options: dict[str, Any] = {
            "concurrency": concurrency,
            "seconds": seconds,
            "workload": workload,
            "stagger": spread,
            "retry_refused_after": retry_refused_after,
            "on_started": started,
            "on_finished": finished,
        }
        budget = seconds + nominal * 3 + 180
        async with asyncio.timeout(budget):
            if system == "direct":
                assert self.emulator is not None
                async with DirectPool(self.emulator.url(), pool=concurrency + 16) as pool:
                    stats = await run_closed_loop(lambda i: pool.worker(), **options)
            elif system == "hubgate":
                assert self.gateway is not None
                url, tokens = self.gateway.url("ws") + "/v1/stream", self.tokens[tenant]
                stats = await run_closed_loop(
                    lambda i: HubgateClient(url, tokens[i % len(tokens)]), **options
                )
            else:
                assert self.litellm is not None
                async with LitellmPool(self.litellm.url(), self.litellm_key, pool=concurrency + 16) as pool:
                    stats = await run_closed_loop(lambda i: pool.worker(), **options)
        return self._summary(system, stats, marks)

    def _summary(self, system: str, stats: RunStats, marks: dict[str, float]) -> dict[str, Any]:
        summary = stats.summary()
        wall = marks.get("wall1", 0) - marks.get("wall0", 0) or stats.seconds
        tokens = max(stats.tokens, 1)
        gateway_cpu = marks.get("cpu1", 0) - marks.get("cpu0", 0)
        own = marks.get("own1", 0) - marks.get("own0", 0)
        summary.update(
            system=system,
            wall_s=round(wall, 3),
            cpu_s=round(gateway_cpu, 3),
            cpu_util=round(gateway_cpu / wall, 3) if wall else None,
            cpu_ms_per_1k_tokens=(gateway_cpu * 1e6 / tokens) if system != "direct" else None,
            client_cpu_ms_per_1k_tokens=own * 1e6 / tokens,
            # What other processes (not ours) took from the gateway's core: a shared machine's noise.
            others_on_gateway_core=round(
                max(0.0, marks.get("core1", 0) - marks.get("core0", 0) - gateway_cpu) / wall, 3
            )
            if wall and self.gateway_core is not None
            else None,
            load_core_util=round((own + marks.get("load1", 0) - marks.get("load0", 0)) / wall, 3)
            if wall
            else None,
            requests=len(stats.results),
        )
        return summary

    def log(self, label: str, summary: dict[str, Any]) -> None:
        errors = summary.get("errors") or {}
        print(
            f"  {label:<34} streams={summary['streams']:<6} tokens={summary['tokens']:<7} "
            f"ttft p50/p99={summary['ttft_p50_ms']:.2f}/{summary['ttft_p99_ms']:.2f} ms "
            f"gap p50/p99={summary['gap_p50_ms']:.2f}/{summary['gap_p99_ms']:.2f} ms "
            f"cpu={summary['cpu_s']:.2f}s load-core={summary['load_core_util']} errors={errors or 0}",
            flush=True,
        )

    async def warm_up(self) -> None:
        for system in self.systems():
            await self.measure(system, concurrency=4, seconds=1.0, workload=Workload(tokens=10))

    # ------------------------------------------------------------------ phases

    async def phase_ttft(self) -> dict[str, Any]:
        """Time to first token at 1, 10, 100 streams; the emulator answers at once (ttft 0)."""
        plan = self.plan
        workload = Workload(tokens=plan.ttft_tokens, token_delay_ms=PACED_DELAY_MS, ttft_ms=0)
        levels: dict[str, Any] = {}
        for level in plan.ttft_levels:
            runs: dict[str, list[dict[str, Any]]] = {s: [] for s in self.systems()}
            for repeat in range(plan.repeats):
                for system in self.systems():
                    summary = await self.measure(
                        system, concurrency=level, seconds=plan.ttft_seconds, workload=workload
                    )
                    self.log(f"ttft {system} x{level} #{repeat + 1}", summary)
                    runs[system].append(summary)
            levels[str(level)] = {
                system: {
                    "ttft_p50_ms": median([r["ttft_p50_ms"] for r in rs]),
                    "ttft_p99_ms": median([r["ttft_p99_ms"] for r in rs]),
                    "streams": sum(r["streams"] for r in rs),
                    "errors": dict(sum((Counter(r["errors"]) for r in rs), Counter())),
                    "runs": rs,
                }
                for system, rs in runs.items()
            }
        return {"workload": asdict(workload), "levels": levels}

    async def phase_cpu(self) -> dict[str, Any]:
        """Gateway CPU per 1k relayed tokens: burst (no pacing) and paced at 50 tokens/s."""
        plan = self.plan
        shapes = {
            "burst": (plan.burst_concurrency, Workload(tokens=plan.burst_tokens)),
            "paced": (
                plan.paced_concurrency,
                Workload(tokens=plan.paced_tokens, token_delay_ms=PACED_DELAY_MS),
            ),
            "paced_kept": (
                plan.paced_kept_concurrency,
                Workload(tokens=plan.paced_tokens, token_delay_ms=PACED_DELAY_MS),
            ),
        }
        out: dict[str, Any] = {}
        for name, (concurrency, workload) in shapes.items():
            runs: dict[str, list[dict[str, Any]]] = {s: [] for s in self.systems()}
            for repeat in range(plan.repeats):
                for system in self.systems():
                    summary = await self.measure(
                        system, concurrency=concurrency, seconds=plan.cpu_seconds, workload=workload
                    )
                    self.log(f"cpu {name} {system} x{concurrency} #{repeat + 1}", summary)
                    runs[system].append(summary)
            out[name] = {
                "concurrency": concurrency,
                "workload": asdict(workload),
                **{
                    system: {
                        "cpu_ms_per_1k_tokens": median([r["cpu_ms_per_1k_tokens"] for r in rs])
                        if system != "direct"
                        else None,
                        "client_cpu_ms_per_1k_tokens": median([r["client_cpu_ms_per_1k_tokens"] for r in rs]),
                        "tokens": sum(r["tokens"] for r in rs),
                        "gap_p50_ms": median([r["gap_p50_ms"] for r in rs]),
                        "errors": dict(sum((Counter(r["errors"]) for r in rs), Counter())),
                        "runs": rs,
                    }
                    for system, rs in runs.items()
                },
            }
        return out

    async def phase_saturation(self) -> dict[str, Any]:
        """Raise the number of paced streams until inter-token p99 leaves direct + 10 ms."""
        plan = self.plan
        workload = Workload(tokens=plan.sat_tokens, token_delay_ms=PACED_DELAY_MS)
        levels: list[dict[str, Any]] = []
        best: dict[str, int] = {"hubgate": 0, "litellm": 0}
        alive = {"hubgate": True, "litellm": self.litellm is not None}
        delay = PACED_DELAY_MS
        for level in plan.sat_levels:
            if not any(alive.values()):
                break
            row: dict[str, Any] = {"concurrency": level}
            direct = await self.measure(
                "direct", concurrency=level, seconds=plan.sat_seconds, workload=workload
            )
            self.log(f"saturation direct x{level}", direct)
            row["direct"] = direct
            levels.append(row)
            ref = report.reference(levels, len(levels) - 1, delay)
            if ref is None:
                break  # the floor never kept the pace: nothing to judge against
            row["reference_level"] = ref["level"]
            for system in ("hubgate", "litellm"):
                if not alive[system]:
                    continue
                summary = await self.measure(
                    system, concurrency=level, seconds=plan.sat_seconds, workload=workload
                )
                self.log(f"saturation {system} x{level}", summary)
                ok = report.holds(summary, ref, delay)
                if not ok:
                    # The machine is shared: a level only fails if a second try fails too.
                    again = await self.measure(
                        "direct", concurrency=level, seconds=plan.sat_seconds, workload=workload
                    )
                    retry = await self.measure(
                        system, concurrency=level, seconds=plan.sat_seconds, workload=workload
                    )
                    self.log(f"saturation direct x{level} (again)", again)
                    self.log(f"saturation {system} x{level} (again)", retry)
                    if not report.load_bound(again, delay):
                        ref = dict(again, level=level)
                    ok = report.holds(retry, ref, delay)
                    if ok:
                        summary, row["direct"] = retry, again
                        row["reference_level"] = ref["level"]
                    summary["retried"] = True
                summary["holds"] = ok
                row[system] = summary
                if ok:
                    best[system] = level
                else:
                    alive[system] = False
        result: dict[str, Any] = {
            "workload": asdict(workload),
            "criterion": f"inter-token p99 <= direct p99 + {GAP_SLACK_MS:g} ms and TTFT p99 <= direct "
            f"TTFT p99 + {report.TTFT_SLACK_MS:g} ms (direct at the same concurrency, or at the largest "
            "lower one where the floor kept the pace), median gap at the pace, load core not full, no "
            "errors",
            "levels": levels,
        }
        found = report.search(result)
        result.update(
            max_streams=found["hubgate"],
            litellm_max_streams=found["litellm"] if self.litellm is not None else None,
            load_bound_at=found["load_bound_at"],
        )
        return result

    async def phase_shed(self, saturation: int, max_streams: int | None = None) -> dict[str, Any]:
        """Offer twice the saturation figure to a tenant capped below it: refuse explicitly, keep latency.

        The cap is SHED_HEADROOM of the saturation figure, the offered load twice that figure.

        Twice: with the default (a request over the cap is refused at once) and with the tenant's
        requests over the cap waiting up to SHED_QUEUE_MS for a slot (`stream_queue_ms`).
        """
        plan = self.plan
        offered = 2 * max(saturation, 1)
        cap = max(round(saturation * SHED_HEADROOM), 1)
        workload = Workload(tokens=plan.sat_tokens, token_delay_ms=PACED_DELAY_MS)
        direct = await self.measure("direct", concurrency=cap, seconds=plan.shed_seconds, workload=workload)
        self.log(f"shed direct x{cap}", direct)
        variants: dict[str, dict[str, Any]] = {}
        for name, queue_ms in (("refuse", 0), ("queue", SHED_QUEUE_MS)):
            self.start_gateway(shed_cap=cap, shed_queue_ms=queue_ms)
            summary = await self.measure(
                "hubgate",
                concurrency=offered,
                seconds=plan.shed_seconds,
                workload=workload,
                tenant="shed",
                retry_refused_after=SHED_RETRY_S,
            )
            self.log(f"shed hubgate x{offered} (cap {cap}, queue {queue_ms} ms)", summary)
            variants[name] = _shed_outcome(summary, direct, queue_ms)
        self.start_gateway()
        return {
            "saturation": saturation,
            "max_streams": max_streams,
            "cap": cap,
            "offered_streams": offered,
            "retry_s": SHED_RETRY_S,
            "direct_gap_p99_ms": direct["gap_p99_ms"],
            "direct": direct,
            "variants": variants,
        }

    async def phase_idle(self) -> dict[str, Any]:
        """Resident memory per idle, authenticated connection."""
        assert self.gateway is not None
        count = self.plan.idle_connections
        url = self.gateway.url("ws") + "/v1/stream"
        tokens = self.tokens["bench"]
        # Warm every code path first, so the figure is the connections and not first-use imports.
        warm = await clients.open_idle_websockets(url, tokens, 100)
        await asyncio.gather(*(c.close() for c in warm))
        await asyncio.sleep(1.0)
        before = self.gateway.rss()
        started = time.perf_counter()
        conns = await clients.open_idle_websockets(url, tokens, count)
        opened_s = time.perf_counter() - started
        await asyncio.sleep(2.0)
        after = self.gateway.rss()
        await asyncio.gather(*(c.close() for c in conns))
        result: dict[str, Any] = {
            "connections": count,
            "rss_before_kib": before,
            "rss_after_kib": after,
            "kib_per_connection": (after - before) / count,
            "open_seconds": round(opened_s, 2),
        }
        print(f"  idle hubgate x{count}: {result['kib_per_connection']:.2f} KiB/connection", flush=True)
        if self.litellm is not None:
            # SSE has no idle stream; the nearest thing is an idle HTTP/1.1 keep-alive connection.
            warm_http = await clients.open_idle_http(
                procs.LOOPBACK, self.litellm.port, "/health/liveliness", 100
            )
            for writer in warm_http:
                writer.close()
            await asyncio.sleep(1.0)
            before = self.litellm.rss()
            writers = await clients.open_idle_http(
                procs.LOOPBACK, self.litellm.port, "/health/liveliness", count
            )
            await asyncio.sleep(2.0)
            after = self.litellm.rss()
            for writer in writers:
                writer.close()
            result["litellm"] = {
                "kind": "idle HTTP/1.1 keep-alive connection after one request",
                "rss_before_kib": before,
                "rss_after_kib": after,
                "kib_per_connection": (after - before) / count,
            }
            print(
                f"  idle litellm x{count}: {result['litellm']['kib_per_connection']:.2f} KiB/connection",
                flush=True,
            )
        # A fresh gateway for what follows: closing 5,000 connections (each gives its lease back
        # to Redis) would otherwise still be going on, and counted, in the next phase.
        self.start_gateway()
        await self.measure("hubgate", concurrency=4, seconds=1.0, workload=Workload(tokens=10))
        return result

    async def phase_request(self) -> dict[str, Any]:
        """Per-request cost (admission, settlement, metering): one-token replies, CPU per request."""
        plan = self.plan
        workload = Workload(tokens=1)
        out: dict[str, Any] = {"workload": asdict(workload), "concurrency": plan.request_concurrency}
        targets: list[tuple[str, str, str]] = [("direct", "direct", "bench"), ("hubgate", "hubgate", "bench")]
        targets.append(("hubgate_no_limits", "hubgate", "open"))
        if self.litellm is not None:
            targets.append(("litellm", "litellm", "bench"))
        for label, system, tenant in targets:
            summary = await self.request_batch(system, tenant, workload)
            self.log(f"request {label}", summary)
            out[label] = summary
        hub, bare = out["hubgate"], out["hubgate_no_limits"]
        out["limiter_cpu_us_per_request"] = hub["cpu_us_per_request"] - bare["cpu_us_per_request"]
        return out

    async def request_batch(self, system: str, tenant: str, workload: Workload) -> dict[str, Any]:
        """Exactly ``request_count`` requests spread over ``request_concurrency`` workers."""
        plan = self.plan
        per_worker = max(1, plan.request_count // plan.request_concurrency)
        # A closed loop bounded by count: seconds is only a safety net.
        summary = await self.measure_count(system, tenant, workload, per_worker)
        requests = max(summary["requests"], 1)
        summary["cpu_us_per_request"] = summary["cpu_s"] * 1e6 / requests
        summary["client_cpu_us_per_request"] = summary["own_cpu_s"] * 1e6 / requests
        return summary

    async def measure_count(
        self, system: str, tenant: str, workload: Workload, per_worker: int
    ) -> dict[str, Any]:
        plan = self.plan
        target = {"hubgate": self.gateway, "litellm": self.litellm}.get(system)
        assert self.emulator is not None
        results: list[clients.StreamResult] = []
        stack = contextlib.AsyncExitStack()
        async with stack:
            if system == "direct":
                pool: Any = await stack.enter_async_context(DirectPool(self.emulator.url(), pool=64))
                make: Callable[[int], clients.Client] = lambda i: pool.worker()  # noqa: E731
            elif system == "litellm":
                assert self.litellm is not None
                pool = await stack.enter_async_context(
                    LitellmPool(self.litellm.url(), self.litellm_key, pool=64)
                )
                make = lambda i: pool.worker()  # noqa: E731
            else:
                assert self.gateway is not None
                url, tokens = self.gateway.url("ws") + "/v1/stream", self.tokens[tenant]
                make = lambda i: HubgateClient(url, tokens[i % len(tokens)])  # noqa: E731
            workers = [make(i) for i in range(plan.request_concurrency)]
            codes = await asyncio.gather(*(w.open() for w in workers))
            if any(codes):
                raise RuntimeError(f"workers could not connect: {codes}")

            async def loop(worker: clients.Client) -> None:
                for _ in range(per_worker):
                    results.append(await worker.stream(workload))

            cpu0, own0, wall0 = (target.cpu() if target else 0.0), own_cpu(), time.perf_counter()
            async with asyncio.timeout(300):
                await asyncio.gather(*(loop(w) for w in workers))
            cpu1, own1, wall1 = (target.cpu() if target else 0.0), own_cpu(), time.perf_counter()
            await asyncio.gather(*(w.close() for w in workers))
        stats = RunStats(results, wall1 - wall0)
        summary = stats.summary()
        summary.update(
            system=system,
            tenant=tenant,
            requests=len(results),
            cpu_s=cpu1 - cpu0,
            own_cpu_s=own1 - own0,
            wall_s=wall1 - wall0,
            requests_per_s=len(results) / (wall1 - wall0),
            load_core_util=None,
        )
        return summary

    async def phase_redis(self) -> dict[str, Any]:
        """Redis commands per request from INFO commandstats, and a MONITOR timeline of one request."""
        if self.redis is None:
            return {"status": "no redis-server: hubgate ran with its in-memory limiter"}
        import redis as redis_sync
        import redis.asyncio as redis_async

        assert self.gateway is not None
        url = f"redis://{procs.LOOPBACK}:{self.redis.port}/0"
        admin = redis_sync.Redis.from_url(url)
        n = self.plan.redis_requests
        shapes = {
            "1 token": Workload(tokens=1),
            "100 tokens, burst": Workload(tokens=100),
            "50 tokens, paced 20 ms": Workload(tokens=50, token_delay_ms=PACED_DELAY_MS),
        }
        ws_url, token = self.gateway.url("ws") + "/v1/stream", self.tokens["bench"][0]
        out: dict[str, Any] = {"requests_per_shape": n, "shapes": {}}
        for name, workload in shapes.items():
            client = HubgateClient(ws_url, token)
            if await client.open():
                raise RuntimeError("redis phase: connection refused")
            await asyncio.sleep(0.3)  # let the connection's own lease write settle
            before = _commandstats(admin)
            tokens = 0
            for _ in range(n):
                tokens += (await client.stream(workload)).tokens
            await asyncio.sleep(0.3)  # the end-of-request writes (settle, buffer close) are asynchronous
            after = _commandstats(admin)
            await client.close()
            delta = {cmd: after.get(cmd, 0) - before.get(cmd, 0) for cmd in after}
            delta = {cmd: calls for cmd, calls in delta.items() if calls > 0 and cmd != "info"}
            out["shapes"][name] = {
                "tokens_per_request": tokens / n,
                "commands_per_request": {cmd: calls / n for cmd, calls in sorted(delta.items())},
                "total_commands_per_request": sum(delta.values()) / n,
            }
            print(
                f"  redis {name}: {out['shapes'][name]['total_commands_per_request']:.2f} commands/request "
                f"{out['shapes'][name]['commands_per_request']}",
                flush=True,
            )
        one, long = out["shapes"]["1 token"], out["shapes"]["100 tokens, burst"]
        out["extra_commands_per_token_burst"] = (
            long["total_commands_per_request"] - one["total_commands_per_request"]
        ) / max(long["tokens_per_request"] - one["tokens_per_request"], 1)
        paced = out["shapes"]["50 tokens, paced 20 ms"]
        out["extra_commands_per_token_paced"] = (
            paced["total_commands_per_request"] - one["total_commands_per_request"]
        ) / max(paced["tokens_per_request"] - one["tokens_per_request"], 1)
        out["timeline"] = await _monitor_one_request(redis_async.Redis.from_url(url), ws_url, token)
        admin.close()
        return out

    async def phase_profile(self) -> dict[str, Any]:
        """py-spy samples the gateway during a paced run and during one-token requests.

        The paced run shows the per-token path, the one-token run the per-request path (admission,
        upstream call set-up, buffer creation, settlement). Top functions go to profile.txt.
        """
        assert self.gateway is not None
        try:
            spy = shutil.which("py-spy") or str(
                procs.ensure_venv(TOOLS_VENV, ["py-spy"], "py-spy") / "bin" / "py-spy"
            )
        except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
            return {"status": f"py-spy unavailable: {exc}"}
        plan = self.plan
        paced = Workload(tokens=plan.sat_tokens, token_delay_ms=PACED_DELAY_MS)
        runs = {
            "paced": (
                plan.profile_concurrency,
                paced,
                f"{plan.profile_concurrency} paced streams (50 tokens/s each)",
            ),
            "requests": (
                plan.request_concurrency,
                Workload(tokens=1),
                f"{plan.request_concurrency} workers of one-token requests",
            ),
        }
        out: dict[str, Any] = {"status": "ok"}
        texts = []
        for name, (concurrency, workload, label) in runs.items():
            raw = self.out / f"profile-{name}.raw.txt"
            argv = [
                *procs.taskset_prefix(self.load_cpus),
                spy,
                "record",
                "--pid",
                str(self.gateway.pid),
                "--duration",
                str(int(plan.profile_seconds)),
                "--rate",
                "200",
                "--nonblocking",
                "--format",
                "raw",
                "--output",
                str(raw),
            ]
            recorders: list[subprocess.Popen[bytes]] = []

            def record(argv: list[str] = argv, recorders: list[subprocess.Popen[bytes]] = recorders) -> None:
                # Sample the streams only, not the connection handshakes before them.
                recorders.append(subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT))

            summary = await self.measure(
                "hubgate",
                concurrency=concurrency,
                seconds=plan.profile_seconds + 1,
                workload=workload,
                on_started=record,
            )
            recorder = recorders[0]
            self.log(f"profile {name} hubgate x{concurrency}", summary)
            try:
                output, _ = await asyncio.to_thread(recorder.communicate, timeout=120)
            except subprocess.TimeoutExpired:
                recorder.kill()
                output, _ = recorder.communicate()
            if recorder.returncode != 0 or not raw.exists():
                out[name] = {"status": f"py-spy failed: {output.decode(errors='replace')[-800:]}"}
                continue
            top = report.profile_tables(raw.read_text())
            texts.append(report.profile_text(top, label=label, seconds=plan.profile_seconds))
            out[name] = {"status": "ok", "label": label, "concurrency": concurrency, "run": summary, **top}
        (self.out / "profile.txt").write_text("\n".join(texts))
        return out

    # ------------------------------------------------------------------ driver

    async def run(self, phases: list[str]) -> None:
        await self.warm_up()
        record = self.results["phases"]
        saturation = None
        for phase in phases:
            print(f"[{phase}]", flush=True)
            started = time.perf_counter()
            if phase == "shed":
                if saturation is None:
                    saturation = self.args.shed_saturation or self.plan.sat_levels[0]
                    self.results["notes"].append(
                        f"shed phase ran without a saturation search; cap set to {saturation}"
                    )
                found = record.get("saturation", {}).get("max_streams")
                record[phase] = await self.phase_shed(saturation, found)
            else:
                record[phase] = await getattr(self, f"phase_{phase}")()
            if phase == "saturation":
                saturation = report.shed_basis(record[phase])
            record[phase]["phase_seconds"] = round(time.perf_counter() - started, 1)
        self.results["loadavg_end"] = procs.loadavg()
        self.results["finished"] = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


def _commandstats(client: Any) -> dict[str, int]:
    stats = client.info("commandstats")
    return {name.removeprefix("cmdstat_"): int(values["calls"]) for name, values in stats.items()}


async def _monitor_one_request(client: Any, url: str, token: str) -> dict[str, Any]:
    """Every Redis command around one paced request, split into start, per-token and end."""
    ws = HubgateClient(url, token)
    if await ws.open():
        raise RuntimeError("redis timeline: connection refused")
    commands: list[dict[str, Any]] = []
    ready = asyncio.Event()

    async def listen() -> None:
        async with client.monitor() as monitor:
            ready.set()
            async for command in monitor.listen():
                commands.append(command)

    listener = asyncio.create_task(listen())
    await ready.wait()
    await asyncio.sleep(0.2)
    sent = time.time()
    result = await ws.stream(Workload(tokens=50, token_delay_ms=PACED_DELAY_MS))
    first_token = sent + (result.ttft or 0)
    last_token = first_token + sum(result.gaps)
    await asyncio.sleep(0.5)
    listener.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await listener
    await ws.close()
    await client.aclose()
    window = [
        c
        for c in commands
        if c.get("time", 0) >= sent - 0.001 and not c["command"].upper().startswith("MONITOR")
    ]
    phases: dict[str, list[tuple[str, str, float]]] = {"start": [], "during": [], "end": []}
    scripted: dict[str, list[str]] = {"start": [], "during": [], "end": []}
    # The instance renews all of a tenant's leases in one call per interval, whatever the number of
    # requests: when a renewal falls in the window it belongs to no request, and is listed apart.
    renew = f"EVALSHA {RedisLimiter.RENEW.sha[:8]}"
    renewals, in_renewal = 0, False
    for command in window:
        words = command["command"].split()
        name = words[0].upper() if words else "?"
        if name == "EVALSHA" and len(words) > 1:
            name = f"EVALSHA {words[1][:8]}"
        at = command["time"]
        phase = "start" if at < first_token else "during" if at <= last_token else "end"
        if command.get("client_type") == "lua":
            # Commands a Lua script runs inside Redis cost no round trip: listed apart.
            if not in_renewal:
                scripted[phase].append(name)
        elif name == renew:
            renewals, in_renewal = renewals + 1, True
        else:
            in_renewal = False
            phases[phase].append((name, str(command.get("client_port")), at))
    return {
        "tokens": result.tokens,
        "commands": {p: [name for name, _, _ in entries] for p, entries in phases.items()},
        "inside_scripts": scripted,
        "round_trips": {p: _round_trips(entries) for p, entries in phases.items()},
        "lease_renewals": renewals,
        "pipeline_gap_ms": PIPELINE_GAP * 1000,
    }


PIPELINE_GAP = 0.001  # s; commands of one pipeline reach Redis together, a new round trip takes longer


def _round_trips(entries: list[tuple[str, str, float]]) -> int:
    """Commands one connection sent back to back (a pipeline, MULTI ... EXEC) count once.

    MONITOR shows each command with its connection and time: a pipeline's commands arrive
    together from one connection; a new round trip needs a reply read and a new send first.
    """
    trips, inside = 0, False
    previous: tuple[str, float] | None = None
    for name, port, at in entries:
        same_batch = (
            previous is not None and previous[0] == port and (inside or at - previous[1] < PIPELINE_GAP)
        )
        if not same_batch:
            trips += 1
        if name == "MULTI":
            inside = True
        elif name == "EXEC":
            inside = False
        previous = (port, at)
    return trips


def sanitize(value: Any) -> Any:
    if isinstance(value, float):
        return None if math.isnan(value) or math.isinf(value) else round(value, 4)
    if isinstance(value, dict):
        return {str(k): sanitize(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [sanitize(v) for v in value]
    return value


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument(
        "--smoke", dest="mode", action="store_const", const="smoke", help="small counts (default)"
    )
    mode.add_argument("--full", dest="mode", action="store_const", const="full", help="the real measurement")
    parser.add_argument("--skip-litellm", action="store_true", help="do not install or run LiteLLM")
    parser.add_argument("--only", default=",".join(PHASES), help=f"comma-separated phases of {PHASES}")
    parser.add_argument("--out", type=Path, default=REPO / "loadtests" / "results")
    parser.add_argument(
        "--report", type=Path, default=None, help="BENCHMARKS.md to write (--full: repo root)"
    )
    parser.add_argument(
        "--charts", type=Path, default=None, help="chart folder (--full: loadtests/bench/charts)"
    )
    parser.add_argument("--ttft-seconds", type=float, default=None, help="override the TTFT run length")
    parser.add_argument(
        "--code",
        choices=("head", "worktree"),
        default="head",
        help="serve an export of HEAD's src/ (default) or the working tree as it is",
    )
    parser.add_argument(
        "--shed-saturation",
        type=int,
        default=None,
        help="saturation figure for --only shed (default: the first level); the cap is 80%% of it",
    )
    parser.add_argument(
        "--from-results",
        type=Path,
        default=None,
        help="measure nothing: write the report and charts again from a results JSON",
    )
    parser.set_defaults(mode="smoke")
    args = parser.parse_args(argv)
    phases = [p.strip() for p in args.only.split(",") if p.strip()]
    unknown = sorted(set(phases) - set(PHASES))
    if unknown:
        parser.error(f"unknown phases {unknown}; choose from {PHASES}")
    args.phases = [p for p in PHASES if p in phases]
    if args.report is None:
        args.report = REPO / "BENCHMARKS.md" if args.mode == "full" else args.out / "BENCHMARKS.md"
    if args.charts is None:
        args.charts = REPO / "loadtests" / "bench" / "charts" if args.mode == "full" else args.out / "charts"
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.from_results is not None:
        results = json.loads(args.from_results.read_text())
        charts = report.write_charts(results, args.charts)
        report.write_markdown(results, args.report, charts, repo=REPO)
        print(report.table(results))
        print(f"report: {args.report}")
        return 0
    plan = FULL if args.mode == "full" else SMOKE
    if args.ttft_seconds is not None:
        plan = replace(plan, ttft_seconds=args.ttft_seconds)
    args.out.mkdir(parents=True, exist_ok=True)
    bench = Bench(plan, args)
    try:
        bench.start()
        runner: Any = asyncio.run
        with contextlib.suppress(ImportError):
            import uvloop

            runner = uvloop.run
        runner(bench.run(args.phases))
    finally:
        bench.close()
    results = sanitize(bench.results)
    results_path = args.out / f"results-{args.mode}.json"
    results_path.write_text(json.dumps(results, indent=2))
    charts = report.write_charts(results, args.charts)
    report.write_markdown(results, args.report, charts, repo=REPO)
    print(report.table(results))
    print(f"results: {results_path}\nreport:  {args.report}")
    return 0


def _shed_outcome(summary: dict[str, Any], direct: dict[str, Any], queue_ms: int) -> dict[str, Any]:
    """One shedding run judged: explicit refusals only, and admitted streams' gaps near the floor's."""
    errors = Counter(summary["errors"])
    refused = sum(n for code, n in errors.items() if code in EXPLICIT_REFUSALS)
    return {
        "queue_ms": queue_ms,
        "admitted_streams": summary["streams"],
        "refused": refused,
        "refusal_codes": dict(errors),
        "other_errors": sum(n for code, n in errors.items() if code not in EXPLICIT_REFUSALS),
        "admitted_gap_p99_ms": summary["gap_p99_ms"],
        "admitted_gap_p50_ms": summary["gap_p50_ms"],
        "admitted_ttft_p50_ms": summary["ttft_p50_ms"],
        "admitted_ttft_p99_ms": summary["ttft_p99_ms"],
        "keeps_latency": summary["gap_p99_ms"] <= direct["gap_p99_ms"] + GAP_SLACK_MS,
        "run": summary,
    }


if __name__ == "__main__":
    sys.exit(main())
