"""Zero-loss shutdown: the drain sequence, in order, in one place.

ECS deregisters the task from the target group, then sends SIGTERM, and kills the task
``stopTimeout`` seconds later (120 s at most on Fargate). Within that window:

1. ``/readyz`` answers 503 and new WebSocket handshakes are refused with HTTP 503 (the load
   balancer and clients go elsewhere);
2. every open connection gets a ``draining`` frame. With a shared resume buffer (Redis) it is
   closed with 1012 at once: its streams keep running here and filling the buffer, and the
   client resumes them on another instance. Without one, a connection is closed with 1012 as
   soon as it has nothing in flight;
3. in-flight streams run to completion, for at most ``HUBGATE_DRAIN_SECONDS``;
4. what is still running then is cancelled (each stream ends with a frame, settles its
   reservation and is metered), remaining connections are closed with 1012;
5. the server closes its sockets and the lifespan releases the clients; the process exits 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from hubgate.gateway import Services

log = logging.getLogger("hubgate.drain")


async def drain(services: Services, *, deadline_seconds: float, close_now: bool) -> None:
    services.draining = True  # step 1: /readyz and the handshake check this flag
    log.info(
        "draining: %d connection(s), %d stream(s) in flight",
        len(services.connections),
        len(services.streams),
    )
    await asyncio.gather(  # step 2
        *(conn.start_draining(close_now=close_now) for conn in list(services.connections)),
        return_exceptions=True,
    )
    with contextlib.suppress(TimeoutError):  # step 3
        async with asyncio.timeout(deadline_seconds):
            await services.streams.wait_idle()
    if len(services.streams):  # step 4
        log.warning("drain deadline reached; cancelling %d stream(s)", len(services.streams))
        await services.streams.cancel_all()
    await asyncio.gather(
        *(conn.close_for_shutdown() for conn in list(services.connections)), return_exceptions=True
    )
    log.info("drained")
