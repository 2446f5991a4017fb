"""Keeps this instance's connection and stream leases alive in the limiter.

Leases expire by themselves (so a crashed task frees its tenants' capacity); a live instance
renews all of its leases for a tenant in one call per interval, never per token or per request.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import defaultdict

from hubgate.ratelimit.base import Limiter

log = logging.getLogger("hubgate.leases")


class LeaseKeeper:
    def __init__(self, limiter: Limiter, *, ttl: float) -> None:
        self._limiter = limiter
        self._interval = max(0.5, ttl / 3)
        self._leases: defaultdict[str, set[str]] = defaultdict(set)
        self._task: asyncio.Task[None] | None = None

    def add(self, tenant: str, lease: str) -> None:
        self._leases[tenant].add(lease)

    def discard(self, tenant: str, lease: str) -> None:
        leases = self._leases.get(tenant)
        if leases is not None:
            leases.discard(lease)
            if not leases:
                del self._leases[tenant]

    def count(self) -> int:
        return sum(len(v) for v in self._leases.values())

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="hubgate-lease-keeper")

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def renew_now(self) -> None:
        now = time.time()
        for tenant, leases in list(self._leases.items()):
            if leases:
                await self._limiter.renew(tenant, sorted(leases), now=now)

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            try:
                await self.renew_now()
            except Exception:  # a failed renewal must never stop renewals; the next one retries
                log.warning("lease renewal failed", exc_info=True)
