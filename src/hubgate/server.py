"""uvicorn, configured for hubgate and with the shutdown order hubgate needs.

uvicorn's own shutdown closes every WebSocket with 1012 at once and then re-raises the
signal (so the process dies by SIGTERM). ``HubgateServer`` runs the drain sequence
(``hubgate.drain``) first, while the listening socket still answers ``/readyz`` with 503, and
exits normally (status 0) once drained.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import signal
import threading
from collections.abc import Iterator
from socket import socket
from types import FrameType
from typing import Any

import uvicorn
from starlette.applications import Starlette
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from hubgate.drain import drain
from hubgate.settings import Settings

_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def deadline_protocol(seconds: float) -> type[HttpToolsProtocol]:
    """uvicorn's HTTP protocol with a deadline for the request headers.

    uvicorn waits forever for the first request on a new connection, so a client that opens
    sockets and never completes a handshake (or trickles its headers) would hold them for good.
    """

    class HeaderDeadlineProtocol(HttpToolsProtocol):
        _deadline: asyncio.TimerHandle | None = None

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._deadline = self.loop.call_later(seconds, self._headers_too_slow)

        def on_headers_complete(self) -> None:
            self._cancel_deadline()
            super().on_headers_complete()

        def connection_lost(self, exc: Exception | None) -> None:
            self._cancel_deadline()
            super().connection_lost(exc)

        def handle_websocket_upgrade(self) -> None:
            super().handle_websocket_upgrade()
            # websockets refuses a request with a header or request line over 8 KiB (or too many
            # headers) and queues a 4xx answer that uvicorn's sans-I/O protocol never writes:
            # send it and close, so such a client cannot hold the socket open.
            upgraded = self.transport.get_protocol()
            conn = getattr(upgraded, "conn", None)
            if conn is not None and not getattr(upgraded, "handshake_initiated", True):
                self.transport.write(b"".join(conn.data_to_send()))
                self.transport.close()

        def _cancel_deadline(self) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
                self._deadline = None

        def _headers_too_slow(self) -> None:
            self._deadline = None
            self.transport.close()

    return HeaderDeadlineProtocol


def uvicorn_config(app: Any, settings: Settings, *, loop: str = "uvloop") -> uvicorn.Config:
    """The uvicorn configuration hubgate runs under (shared by `serve`, `dev` and the tests)."""
    return uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        loop=loop,
        lifespan="on",
        http=deadline_protocol(settings.handshake_timeout_seconds),
        # The sans-I/O websockets implementation, named explicitly: `auto` would pick whatever
        # happens to be installed, and the legacy implementation is deprecated upstream.
        ws="websockets-sansio",
        ws_max_size=settings.max_message_bytes,
        ws_ping_interval=settings.ping_interval_seconds or None,
        ws_ping_timeout=settings.ping_timeout_seconds or None,
        # Compression costs CPU and ~64 KiB of zlib state per connection; chat frames are small.
        ws_per_message_deflate=False,
        # hubgate.logs configures logging (JSON lines, levels, filters); uvicorn leaves it alone.
        log_config=None,
        log_level=None,
        access_log=False,
        # The drain already waited for streams; this only bounds uvicorn's own final wait.
        timeout_graceful_shutdown=5,
    )


def tune_gc(threshold: tuple[int, int, int]) -> None:
    """Fewer and shorter garbage collections, once start-up is over.

    With CPython's default thresholds (700, 10, 10) a busy gateway runs a full collection every
    second or two, and a full collection walks every object in the process: tens of milliseconds
    with hundreds of connections, during which no stream sends a token. Freezing what start-up
    created (modules, clients, settings) keeps it out of every later collection, and a larger
    first threshold makes collections rarer. Reference counting still frees everything that is
    not part of a cycle at once; collections only find cycles.
    """
    gc.freeze()
    gc.set_threshold(*threshold)


class HubgateServer(uvicorn.Server):
    """A uvicorn server that drains hubgate's connections and streams before shutting down.

    ``tune_gc`` (for the process that runs nothing else: ``hubgate serve``) applies
    ``settings.gc_threshold`` once the server has started.
    """

    def __init__(
        self, config: uvicorn.Config, app: Starlette, settings: Settings, *, tune_gc: bool = False
    ) -> None:
        super().__init__(config)
        self.hub_app = app
        self.settings = settings
        self.tune_gc = tune_gc

    async def startup(self, sockets: list[socket] | None = None) -> None:
        await super().startup(sockets)
        if self.tune_gc and self.started and self.settings.gc_threshold is not None:
            tune_gc(self.settings.gc_threshold)

    async def shutdown(self, sockets: list[socket] | None = None) -> None:
        services = getattr(self.hub_app.state, "services", None)
        if services is not None and not self.force_exit:
            await drain(
                services,
                deadline_seconds=self.settings.drain_seconds,
                # Closing at once only loses nothing when another instance can resume from a
                # shared buffer; in memory, wait for each connection's streams to finish.
                close_now=self.settings.redis_url is not None,
            )
        await super().shutdown(sockets)

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        """Like uvicorn's, without re-raising the signal afterwards: a drained exit is a clean exit."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        original = {sig: signal.signal(sig, self.handle_exit) for sig in _SIGNALS}
        try:
            yield
        finally:
            for sig, handler in original.items():
                signal.signal(sig, handler)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # A second SIGINT (Ctrl-C twice) skips the drain; SIGTERM never does.
        if self.should_exit and sig == signal.SIGINT:
            self.force_exit = True
        else:
            self.should_exit = True


class QuietServer(uvicorn.Server):
    """A plain uvicorn server that leaves signal handling to its host (the emulator in `dev`)."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class EmbeddedServer(HubgateServer):
    """A server that leaves signal handling to its host (the tests, or `hubgate dev`)."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield
