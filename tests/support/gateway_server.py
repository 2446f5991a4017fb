"""Run the real gateway for tests: in-process (uvicorn in the test's loop) or as a child process."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

import httpx

from hubgate.app import create_app
from hubgate.server import EmbeddedServer, uvicorn_config
from hubgate.settings import Settings
from tests.support.redis_server import free_port, wait_for_port

TEST_SECRET = "test-secret-that-is-long-enough-for-hs256-use"
AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "AKIDHUBGATETEST",
    "AWS_SECRET_ACCESS_KEY": "test-secret",
    "AWS_SESSION_TOKEN": "",
}


def ensure_aws_env() -> None:
    """botocore needs credentials to sign; the emulator accepts any."""
    os.environ.setdefault("AWS_ACCESS_KEY_ID", AWS_ENV["AWS_ACCESS_KEY_ID"])
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", AWS_ENV["AWS_SECRET_ACCESS_KEY"])


def gateway_settings(emulator_url: str, **changes: object) -> Settings:
    base = Settings(
        host="127.0.0.1",
        port=free_port(),
        bedrock_endpoint_url=emulator_url,
        jwt_hs256_secret=TEST_SECRET,
        log_level="warning",
        upstream_read_timeout=10.0,
    )
    return base.replace(**changes)


@contextlib.asynccontextmanager
async def running_gateway(settings: Settings, **app_options: Any) -> AsyncIterator[EmbeddedServer]:
    """The real app under a real uvicorn server on a free port, in the current event loop.

    ``app_options`` go to ``create_app`` (e.g. ``tenants=`` a registry built in the test).
    """
    ensure_aws_env()
    app = create_app(settings, **app_options)
    server = EmbeddedServer(uvicorn_config(app, settings, loop="asyncio"), app, settings)
    task = asyncio.create_task(server.serve())
    try:
        async with asyncio.timeout(20):
            while not server.started:
                if task.done():
                    await task
                    raise RuntimeError("the gateway did not start")
                await asyncio.sleep(0.01)
        yield server
    finally:
        server.should_exit = True
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait_for(task, timeout=30)


def settings_env(settings: Settings) -> dict[str, str]:
    """The HUBGATE_* environment that reproduces `settings` in a child process."""
    env: dict[str, str] = {}
    for name in Settings.env_names():
        value = getattr(settings, name.removeprefix("HUBGATE_").lower())
        if value is None:
            continue
        if isinstance(value, tuple):
            value = ",".join(map(str, value))
        env[name] = str(value)
    return env


class GatewayProcess:
    """`hubgate serve` in a child process, as production runs it."""

    def __init__(self, settings: Settings, extra_env: Mapping[str, str] | None = None) -> None:
        self.settings = settings
        self.port = settings.port
        self.env = {**os.environ, **AWS_ENV, **settings_env(settings), **(extra_env or {})}
        self.process: subprocess.Popen[bytes] | None = None
        self.log_path = Path(f"/tmp/hubgate-gw-{self.port}.log")

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/v1/stream"

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        log = self.log_path.open("wb")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "hubgate", "serve"], env=self.env, stdout=log, stderr=subprocess.STDOUT
        )
        deadline = time.monotonic() + 30
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"gateway exited early:\n{self.log_path.read_text()[-4000:]}")
            try:
                if httpx.get(f"{self.http}/healthz", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError("gateway did not become healthy")
            time.sleep(0.05)

    def terminate(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)

    def wait(self, timeout: float) -> int:
        assert self.process is not None
        return self.process.wait(timeout=timeout)

    def stop(self) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)

    def output(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


__all__ = ["GatewayProcess", "free_port", "gateway_settings", "running_gateway", "wait_for_port"]
