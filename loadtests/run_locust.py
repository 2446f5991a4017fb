"""Run loadtests/locustfile.py headless against a local stack it starts and stops.

    .venv/bin/python loadtests/run_locust.py [--users 50] [--spawn-rate 10] [--duration 60s]
        [--out loadtests/results/locust-<time>] [--ttft-ms 300] [--token-delay-ms 20] [--no-redis]

The stack: the Bedrock emulator with realistic delays, a private redis-server on a free port
(when the binary exists; otherwise the gateway's in-memory limiter), and ``hubgate serve`` with a
tenants file of four tenants and an HS256 secret. Tokens are minted for several users of every
tenant. ``small`` has tight limits on purpose, so refusals appear in the report as their own
``refused:*`` entries. Output: ``locust_stats.csv`` and friends plus ``locust.html`` in --out.
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from bench import procs

from hubgate.tokens import mint_dev_token

REPO = Path(__file__).resolve().parents[1]
TENANTS: dict[str, dict[str, int | None]] = {
    "acme": {"requests_per_minute": 6000, "tokens_per_minute": 5_000_000, "max_connections": 1000},
    "globex": {
        "requests_per_minute": 3000,
        "tokens_per_minute": 2_000_000,
        "per_user_requests_per_minute": 600,
        "max_connections": 500,
        "max_concurrent_streams": 200,
    },
    "initech": {"requests_per_minute": 1200, "tokens_per_minute": 1_000_000, "max_connections": 300},
    # Tight on purpose: shows rate_limited, too_many_streams and HTTP 429 at the handshake.
    "small": {
        "requests_per_minute": 30,
        "request_burst": 5,
        "tokens_per_minute": 60_000,
        "max_connections": 4,
        "max_concurrent_streams": 2,
    },
}
USERS_PER_TENANT = 5


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--users", "-u", type=int, default=50, help="simulated users (default 50)")
    parser.add_argument("--spawn-rate", "-r", type=float, default=10, help="users started per second")
    parser.add_argument(
        "--duration", "-t", default="60s", help="locust --run-time, e.g. 30s, 5m (default 60s)"
    )
    parser.add_argument(
        "--out", type=Path, default=None, help="output folder (default loadtests/results/locust-<time>)"
    )
    parser.add_argument("--ttft-ms", type=float, default=300, help="emulator time to first token")
    parser.add_argument("--token-delay-ms", type=float, default=20, help="emulator gap between tokens")
    parser.add_argument(
        "--no-redis", action="store_true", help="use the in-memory limiter even if Redis exists"
    )
    return parser.parse_args()


def main() -> int:
    args = parse_args()
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    out: Path = args.out or REPO / "loadtests" / "results" / f"locust-{stamp}"
    out.mkdir(parents=True, exist_ok=True)
    procs.raise_fd_limit()
    workdir = Path(tempfile.mkdtemp(prefix="hubgate-locust-"))
    secret = procs.new_secret()
    children: list[procs.Child] = []
    try:
        emulator = procs.emulator(
            sys.executable, ttft_ms=args.ttft_ms, token_delay_ms=args.token_delay_ms, cpus=None
        )
        emulator.start()
        children.append(emulator)
        redis = None if args.no_redis else procs.redis(None)
        if redis is not None:
            redis.start()
            children.append(redis)
        tenants_file = workdir / "tenants.yaml"
        tenants_file.write_text(procs.tenants_yaml(TENANTS))
        gateway = procs.gateway(
            sys.executable,
            emulator_url=emulator.url(),
            redis_url=None if redis is None else f"redis://{procs.LOOPBACK}:{redis.port}/0",
            tenants_file=tenants_file,
            secret=secret,
            cpus=None,
        )
        gateway.start()
        children.append(gateway)
        tokens = [
            mint_dev_token(secret, tenant=tenant, user=f"load-{i}", lifetime_seconds=24 * 3600)
            for tenant in TENANTS
            for i in range(USERS_PER_TENANT)
        ]
        url = gateway.url("ws") + "/v1/stream"
        print(
            f"stack: gateway {url}, emulator {emulator.url()} (ttft {args.ttft_ms:g} ms, "
            f"{args.token_delay_ms:g} ms/token), limiter "
            f"{'redis on port ' + str(redis.port) if redis else 'in memory'}, tenants {', '.join(TENANTS)}",
            flush=True,
        )
        env = {**os.environ, "HUBGATE_URL": url, "HUBGATE_TOKENS": ",".join(tokens)}
        command = [
            sys.executable,
            "-m",
            "locust",
            "-f",
            str(REPO / "loadtests" / "locustfile.py"),
            "--headless",
            "--users",
            str(args.users),
            "--spawn-rate",
            str(args.spawn_rate),
            "--run-time",
            args.duration,
            "--stop-timeout",
            "30",
            "--csv",
            str(out / "locust"),
            "--html",
            str(out / "locust.html"),
            "--only-summary",
            "--loglevel",
            "WARNING",
            # Refusals are expected (the `small` tenant) and reported as failures; they are no
            # reason for a non-zero exit.
            "--exit-code-on-error",
            "0",
        ]
        result = subprocess.run(command, env=env, check=False)
        if not gateway.alive():
            print(f"the gateway exited during the run:\n{gateway.output()}", file=sys.stderr)
            return 1
    finally:
        for child in reversed(children):
            child.stop()
    summarize(out / "locust_stats.csv")
    print(f"report: {out / 'locust.html'}\ncsv:    {out}/locust_*.csv")
    return result.returncode


def summarize(stats_csv: Path) -> None:
    if not stats_csv.exists():
        return
    with stats_csv.open() as handle:
        rows = list(csv.DictReader(handle))
    print(f"\n{'name':<32} {'count':>7} {'fail':>6} {'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8}")
    for row in rows:
        print(
            f"{row['Name']:<32} {row['Request Count']:>7} {row['Failure Count']:>6} "
            f"{row['50%']:>8} {row['95%']:>8} {row['99%']:>8}"
        )


if __name__ == "__main__":
    sys.exit(main())
