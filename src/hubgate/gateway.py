"""One WebSocket connection's life: authenticate, admit, pump frames, account.

The endpoint only pumps: messages are parsed by ``hubgate.protocol``, limits decided by the
limiter, replies produced by the provider. Every gateway error is mapped to an `error` frame
or a close code here, in one place (``Connection._dispatch`` and ``Connection.run``).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import secrets
import time
from collections.abc import Awaitable
from dataclasses import dataclass, field
from typing import Any, assert_never

from starlette.responses import JSONResponse
from starlette.websockets import WebSocket, WebSocketDisconnect

from hubgate import protocol
from hubgate.auth import Identity, JwtVerifier
from hubgate.errors import (
    AuthError,
    CloseCode,
    DuplicateId,
    GatewayError,
    LimiterUnavailable,
    RefreshRefused,
    RequestError,
    TenantRefused,
    TokenExpired,
    TooManyConnections,
    TooManyStreams,
)
from hubgate.leases import LeaseKeeper
from hubgate.metering import Metering
from hubgate.metrics import Metrics
from hubgate.ratelimit.base import Limiter
from hubgate.registry.base import Registry
from hubgate.resume import StreamKey
from hubgate.sessions import Session, SessionStore
from hubgate.settings import Settings
from hubgate.streams import ActiveStream, OwnerGone, StreamRegistry, StreamRequest
from hubgate.tenants import Tenant

log = logging.getLogger("hubgate.gateway")


@dataclass(slots=True)
class Services:
    """What connections share; built once in the app lifespan."""

    settings: Settings
    verifier: JwtVerifier
    tenants: Registry
    limiter: Limiter
    leases: LeaseKeeper
    sessions: SessionStore
    streams: StreamRegistry
    meter: Metering
    metrics: Metrics
    connections: set[Connection] = field(default_factory=set)
    draining: bool = False


class State(enum.Enum):
    HANDSHAKE = "handshake"
    AUTHENTICATING = "authenticating"
    OPEN = "open"
    EXPIRED = "expired"  # token past exp: running streams finish, new ones are refused
    CLOSED = "closed"


class MessageRate:
    """Per-connection message rate limit (pure; time passed in).

    A token bucket of ``rate`` messages a second holding 5 seconds' worth. Over it, each message is
    dropped (and answered with a `message_rate_limited` error by the caller). Dropped messages
    also fill a second bucket that drains at ``rate``: a client that keeps flooding, so that more
    than 5 seconds' worth of dropped messages pile up, is disconnected with close code 1008.
    """

    ALLOW, DROP, CLOSE = "allow", "drop", "close"

    def __init__(self, rate: float) -> None:
        self.rate = rate
        self.burst = max(1.0, rate * 5)
        self.tokens = self.burst
        self.dropped = 0.0
        self.updated = -1.0

    def check(self, now: float) -> str:
        if self.updated >= 0:
            elapsed = max(0.0, now - self.updated)
            self.tokens = min(self.burst, self.tokens + elapsed * self.rate)
            self.dropped = max(0.0, self.dropped - elapsed * self.rate)
        self.updated = now
        if self.tokens >= 1:
            self.tokens -= 1
            return self.ALLOW
        self.dropped += 1
        if self.dropped > self.burst:
            return self.CLOSE
        return self.DROP


class _Closed(Exception):
    """The socket is gone; stop pumping."""


class Connection:
    """One client connection to ``/v1/stream``."""

    def __init__(self, services: Services, websocket: WebSocket) -> None:
        self.s = services
        self.settings = services.settings
        self.ws = websocket
        self.id = secrets.token_hex(8)
        self.state = State.HANDSHAKE
        self.identity: Identity | None = None
        self.tenant: Tenant | None = None
        self._replays: dict[str, asyncio.Task[None]] = {}
        self.sending_since = 0.0
        self._background: set[asyncio.Task[None]] = set()
        self._lease = f"{self.settings.instance_id}:{self.id}"
        self._lease_tenant: str | None = None
        self._expiry_task: asyncio.Task[None] | None = None
        self._closing = False

    # ------------------------------------------------------------------ handshake

    async def run(self) -> None:
        try:
            if not await self._handshake():
                return
            self.s.connections.add(self)
            try:
                await self._pump()
            finally:
                self.s.connections.discard(self)
        finally:
            await self._teardown()

    async def _deny(
        self, status: int, code: str, message: str, headers: dict[str, str] | None = None
    ) -> None:
        response = JSONResponse(
            {"error": {"code": code, "message": message}}, status_code=status, headers=headers
        )
        await self.ws.send_denial_response(response)

    async def _handshake(self) -> bool:
        """Refuse with a real HTTP response before the upgrade, or accept and authenticate."""
        if self.s.draining:
            await self._deny(
                503, "draining", "this instance is shutting down; reconnect", {"Retry-After": "1"}
            )
            return False
        origin = self.ws.headers.get("origin")
        if self.settings.allowed_origins and origin not in self.settings.allowed_origins:
            await self._deny(403, "origin_not_allowed", "this Origin is not allowed")
            return False

        offered = list(self.ws.scope.get("subprotocols") or [])
        sub_token, offers_v1 = protocol.token_from_subprotocols(offered)
        authorization = self.ws.headers.get("authorization")
        header_token = protocol.token_from_authorization(authorization)
        malformed = (authorization is not None and header_token is None) or any(
            p == protocol.BEARER_PREFIX for p in offered
        )
        token = header_token or sub_token
        if malformed:
            await self._deny(401, "invalid_token", "malformed credentials", {"WWW-Authenticate": "Bearer"})
            return False
        if token is not None:
            try:
                await self._authenticate(token)
                await self._acquire_connection()
            except AuthError as exc:
                await self._deny(
                    401, exc.code, exc.message, {"WWW-Authenticate": 'Bearer error="invalid_token"'}
                )
                return False
            except TenantRefused as exc:
                await self._deny(403, exc.code, exc.message)
                return False
            except TooManyConnections as exc:
                await self._deny(429, exc.code, exc.message, {"Retry-After": "1"})
                return False
            except LimiterUnavailable as exc:
                await self._deny(503, exc.code, exc.message, {"Retry-After": "1"})
                return False

        await self.ws.accept(subprotocol=protocol.SUBPROTOCOL if offers_v1 else None)
        if token is None:
            self.state = State.AUTHENTICATING
            if not await self._first_message_auth():
                return False
        self.state = State.OPEN
        self._start_expiry_watch()
        identity, tenant = self._who()
        await self._send_frame(
            protocol.ready_frame(
                connection_id=self.id,
                tenant=tenant.id,
                user=identity.user,
                models=usable_models(self.s.tenants, tenant),
                default_model=tenant.default_model,
                expires_at=identity.expires_at,
            )
        )
        return True

    async def _first_message_auth(self) -> bool:
        try:
            async with asyncio.timeout(self.settings.auth_timeout_seconds):
                message = await self.ws.receive()
        except TimeoutError:
            await self._close(CloseCode.AUTH_TIMEOUT, "authentication timeout")
            return False
        if message["type"] == "websocket.disconnect":
            self.state = State.CLOSED
            return False
        raw = message.get("text")
        parsed: protocol.ClientMessage | None = None
        if raw is not None:  # a binary frame is never a message, even one holding an `auth`
            with contextlib.suppress(RequestError):
                parsed = protocol.parse_client_message(raw)
        if not isinstance(parsed, protocol.Auth):
            await self._close(CloseCode.UNAUTHORIZED, "authenticate first")
            return False
        try:
            await self._authenticate(parsed.token)
            await self._acquire_connection()
        except AuthError:
            await self._close(CloseCode.UNAUTHORIZED, "invalid token")
            return False
        except TenantRefused:
            await self._close(CloseCode.FORBIDDEN, "tenant refused")
            return False
        except (TooManyConnections, LimiterUnavailable):
            await self._close(CloseCode.TRY_AGAIN_LATER, "too many connections")
            return False
        return True

    async def _authenticate(self, token: str) -> None:
        identity = await self.s.verifier.verify(token)
        tenant = self.s.tenants.get(identity.tenant)
        if tenant is None or not tenant.enabled:
            # Unknown and disabled look the same to the caller.
            raise TenantRefused("this tenant is not enabled")
        self.identity, self.tenant = identity, tenant

    async def _acquire_connection(self) -> None:
        _, tenant = self._who()
        await self.s.limiter.acquire_connection(tenant.id, tenant.limits, lease=self._lease, now=time.time())
        self._lease_tenant = tenant.id
        self.s.leases.add(tenant.id, self._lease)

    def _who(self) -> tuple[Identity, Tenant]:
        assert self.identity is not None and self.tenant is not None
        return self.identity, self.tenant

    # ------------------------------------------------------------------ pumping

    async def _pump(self) -> None:
        rate = MessageRate(self.settings.max_messages_per_second)
        try:
            while True:
                message = await self.ws.receive()
                if message["type"] == "websocket.disconnect":
                    self.state = State.CLOSED
                    return
                raw = message.get("text")
                verdict = rate.check(time.monotonic())
                if verdict is not MessageRate.ALLOW:
                    if verdict is MessageRate.CLOSE:
                        await self._close(CloseCode.POLICY_VIOLATION, "message rate exceeded")
                        return
                    # Every dropped message is answered (with its id when it has one), so a client
                    # never waits for a reply that will not come.
                    await self._send_frame(
                        protocol.error_frame(
                            "message_rate_limited",
                            f"more than {rate.rate:g} messages a second on this connection; message dropped",
                            request_id=protocol.request_id_of(raw) if raw is not None else None,
                            retry_after=1.0 / rate.rate,
                        )
                    )
                    continue
                if raw is None:
                    await self._send_frame(
                        protocol.error_frame(
                            "invalid_message", "binary frames are not accepted; send JSON text"
                        )
                    )
                    continue
                try:
                    await self._dispatch(protocol.parse_client_message(raw))
                except GatewayError as exc:
                    # A request's error, or a store the gateway needs failing (internal_error):
                    # either way an answer to this message, and the connection stays open.
                    await self._send_frame(
                        protocol.error_frame(
                            exc.code,
                            exc.message,
                            request_id=protocol.request_id_of(raw),
                            retry_after=exc.retry_after,
                        )
                    )
        except _Closed:
            return

    async def _dispatch(self, message: protocol.ClientMessage) -> None:
        match message:
            case protocol.Chat():
                refusal = self._start_chat(message)
                if refusal is not None:
                    await self._send(refusal)
            case protocol.Cancel():
                await self._cancel(message.id)
            case protocol.Ping():
                frame: dict[str, Any] = {"type": "pong"}
                if message.id is not None:
                    frame["id"] = message.id
                await self._send_frame(frame)
            case protocol.Auth():
                await self._refresh(message.token)
            case protocol.Resume():
                await self._resume(message)
            case protocol.SessionCreate() | protocol.SessionGet() | protocol.SessionDelete():
                await self._session(message)
            case _:
                assert_never(message)

    async def _refresh(self, token: str) -> None:
        identity, _ = self._who()
        try:
            fresh = await self.s.verifier.verify(token)
        except AuthError as exc:
            raise RefreshRefused(exc.message) from exc
        if fresh.tenant != identity.tenant or fresh.user != identity.user:
            raise RefreshRefused("a refreshed token must be for the same tenant and user")
        current = self.s.tenants.get(fresh.tenant)
        if current is None or not current.enabled:
            await self._close(CloseCode.FORBIDDEN, "tenant refused")
            raise _Closed
        self.identity, self.tenant = fresh, current
        if self.state is State.EXPIRED:
            self.state = State.OPEN
        self._start_expiry_watch()
        await self._send_frame({"type": "auth.ok", "expires_at": int(fresh.expires_at)})

    # ------------------------------------------------------------------ token expiry

    def _start_expiry_watch(self) -> None:
        if self._expiry_task is not None:
            self._expiry_task.cancel()
        self._expiry_task = asyncio.create_task(self._expiry_watch(), name=f"expiry-{self.id}")

    async def _expiry_watch(self) -> None:
        identity, _ = self._who()
        warn_at = identity.expires_at - self.settings.auth_expiry_warning_seconds
        delay = warn_at - time.time()
        if delay > 0:
            await asyncio.sleep(delay)
        with contextlib.suppress(_Closed):
            await self._send_frame({"type": "auth.expiring", "expires_at": int(identity.expires_at)})
        delay = identity.expires_at - time.time()
        if delay > 0:
            await asyncio.sleep(delay)
        self.state = State.EXPIRED
        self._maybe_close_idle()

    # ------------------------------------------------------------------ streams

    def _key(self, request_id: str) -> StreamKey:
        identity, tenant = self._who()
        return StreamKey(tenant.id, identity.user, request_id)

    def in_flight(self) -> int:
        """Requests this connection is receiving: streams it owns plus replays from the buffer."""
        return len(self.s.streams.owned_by(self)) + len(self._replays)

    def _check_capacity(self) -> None:
        if self.in_flight() >= self.settings.max_streams_per_connection:
            raise TooManyStreams(
                f"at most {self.settings.max_streams_per_connection} concurrent requests per connection"
            )

    def _start_chat(self, chat: protocol.Chat) -> str | None:
        """Start the request; or the frame refusing it when this instance already knows the
        tenant is at its stream cap."""
        if self.state is State.EXPIRED:
            raise TokenExpired("the token has expired; send `auth` with a fresh token")
        key = self._key(chat.id)
        if key in self.s.streams.active or chat.id in self._replays:
            raise DuplicateId("a request with this id is already streaming")
        self._check_capacity()
        _, tenant = self._who()
        model = chat.model or tenant.default_model
        self.s.tenants.check_model(tenant, model)
        refusal = self.s.streams.refused_at_cap(chat.id, tenant)
        if refusal is not None:
            return refusal
        request = StreamRequest(
            key=key,
            tenant=tenant,
            connection_id=self.id,
            model=model,
            chat=chat,
            max_tokens=chat.max_tokens or tenant.default_max_tokens,
            lease=f"{self._lease}:{chat.id}",
            fallbacks=self.s.tenants.fallbacks_for(tenant, model),
        )
        self.s.streams.start(request, self)
        return None

    async def _resume(self, message: protocol.Resume) -> None:
        key = self._key(message.id)
        if message.id in self._replays:
            raise DuplicateId("this request is already being resumed on this connection")
        self._check_capacity()
        task = asyncio.create_task(self._run_resume(key, message.after), name=f"resume-{message.id[:32]}")
        self._replays[message.id] = task

    async def _run_resume(self, key: StreamKey, after: int) -> None:
        try:
            await self.s.streams.resume(key, after, self)
        except GatewayError as exc:
            with contextlib.suppress(_Closed):
                await self._send_frame(protocol.error_frame(exc.code, exc.message, request_id=key.request_id))
        except (OwnerGone, _Closed):
            pass
        finally:
            self._replays.pop(key.request_id, None)
            self._maybe_close_idle()

    async def _cancel(self, request_id: str) -> None:
        await self.s.streams.cancel(self._key(request_id))

    async def deliver(self, text: str) -> None:
        """Owner interface: send one frame of a stream this connection receives."""
        try:
            await self._send(text)
        except _Closed as exc:
            raise OwnerGone from exc

    def released(self, stream: ActiveStream) -> None:
        """Owner interface: a stream finished or moved to another connection."""
        self._maybe_close_idle()

    def _maybe_close_idle(self) -> None:
        """Close once nothing is in flight, if the token expired or the server is draining."""
        if self.state is State.CLOSED or self._closing or self.in_flight():
            return
        if self.state is State.EXPIRED:
            self._close_soon(CloseCode.UNAUTHORIZED, "token expired")
        elif self.s.draining:
            self._close_soon(CloseCode.SERVICE_RESTART, "server restarting")

    def _close_soon(self, code: int, reason: str) -> None:
        task = asyncio.create_task(self._close(code, reason))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def start_draining(self, *, close_now: bool) -> None:
        """Tell the client the server is going away; close now or when nothing is in flight."""
        with contextlib.suppress(_Closed):
            await self._send_frame({"type": "draining"})
        if close_now or not self.in_flight():
            await self._close(CloseCode.SERVICE_RESTART, "server restarting")

    # ------------------------------------------------------------------ sessions

    async def _session(
        self, message: protocol.SessionCreate | protocol.SessionGet | protocol.SessionDelete
    ) -> None:
        identity, tenant = self._who()
        store = self.s.sessions
        frame: dict[str, Any]
        match message:
            case protocol.SessionCreate():
                session = await store.create(tenant.id, identity.user, system=message.system, now=time.time())
                frame = _session_frame(session, with_messages=False)
            case protocol.SessionGet():
                session = await store.get(tenant.id, identity.user, message.session, now=time.time())
                frame = _session_frame(session, with_messages=True)
            case protocol.SessionDelete():
                await store.delete(tenant.id, identity.user, message.session)
                frame = {"type": "session.deleted", "session": message.session}
            case _:
                assert_never(message)
        if message.id is not None:
            frame["id"] = message.id
        await self._send_frame(frame)

    # ------------------------------------------------------------------ sending and closing

    async def _send(self, text: str) -> None:
        if self.state is State.CLOSED:
            raise _Closed
        # A send only waits when the client stops reading and the socket's buffer is full; the
        # instance's watchdog (`abort_if_stuck`) cuts such a client off after a deadline.
        self.sending_since = time.monotonic()
        try:
            await self.ws.send({"type": "websocket.send", "text": text})
        except (WebSocketDisconnect, RuntimeError, OSError) as exc:
            self.state = State.CLOSED
            raise _Closed from exc
        finally:
            self.sending_since = 0.0

    def abort_if_stuck(self, now: float, timeout: float) -> bool:
        """Drop the connection of a client that has not read anything for `timeout` seconds.

        Its streams detach and keep running for the grace period, so it can still resume. The
        socket is aborted (not closed gracefully: a close frame would queue behind the unread data).
        """
        if not self.sending_since or now - self.sending_since < timeout:
            return False
        log.warning("client stopped reading; disconnecting", extra={"connection_id": self.id})
        self.state = State.CLOSED
        transport = getattr(getattr(self.ws, "_send", None), "__self__", None)
        transport = getattr(transport, "transport", None)
        if transport is not None:
            transport.abort()
        return True

    async def _send_frame(self, frame: dict[str, Any]) -> None:
        await self._send(protocol.encode(frame))

    async def _close(self, code: int, reason: str) -> None:
        if self.state is State.CLOSED or self._closing:
            return
        self._closing = True
        with contextlib.suppress(WebSocketDisconnect, RuntimeError, OSError):
            await self.ws.close(code=code, reason=reason)
        self.state = State.CLOSED

    async def close_for_shutdown(self) -> None:
        await self._close(CloseCode.SERVICE_RESTART, "server restarting")

    async def _teardown(self) -> None:
        """Detach running streams (they keep going for the grace period) and give the lease back."""
        self.state = State.CLOSED
        if self._expiry_task is not None:
            self._expiry_task.cancel()
        self.s.streams.detach(self)
        replays = list(self._replays.values())
        for task in replays:
            task.cancel()
        if replays:
            await asyncio.gather(*replays, return_exceptions=True)
        if self._lease_tenant is not None:
            self.s.leases.discard(self._lease_tenant, self._lease)
            await _quietly(self.s.limiter.release_connection(self._lease_tenant, lease=self._lease))


async def _quietly(call: Awaitable[None]) -> None:
    try:
        await call
    except GatewayError:
        log.warning("limiter refused a release; the lease expires by itself")


def usable_models(registry: Registry, tenant: Tenant) -> list[str]:
    """The tenant's allowlist without the models retired in the catalogue."""
    return [m for m in tenant.models if (info := registry.model(m)) is None or info.enabled]


def _session_frame(session: Session, *, with_messages: bool) -> dict[str, Any]:
    frame: dict[str, Any] = {"type": "session", "session": session.id}
    if with_messages:
        frame["system"] = session.system
        frame["messages"] = [{"role": m.role, "content": m.content} for m in session.messages]
    return frame


async def watch_slow_clients(services: Services) -> None:
    """Once a second, disconnect clients whose sends have been blocked past the send timeout."""
    timeout = services.settings.send_timeout_seconds
    while True:
        await asyncio.sleep(1.0)
        now = time.monotonic()
        for connection in list(services.connections):
            connection.abort_if_stuck(now, timeout)


async def stream_endpoint(websocket: WebSocket) -> None:
    """Starlette WebSocket route for ``/v1/stream``."""
    services: Services = websocket.app.state.services
    await Connection(services, websocket).run()
