"""Requests waiting on this instance for one of their tenant's stream slots.

A tenant with ``stream_queue_ms`` in its limits does not have a request refused at once when it
runs its ``max_concurrent_streams``: the request waits, first come first served among that
tenant's requests on this instance, for up to that long. A stream of the tenant ending here wakes
the first waiter; so does a timer every ``poll`` seconds while anyone waits, since a slot may
also be freed on another instance. A woken waiter asks the limiter; refused again, it goes back
to the head of the line. One request asks at a time, so a long line costs the limiter nothing
more than the requests that get in.

This module only keeps the line; the registry decides what a woken waiter does.
"""

from __future__ import annotations

import asyncio
from collections import deque


class SlotQueue:
    """Per-tenant first-come-first-served lines of requests waiting for a stream slot."""

    def __init__(self, *, poll: float) -> None:
        self.poll = poll
        self._lines: dict[str, deque[asyncio.Future[None]]] = {}
        self._ticks: dict[str, asyncio.TimerHandle] = {}

    def waiting(self, tenant: str | None = None) -> int:
        """Requests waiting for a slot: of one tenant, or of all of them."""
        if tenant is not None:
            line = self._lines.get(tenant)
            return 0 if line is None else len(line)
        return sum(len(line) for line in self._lines.values())

    async def wait(self, tenant: str, seconds: float, *, first: bool = False) -> None:
        """Wait in the tenant's line until woken, for at most ``seconds``.

        ``first`` puts the request at the head of the line (one that was woken and refused again
        keeps its place). Returns out of the line in every case; the caller asks the limiter and
        checks its own deadline.
        """
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[None] = loop.create_future()
        line = self._lines.get(tenant)
        if line is None:
            line = self._lines[tenant] = deque()
        if first:
            line.appendleft(waiter)
        else:
            line.append(waiter)
        if tenant not in self._ticks:
            self._ticks[tenant] = loop.call_later(self.poll, self._tick, tenant)
        timer = loop.call_later(max(0.0, seconds), _wake, waiter)
        try:
            await waiter
        finally:
            timer.cancel()
            line = self._lines.get(tenant)
            if line is not None:
                if waiter in line:  # its own time ran out, or it was cancelled
                    line.remove(waiter)
                if not line:
                    self._forget(tenant)

    def release(self, tenant: str) -> None:
        """A slot of the tenant may be free: wake the first waiter, which asks the limiter."""
        line = self._lines.get(tenant)
        if not line:
            return
        _wake(line.popleft())
        if not line:
            self._forget(tenant)

    def _tick(self, tenant: str) -> None:
        del self._ticks[tenant]
        self.release(tenant)
        if tenant in self._lines:
            self._ticks[tenant] = asyncio.get_running_loop().call_later(self.poll, self._tick, tenant)

    def _forget(self, tenant: str) -> None:
        self._lines.pop(tenant, None)
        tick = self._ticks.pop(tenant, None)
        if tick is not None:
            tick.cancel()


def _wake(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)
