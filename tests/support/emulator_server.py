"""The Bedrock runtime emulator in a child process on a free loopback port, for tests.

    server = EmulatorServer(config=EmulatorConfig(ttft_ms=50))
    server.start()            # returns once GET /_emulator/health answers
    ... endpoint_url=server.url ...
    await server.wait_for_streams(lambda s: s["client_disconnected"] >= 1)
    server.stop()             # SIGTERM, then SIGKILL if it lingers

It is also a context manager. The observation helpers (``requests``, ``streams``, ``reset``) are
synchronous; from async tests use ``wait_for_streams`` or an async HTTP client, since a blocking
call stops the test's own event loop from closing its connections.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any

from hubgate.emulator import EmulatorConfig
from tests.support.redis_server import free_port


class EmulatorServer:
    """Start and stop ``python -m hubgate.emulator``; observe it through ``/_emulator/*``."""

    def __init__(
        self,
        config: EmulatorConfig | None = None,
        *,
        port: int | None = None,
        startup_timeout: float = 20.0,
    ) -> None:
        self.config = config or EmulatorConfig()
        self.host = "127.0.0.1"
        self._requested_port = port
        self.port = port or 0
        self.startup_timeout = startup_timeout
        self.process: subprocess.Popen[bytes] | None = None
        self.log_path: Path | None = None
        # Loopback only: never route these calls through an HTTP proxy from the environment.
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    @property
    def url(self) -> str:
        """The ``endpoint_url`` to give a bedrock-runtime client."""
        if self.process is None:
            raise RuntimeError("the emulator is not running; call start() first")
        return f"http://{self.host}:{self.port}"

    def start(self) -> None:
        if self.process is not None and self.process.poll() is None:
            return
        # A free port can be taken between picking it and binding it; try a few.
        attempts = 1 if self._requested_port else 3
        for attempt in range(attempts):
            self.port = self._requested_port or free_port()
            self._spawn()
            if self._wait_until_healthy():
                return
            output = self.output()
            self._terminate()
            if attempt == attempts - 1:
                raise RuntimeError(f"the emulator exited before answering on port {self.port}:\n{output}")

    def stop(self) -> None:
        self._terminate()
        if self.log_path is not None:
            self.log_path.unlink(missing_ok=True)
            self.log_path = None

    def __enter__(self) -> EmulatorServer:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def output(self) -> str:
        """What the emulator process has logged so far."""
        if self.log_path is None or not self.log_path.exists():
            return ""
        return self.log_path.read_text(errors="replace")[-4000:]

    # Observation --------------------------------------------------------------------------------

    def get_json(self, path: str) -> Any:
        with self._opener.open(f"{self.url}{path}", timeout=5) as response:
            return json.loads(response.read())

    def requests(self) -> list[dict[str, Any]]:
        """``GET /_emulator/requests``: the last 1000 model requests, oldest first."""
        records: list[dict[str, Any]] = self.get_json("/_emulator/requests")
        return records

    async def requests_with(self, marker: str) -> list[dict[str, Any]]:
        """The recorded model requests whose body contains ``marker`` (fetched off the event loop)."""
        records = await asyncio.to_thread(self.requests)
        return [r for r in records if marker in json.dumps(r["body"])]

    def streams(self) -> dict[str, int]:
        """``GET /_emulator/streams``: active, completed, client_disconnected, faulted."""
        counters: dict[str, int] = self.get_json("/_emulator/streams")
        return counters

    def reset(self) -> None:
        """``POST /_emulator/reset``."""
        request = urllib.request.Request(f"{self.url}/_emulator/reset", method="POST", data=b"")
        with self._opener.open(request, timeout=5):
            pass

    async def wait_for_streams(
        self, predicate: Callable[[dict[str, int]], bool], timeout: float = 5.0
    ) -> dict[str, int]:
        """Poll the stream counters (off the event loop) until ``predicate`` holds; raise on timeout."""
        deadline = time.monotonic() + timeout
        while True:
            counters = await asyncio.to_thread(self.streams)
            if predicate(counters):
                return counters
            if time.monotonic() > deadline:
                raise TimeoutError(f"stream counters never matched within {timeout}s: {counters}")
            await asyncio.sleep(0.02)

    # Internals ----------------------------------------------------------------------------------

    def _spawn(self) -> None:
        fd, name = tempfile.mkstemp(prefix="hubgate-emulator-", suffix=".log")
        self.log_path = Path(name)
        with open(fd, "wb") as log:
            self.process = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "hubgate.emulator",
                    "--host",
                    self.host,
                    "--port",
                    str(self.port),
                    "--ttft-ms",
                    repr(self.config.ttft_ms),
                    "--token-delay-ms",
                    repr(self.config.token_delay_ms),
                    "--log-level",
                    "warning",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )

    def _wait_until_healthy(self) -> bool:
        """True once the health route answers; False if the process exits first."""
        assert self.process is not None
        deadline = time.monotonic() + self.startup_timeout
        url = f"http://{self.host}:{self.port}/_emulator/health"
        while True:
            if self.process.poll() is not None:
                return False
            try:
                with self._opener.open(url, timeout=1) as response:
                    if response.status == 200:
                        return True
            except (urllib.error.URLError, OSError):
                pass
            if time.monotonic() > deadline:
                output = self.output()
                self._terminate()
                raise TimeoutError(f"the emulator did not answer within {self.startup_timeout}s:\n{output}")
            time.sleep(0.02)

    def _terminate(self) -> None:
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        process.terminate()
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=5)
