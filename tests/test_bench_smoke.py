"""The benchmark harness runs end to end in its smallest configuration and produces numbers.

It starts the real stack (emulator, redis-server, ``hubgate serve``) as loadtests/bench/run.py
does. Nothing here asserts a timing: CI machines vary; BENCHMARKS.md holds the measurements.
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
HARNESS = REPO / "loadtests" / "bench" / "run.py"

pytestmark = pytest.mark.slow


def _finite(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


@pytest.mark.timeout(120)
def test_smallest_bench_run_produces_numbers(tmp_path: Path) -> None:
    if shutil.which("redis-server") is None:
        pytest.fail("redis-server is not installed: run `make test`, which installs it")
    command = [
        sys.executable,
        str(HARNESS),
        "--smoke",
        "--skip-litellm",
        "--code",
        "worktree",
        "--only",
        "ttft",
        "--ttft-seconds",
        "1",
        "--out",
        str(tmp_path),
    ]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=110, check=False)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    results = json.loads((tmp_path / "results-smoke.json").read_text())
    assert results["litellm"]["status"].startswith("skipped")
    levels = results["phases"]["ttft"]["levels"]
    assert set(levels) == {"1", "10"}
    for level in levels.values():
        for system in ("direct", "hubgate"):
            figures = level[system]
            assert figures["streams"] > 0
            assert isinstance(figures["errors"], dict)
            assert _finite(figures["ttft_p50_ms"]) and figures["ttft_p50_ms"] > 0
            assert _finite(figures["ttft_p99_ms"])
    report = (tmp_path / "BENCHMARKS.md").read_text()
    assert "## Targets" in report
    assert "TTFT overhead p50 at 1 stream" in report
