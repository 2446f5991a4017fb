"""Checks on a gateway running as a child process: readiness figures, memory, and its logs."""

from __future__ import annotations

import asyncio
import contextlib
import json
from pathlib import Path
from typing import Any

import httpx

from tests.support.gateway_server import GatewayProcess

IDLE = {"status": "ready", "connections": 0, "streams": 0}


async def readyz(gateway: GatewayProcess) -> dict[str, Any]:
    """``GET /readyz`` of the process (its open connections and running streams)."""
    async with httpx.AsyncClient() as http:
        answer: dict[str, Any] = (await http.get(f"{gateway.http}/readyz", timeout=5)).json()
        return answer


async def wait_idle(gateway: GatewayProcess, timeout: float = 15.0) -> None:
    """Poll until the process reports no connection and no stream; raise TimeoutError otherwise."""
    state: dict[str, Any] = {}
    try:
        async with asyncio.timeout(timeout):
            while (state := await readyz(gateway)) != IDLE:
                await asyncio.sleep(0.05)
    except TimeoutError:
        raise TimeoutError(f"the gateway never became idle: {state}") from None


def error_records(gateway: GatewayProcess) -> list[tuple[str, str]]:
    """(logger, message) of its error-level (or worse) log lines.

    A traceback outside a JSON line (something wrote to stderr past the logging setup) counts
    too, under the logger "stderr".
    """
    found = []
    for line in gateway.output().splitlines():
        if line.startswith("{"):
            with contextlib.suppress(ValueError):
                entry = json.loads(line)
                if entry.get("level") in ("error", "critical"):
                    found.append((str(entry.get("logger", "")), str(entry.get("message", ""))))
                continue
        if "Traceback" in line or "Exception in ASGI application" in line:
            found.append(("stderr", line))
    return found


def logged_errors(gateway: GatewayProcess) -> list[str]:
    """Messages of its error-level (or worse) log lines, and any traceback outside a JSON line."""
    return [message for _, message in error_records(gateway)]


def assert_healthy(gateway: GatewayProcess, tolerated: tuple[str, ...] = ()) -> None:
    """Alive, and nothing logged at error level apart from the `tolerated` messages."""
    assert gateway.process is not None and gateway.process.poll() is None, gateway.output()[-4000:]
    assert "Exception in ASGI application" not in gateway.output()
    assert [m for m in logged_errors(gateway) if m not in tolerated] == []


def vm_rss_kib(pid: int) -> int:
    """Resident memory of a process, from /proc/<pid>/status (Linux)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")
