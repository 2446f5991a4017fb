"""The local stack for load tests: emulator, Redis, hubgate and LiteLLM as child processes.

Every server listens on 127.0.0.1 on a free port and is stopped by ``Stack.close()``. Each
process can be pinned to a set of cores (``taskset -c``), and its CPU time and resident memory
are read from ``/proc`` so the figures belong to that process alone.
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

LOOPBACK = "127.0.0.1"
MODEL = "anthropic.claude-3-5-haiku-20241022-v1:0"
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
AWS_ENV = {"AWS_ACCESS_KEY_ID": "AKIDHUBGATEBENCH", "AWS_SECRET_ACCESS_KEY": "bench-secret"}

# Loopback only: never route the stack's own calls through a proxy from the environment.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        return int(sock.getsockname()[1])


def raise_fd_limit() -> int:
    """Raise this process's open-file limit to the hard limit (children inherit it)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = max(soft, 65536)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def http_get(url: str, timeout: float = 2.0) -> tuple[int, bytes]:
    try:
        with _OPENER.open(url, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def taskset_prefix(cpus: str | None) -> list[str]:
    if cpus is None or shutil.which("taskset") is None:
        return []
    return ["taskset", "-c", cpus]


def usable_cpus() -> list[int]:
    return sorted(os.sched_getaffinity(0))


# ------------------------------------------------------------------------------ /proc readers


def descendants(pid: int) -> list[int]:
    """``pid`` and every process below it."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat[stat.rindex(")") + 2 :].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    found, queue = [], [pid]
    while queue:
        current = queue.pop()
        found.append(current)
        queue.extend(children.get(current, []))
    return found


def core_busy_seconds(core: int | None) -> float:
    """Busy time of one core (all processes, ours and everyone else's), from /proc/stat."""
    if core is None:
        return 0.0
    with contextlib.suppress(OSError):
        for line in Path("/proc/stat").read_text().splitlines():
            if line.startswith(f"cpu{core} "):
                values = [int(v) for v in line.split()[1:]]
                # user nice system idle iowait irq softirq steal ...: busy = all but idle and iowait
                return (sum(values[:8]) - values[3] - values[4]) / CLOCK_TICKS
    return 0.0


def cpu_seconds(pid: int, *, tree: bool = False) -> float:
    """utime + stime of ``pid`` (all its threads), optionally summed over its descendants."""
    total = 0
    for each in descendants(pid) if tree else [pid]:
        try:
            stat = Path(f"/proc/{each}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of stat)
    return total / CLOCK_TICKS


def rss_kib(pid: int, *, tree: bool = False) -> int:
    """VmRSS of ``pid`` in KiB, optionally summed over its descendants."""
    total = 0
    for each in descendants(pid) if tree else [pid]:
        try:
            for line in Path(f"/proc/{each}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            continue
    return total


def machine() -> dict[str, str]:
    model = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {
        "nproc": str(os.cpu_count()),
        "cpu": model,
        "python": sys.version.split()[0],
        "kernel": os.uname().release,
    }


def loadavg() -> float:
    with contextlib.suppress(OSError):
        return float(Path("/proc/loadavg").read_text().split()[0])
    return float("nan")


# ------------------------------------------------------------------------------ processes


@dataclass
class Child:
    """One server process, with its log file and the port it answers on."""

    name: str
    argv: list[str]
    port: int
    env: dict[str, str]
    health: str | None
    tree: bool = False  # count CPU and memory over the process's descendants too
    process: subprocess.Popen[bytes] | None = None
    log_path: Path = field(default_factory=lambda: Path(tempfile.mkstemp(prefix="bench-", suffix=".log")[1]))
    workdir: Path | None = None  # removed with the log when the process is stopped

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def start(self, timeout: float = 60.0) -> None:
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(
                self.argv,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited early:\n{self.output()}")
            if self._healthy():
                return
            if time.monotonic() > deadline:
                output = self.output()
                self.stop()
                raise TimeoutError(f"{self.name} did not answer within {timeout:.0f} s:\n{output}")
            time.sleep(0.1)

    def _healthy(self) -> bool:
        if self.health is None:
            try:
                with socket.create_connection((LOOPBACK, self.port), timeout=0.5):
                    return True
            except OSError:
                return False
        try:
            status, _ = http_get(f"http://{LOOPBACK}:{self.port}{self.health}", timeout=1.0)
        except (urllib.error.URLError, OSError):
            return False
        return status == 200

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def cpu(self) -> float:
        return cpu_seconds(self.pid, tree=self.tree)

    def rss(self) -> int:
        return rss_kib(self.pid, tree=self.tree)

    def output(self, tail: int = 4000) -> str:
        with contextlib.suppress(OSError):
            return self.log_path.read_text(errors="replace")[-tail:]
        return ""

    def stop(self) -> None:
        """Stop the process (its group), then remove its log and work directory."""
        process, self.process = self.process, None
        if process is None:
            return
        try:
            self._terminate(process)
        finally:
            self.log_path.unlink(missing_ok=True)
            if self.workdir is not None:
                shutil.rmtree(self.workdir, ignore_errors=True)

    @staticmethod
    def _terminate(process: subprocess.Popen[bytes]) -> None:
        if process.poll() is None:
            # The process leads its own session: signal the whole group (taskset execs in place,
            # but LiteLLM or a shell wrapper may have children).
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=10)

    def url(self, scheme: str = "http") -> str:
        return f"{scheme}://{LOOPBACK}:{self.port}"


def emulator(python: str, *, ttft_ms: float, token_delay_ms: float, cpus: str | None) -> Child:
    port = free_port()
    argv = [
        *taskset_prefix(cpus),
        python,
        "-m",
        "hubgate.emulator",
        "--host",
        LOOPBACK,
        "--port",
        str(port),
        "--ttft-ms",
        str(ttft_ms),
        "--token-delay-ms",
        str(token_delay_ms),
        "--log-level",
        "warning",
    ]
    return Child("emulator", argv, port, dict(os.environ), "/_emulator/health")


def redis(cpus: str | None) -> Child | None:
    """A private redis-server (never the shared one on 6379); None when the binary is missing."""
    binary = shutil.which("redis-server")
    if binary is None:
        return None
    port = free_port()
    workdir = tempfile.mkdtemp(prefix="bench-redis-")
    argv = [
        *taskset_prefix(cpus),
        binary,
        "--port",
        str(port),
        "--bind",
        LOOPBACK,
        "--save",
        "",
        "--appendonly",
        "no",
        "--dir",
        workdir,
        "--protected-mode",
        "yes",
        "--loglevel",
        "warning",
        "--maxclients",
        "10000",
    ]
    return Child("redis", argv, port, dict(os.environ), None, workdir=Path(workdir))


def tenants_yaml(tenants: Mapping[str, Mapping[str, int | None]]) -> str:
    """A tenants file (JSON is valid YAML) giving every tenant the bench model and these limits."""
    document = {
        "tenants": {
            name: {
                "models": [MODEL],
                "default_max_tokens": 1024,
                "limits": {k: v for k, v in limits.items() if v is not None},
            }
            for name, limits in tenants.items()
        }
    }
    return json.dumps(document, indent=2)


BENCH_REDIS_TIMEOUT_MS = 500


def gateway(
    python: str,
    *,
    emulator_url: str,
    redis_url: str | None,
    tenants_file: Path,
    secret: str,
    cpus: str | None,
    extra_env: Mapping[str, str] | None = None,
) -> Child:
    port = free_port()
    env = {
        **os.environ,
        **AWS_ENV,
        "HUBGATE_HOST": LOOPBACK,
        "HUBGATE_PORT": str(port),
        "HUBGATE_JWT_HS256_SECRET": secret,
        "HUBGATE_TENANTS_FILE": str(tenants_file),
        "HUBGATE_BEDROCK_ENDPOINT_URL": emulator_url,
        "HUBGATE_LOG_LEVEL": "warning",
        "HUBGATE_DRAIN_SECONDS": "5",
        "HUBGATE_STREAM_GRACE_SECONDS": "2",
        # Redis shares the load core with the emulator and the load generator, which the larger
        # runs keep near full: its answers can take longer than the 50 ms default allows, and a
        # gateway that took that for an outage would measure its fallback instead of itself.
        "HUBGATE_REDIS_TIMEOUT_MS": str(BENCH_REDIS_TIMEOUT_MS),
        **(extra_env or {}),
    }
    env.pop("HUBGATE_REDIS_URL", None)
    if redis_url is not None:
        env["HUBGATE_REDIS_URL"] = redis_url
    argv = [*taskset_prefix(cpus), python, "-m", "hubgate", "serve"]
    return Child("hubgate", argv, port, env, "/healthz")


def litellm(venv: Path, *, emulator_url: str, master_key: str, workdir: Path, cpus: str | None) -> Child:
    """LiteLLM's proxy, one worker, with one Bedrock model pointed at the emulator."""
    port = free_port()
    config = workdir / "litellm-config.yaml"
    config.write_text(
        "\n".join(
            [
                "model_list:",
                "  - model_name: bench",
                "    litellm_params:",
                f"      model: bedrock/{MODEL}",
                f"      aws_bedrock_runtime_endpoint: {emulator_url}",
                f"      aws_access_key_id: {AWS_ENV['AWS_ACCESS_KEY_ID']}",
                f"      aws_secret_access_key: {AWS_ENV['AWS_SECRET_ACCESS_KEY']}",
                "      aws_region_name: us-east-1",
                "litellm_settings:",
                "  telemetry: false",
                "general_settings:",
                f"  master_key: {master_key}",
                "",
            ]
        )
    )
    env = {
        **os.environ,
        # No network here: use the cost map shipped in the package instead of fetching it.
        "LITELLM_LOCAL_MODEL_COST_MAP": "True",
        "LITELLM_LOG": "ERROR",
    }
    argv = [
        *taskset_prefix(cpus),
        str(venv / "bin" / "litellm"),
        "--config",
        str(config),
        "--host",
        LOOPBACK,
        "--port",
        str(port),
        "--num_workers",
        "1",
    ]
    return Child("litellm", argv, port, env, "/health/liveliness", tree=True)


def ensure_venv(path: Path, requirements: Sequence[str], marker: str, timeout: float = 900) -> Path:
    """A private virtualenv holding ``requirements``; ``marker`` is a file in bin/ proving it done.

    Raises RuntimeError with pip's output when the install fails.
    """
    if (path / "bin" / marker).exists():
        return path
    if not (path / "bin" / "python").exists():
        subprocess.run([sys.executable, "-m", "venv", str(path)], check=True, timeout=300)
        # Keep the environment out of git whatever the repository's ignore rules say.
        (path / ".gitignore").write_text("*\n")
    result = subprocess.run(
        [str(path / "bin" / "pip"), "install", "-q", *requirements],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if result.returncode != 0 or not (path / "bin" / marker).exists():
        raise RuntimeError(
            f"pip install {' '.join(requirements)} failed:\n{result.stdout[-2000:]}{result.stderr[-2000:]}"
        )
    return path


def new_secret() -> str:
    return secrets.token_urlsafe(32)
