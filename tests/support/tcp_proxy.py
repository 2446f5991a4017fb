"""A TCP forwarder: one stable address in front of a backend that can change (like a load balancer),
counting the connections open through it so a test can see a client's pool really close."""

from __future__ import annotations

import asyncio
import contextlib

from tests.support.redis_server import free_port


class TcpProxy:
    def __init__(self, target_port: int) -> None:
        self.port = free_port()
        self.target_port = target_port
        self.open = 0  # connections open through the proxy now
        self._changed = asyncio.Condition()
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", self.port)

    def switch(self, target_port: int) -> None:
        """New connections go to `target_port`; open ones stay where they are."""
        self.target_port = target_port

    async def stop(self) -> None:
        """Stop listening and cut every open connection (an outage, seen from both sides)."""
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()

    async def wait_open(self, count: int, timeout: float = 5.0) -> None:
        """Return once exactly ``count`` connections are open."""
        async with asyncio.timeout(timeout), self._changed:
            await self._changed.wait_for(lambda: self.open == count)

    async def _count(self, change: int) -> None:
        async with self._changed:
            self.open += change
            self._changed.notify_all()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        await self._count(1)
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
            # The client closing its end is what ends the connection (a backend may keep it alive).
            upstream = asyncio.create_task(self._pipe(up_reader, writer))
            await self._pipe(reader, up_writer)
            upstream.cancel()
            await asyncio.gather(upstream, return_exceptions=True)
        except OSError:
            pass  # the backend refused: the client sees its connection closed
        finally:
            with contextlib.suppress(ConnectionError, OSError):
                writer.close()
            await self._count(-1)
            self._tasks.discard(task)

    @staticmethod
    async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            with contextlib.suppress(ConnectionError, OSError):
                writer.close()
