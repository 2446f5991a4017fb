"""Running requests: one task per chat request, owned by the instance rather than the socket.

A stream outlives the connection that started it: when the socket drops it keeps running,
detached, for a grace period so the client can reconnect (here or on another instance) and
``resume``. Every frame is kept for the local stream and written, in batches, to the resume
buffer (Redis when configured), so a resuming client gets every frame after its last ``seq``
exactly once, in order.

The registry knows nothing about WebSockets: a connection attaches itself as the stream's
``Owner``, which delivers frames and raises ``OwnerGone`` when its socket is gone.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import random
import time
from collections.abc import AsyncGenerator, Awaitable, Callable
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

from redis.exceptions import RedisError

from hubgate import protocol
from hubgate.errors import (
    BudgetExhausted,
    DuplicateId,
    GatewayError,
    RequestError,
    StreamNotFound,
    TooManyStreams,
    UpstreamError,
)
from hubgate.keys import Claim
from hubgate.leases import LeaseKeeper
from hubgate.metering import (
    Metering,
    Spend,
    UsageRecord,
    budget_fraction,
    crossed_threshold,
    month_of,
)
from hubgate.metrics import Metrics
from hubgate.providers.base import Completion, ProviderRequest, ProviderResolver, Turn
from hubgate.ratelimit.base import Admission, Limiter
from hubgate.ratelimit.policy import LimitPolicy
from hubgate.resume import BufferedFrame, BufferWriter, StreamBuffer, StreamKey, replay
from hubgate.sessions import Message, Session, SessionStore
from hubgate.slots import SlotQueue
from hubgate.telemetry import SpanRecorder
from hubgate.tenants import Tenant

log = logging.getLogger("hubgate.streams")


class Owner(Protocol):
    """Where a stream's frames go: a client connection."""

    async def deliver(self, text: str) -> None:
        """Send one frame's JSON text; raise OwnerGone when the socket is closed."""
        ...

    def released(self, stream: ActiveStream) -> None:
        """The stream finished, or another connection took it over."""
        ...


# How often a detached stream checks whether a client resumed it elsewhere (or asked to cancel).
WATCH_INTERVAL = 0.5
# How long a resuming reader waits on the buffer per read (and how often it says it is there).
READER_POLL = 1.0
# After the limiter refuses a tenant for its concurrent-stream cap, this instance refuses that
# tenant's new requests itself, without asking Redis, for this long or until one of the tenant's
# streams here ends: under overload, refusals stay cheap and admitted streams keep their latency.
STREAM_CAP_HOLD = 0.1
_STREAM_CAP_MESSAGE = "too many concurrent streams for this tenant"


class OwnerGone(Exception):
    """The connection a stream was sending to is closed."""


def estimate_input_tokens(system: str | None, contents: list[str]) -> int:
    """Approximate input tokens before Bedrock counts them: about four characters a token.

    Used only for the reservation; settlement uses Bedrock's real count.
    """
    # The rule of sessions.estimate_tokens, on the lengths alone (no concatenated copy).
    chars = len(system or "") + sum(len(c) for c in contents)
    return max(1, (chars + 3) // 4)


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Retries before the first token: capped exponential backoff with full jitter.

    Full jitter (a uniform pause in [0, min(cap, base * 2**attempt)]) spreads the retries of many
    throttled clients apart instead of synchronising them (AWS Architecture Blog, "Exponential
    Backoff And Jitter").
    """

    attempts: int = 3  # per model
    base: float = 0.2
    cap: float = 2.0
    max_seconds: float = 10.0  # for all attempts and fallbacks together

    def delay(self, attempt: int) -> float:
        return random.uniform(0.0, min(self.cap, self.base * 2**attempt))


def _go_live(stream: ActiveStream) -> None:
    """Hand a writer that kept nothing yet the frames so far (sent in one append), then every new one.

    Until then the frames live only in ``stream.frames``: nothing per token for a connected client.
    """
    writer = stream.writer
    if writer is None or writer.live:
        return
    for frame in _frames_of(stream):
        writer.push(frame)
    writer.go_live()


def _frames_of(stream: ActiveStream) -> list[BufferedFrame]:
    last = len(stream.frames) - 1
    return [
        BufferedFrame(seq, text.encode(), stream.ended and seq == last)
        for seq, text in enumerate(stream.frames)
    ]


@dataclass(slots=True)
class StreamRequest:
    """Everything a stream needs to run, resolved by the connection that received the chat."""

    key: StreamKey
    tenant: Tenant
    connection_id: str
    model: str
    chat: protocol.Chat
    max_tokens: int
    lease: str
    fallbacks: tuple[str, ...] = ()  # allowed models to try, in order, when `model` is throttled or down


@dataclass(eq=False, slots=True)
class ActiveStream:
    request: StreamRequest
    frames: list[str] = field(default_factory=list)  # every frame sent, index == seq
    owner: Owner | None = None  # the connection frames go to; None while detached
    task: asyncio.Task[None] | None = None
    writer: BufferWriter | None = None
    ended: bool = False  # its terminal frame is in `frames`
    cancel_requested: bool = False
    running: bool = False  # the task has begun: cancelling it now runs its cleanup
    finished: bool = False
    watcher: asyncio.Task[None] | None = None
    # Settles and meters the request; run just before its terminal frame goes out, so a client
    # that sends its next request on receiving `end` finds the capacity and refund already back.
    conclude: Callable[[], Awaitable[None]] | None = None

    @property
    def key(self) -> StreamKey:
        return self.request.key

    def cancel(self) -> None:
        """Stop the upstream now; the stream ends with `end` stop_reason `cancelled`."""
        if self.task is None or self.finished:
            return
        self.cancel_requested = True
        # A task cancelled before its first step never enters its try/finally, so it would end
        # without a frame and stay registered; one that has not begun sees the flag instead.
        if self.running:
            self.task.cancel()


class StreamRegistry:
    """The streams running on this instance, and how clients attach to them."""

    def __init__(
        self,
        *,
        providers: ProviderResolver,
        limiter: Limiter,
        leases: LeaseKeeper,
        buffer: StreamBuffer,
        sessions: SessionStore,
        meter: Metering,
        metrics: Metrics,
        grace_seconds: float,
        spans: SpanRecorder | None = None,
        retry: RetryPolicy | None = None,
        log_text_lengths: bool = False,
        flush_interval: float,
    ) -> None:
        self._providers = providers
        self._retry = retry or RetryPolicy()
        self._limiter = limiter
        self._leases = leases
        self._buffer = buffer
        self._sessions = sessions
        self._meter = meter
        self._metrics = metrics
        self._spans = spans
        self._log_text_lengths = log_text_lengths
        self._grace = grace_seconds
        self._flush_interval = flush_interval
        self.active: dict[StreamKey, ActiveStream] = {}
        self._streams_full: dict[str, float] = {}  # tenant -> monotonic time its cap hold ends
        self._slots = SlotQueue(poll=STREAM_CAP_HOLD)  # requests waiting for a stream slot
        self._idle = asyncio.Event()
        self._owners = itertools.count()  # marks each request's claim on its id as its own
        self._idle.set()

    def __len__(self) -> int:
        return len(self.active)

    @property
    def queued(self) -> int:
        """Requests waiting here for one of their tenant's stream slots."""
        return self._slots.waiting()

    # ------------------------------------------------------------------ starting

    def start(self, request: StreamRequest, owner: Owner) -> ActiveStream:
        """Register and start one request; DuplicateId if this user already runs that id here."""
        if request.key in self.active:
            raise DuplicateId("a request with this id is already streaming")
        stream = ActiveStream(request, owner=owner)
        self.active[request.key] = stream
        self._idle.clear()
        stream.task = asyncio.create_task(self._run(stream), name=f"stream-{request.key.request_id[:32]}")
        return stream

    async def wait_idle(self) -> None:
        await self._idle.wait()

    def refused_at_cap(self, request_id: str, tenant: Tenant) -> str | None:
        """The refusal frame for a new request of a tenant held at its stream cap (see `_admit`)
        with no room to wait in line, or None. Answering here, before any task is made, keeps
        refusals cheap under overload."""
        if not self._cap_held(tenant.id) or self._queue_has_room(tenant.id, tenant.limits):
            return None
        self._metrics.decision(TooManyStreams.code)
        return protocol.FrameBuilder(request_id).error(TooManyStreams.code, _STREAM_CAP_MESSAGE)

    def _cap_held(self, tenant: str) -> bool:
        held = self._streams_full.get(tenant)
        if held is None:
            return False
        if time.monotonic() < held:
            return True
        del self._streams_full[tenant]
        return False

    # ------------------------------------------------------------------ attaching

    def owned_by(self, owner: Owner) -> list[ActiveStream]:
        """The unfinished streams sending to `owner` (a finished one may still be settling)."""
        return [s for s in self.active.values() if s.owner is owner and not s.finished]

    def detach(self, owner: Owner) -> None:
        """The owner's socket is gone: its streams keep running for the grace period."""
        for stream in list(self.active.values()):
            if stream.owner is owner:
                self._detach(stream)

    def _detach(self, stream: ActiveStream) -> None:
        stream.owner = None
        _go_live(stream)  # the client will likely resume, maybe on another instance
        if stream.watcher is None and not stream.finished:
            stream.watcher = asyncio.create_task(self._watch_detached(stream))

    async def resume(self, key: StreamKey, after: int, owner: Owner) -> None:
        """Send every frame after `after`, then the live tail, to `owner`.

        A stream running here is re-attached directly; anything else is replayed from the
        resume buffer (written by whichever instance runs it). StreamNotFound when neither has it.
        """
        stream = self.active.get(key)
        if stream is not None and not stream.finished:
            await self._attach_local(stream, after, owner)
            return
        await self._replay_remote(key, after, owner)

    async def _attach_local(self, stream: ActiveStream, after: int, owner: Owner) -> None:
        # Another socket of the same user may still hold it (the old one not yet known dead).
        previous = stream.owner
        stream.owner = None
        if previous is not None:
            previous.released(stream)
        if stream.watcher is not None:
            stream.watcher.cancel()
            stream.watcher = None
        next_seq = after + 1
        if next_seq > len(stream.frames) and not stream.frames:
            next_seq = 0
        try:
            while True:
                pending = stream.frames[next_seq:]
                if not pending:
                    if stream.finished:
                        return
                    # No await between this check and the attach: the producer cannot slip a
                    # frame in between, so nothing is lost and nothing is sent twice.
                    stream.owner = owner
                    return
                for text in pending:
                    await owner.deliver(text)
                next_seq += len(pending)
        except OwnerGone:
            if not stream.finished and stream.owner is None:
                self._detach(stream)
            raise

    async def _replay_remote(self, key: StreamKey, after: int, owner: Owner) -> None:
        """Tail the shared buffer (written by the instance that runs the request).

        While tailing, a heartbeat tells the producing instance a client is reading, so it does
        not cancel the request at the end of its grace period.
        """
        if not await self._buffer.exists(key):
            raise StreamNotFound("no resumable request with this id")
        heartbeat = asyncio.create_task(self._reader_heartbeat(key))
        try:
            async for frame in replay(self._buffer, key, after, poll_seconds=READER_POLL):
                await owner.deliver(frame.data.decode())
        finally:
            heartbeat.cancel()

    async def watch_readers(self) -> None:
        """Write a request's frames to the resume buffer as they come once a client, on any
        instance, starts reading it there (its old connection here may not know it is dead yet).
        Runs until cancelled."""
        await self._buffer.watch_readers(self._reader_waiting)

    async def keep_buffers(self) -> None:
        """Keep the resume buffers of long requests from expiring. A buffer expires the resume TTL
        after its last write, and while its client is connected a request's frames are written
        only at its end: a reply longer than the TTL would lose its buffer (and with it resume and
        duplicate_id) without this. One call per interval for all running requests. Runs until
        cancelled."""
        interval = max(1.0, self._buffer.ttl_seconds / 3)
        while True:
            await asyncio.sleep(interval)
            keys = [s.key for s in self.active.values() if s.writer is not None and not s.finished]
            if not keys:
                continue
            try:
                await self._buffer.touch(keys)
            except GatewayError:
                log.warning("resume buffers could not be kept alive; trying again in %.0f s", interval)

    def _reader_waiting(self, key: StreamKey) -> None:
        stream = self.active.get(key)
        if stream is not None:
            _go_live(stream)

    async def _reader_heartbeat(self, key: StreamKey) -> None:
        while True:
            with contextlib.suppress(GatewayError):
                await self._buffer.signal_reader(key, time.time() + 3 * READER_POLL)
            await asyncio.sleep(READER_POLL)

    async def cancel(self, key: StreamKey) -> None:
        """Cancel a request by id: here if it runs here, else through the shared buffer."""
        stream = self.active.get(key)
        if stream is not None and not stream.finished:
            stream.cancel()
            return
        if await self._buffer.running(key):
            # Running on another instance: that instance sees the request while the stream is
            # detached from its original connection.
            await self._buffer.request_cancel(key)
            return
        raise StreamNotFound("no active request with this id")

    async def _watch_detached(self, stream: ActiveStream) -> None:
        """Cancel a detached stream nobody resumed within the grace period.

        A client tailing the buffer from another instance keeps it alive; a `cancel` sent through
        another instance stops it.
        """
        deadline = time.monotonic() + self._grace
        while time.monotonic() < deadline:
            await asyncio.sleep(min(WATCH_INTERVAL, max(0.0, deadline - time.monotonic())))
            if stream.owner is not None or stream.finished:
                return
            if stream.writer is None:
                continue
            try:
                control = await self._buffer.control(stream.key)
            except GatewayError:
                continue
            if control.cancel:
                break
            if control.reader_until > time.time():
                deadline = time.monotonic() + self._grace
        stream.watcher = None
        if stream.owner is None and not stream.finished:
            log.info("no resume within the grace period; cancelling %s", stream.key.request_id)
            stream.cancel()

    # ------------------------------------------------------------------ running

    async def _emit(self, stream: ActiveStream, text: str, *, terminal: bool = False) -> None:
        seq = len(stream.frames)
        stream.frames.append(text)
        stream.ended = terminal
        if stream.writer is not None and stream.writer.live:
            stream.writer.push(BufferedFrame(seq, text.encode(), terminal))
        if terminal:
            await self._close_out(stream)
        owner = stream.owner
        if owner is not None:
            try:
                await owner.deliver(text)
            except OwnerGone:
                if stream.owner is owner:
                    self._detach(stream)

    async def _close_out(self, stream: ActiveStream) -> None:
        """Before the terminal frame goes out: settle and meter the request and write its frames
        to the resume buffer, all at once, so that with Redis they leave in one pipeline
        (``hubgate.scripts``). Settling first means the client's next request finds its capacity."""
        calls: list[Awaitable[Any]] = []
        if stream.conclude is not None:
            conclude, stream.conclude = stream.conclude, None
            calls.append(conclude())
        writer = stream.writer
        if writer is not None:
            if not writer.live:
                writer.close_with(_frames_of(stream))
            calls.append(writer.aclose())
        if calls:
            await asyncio.gather(*calls)

    async def _run(self, stream: ActiveStream) -> None:
        request = stream.request
        key, chat, tenant = request.key, request.chat, request.tenant
        received = time.monotonic()
        served_model = request.model
        frames = protocol.FrameBuilder(chat.id)
        admission: Admission | None = None
        session: Session | None = None
        deltas: list[str] = []
        ttft_ms: float | None = None
        completion: Completion | None = None
        error_code: str | None = None
        input_estimate = 0
        reached_upstream = False
        started = False
        spend_before: Spend | None = None
        priced: list[UsageRecord] = []
        limits: dict[str, Any] | None = None  # known once admitted
        creating = False  # its resume buffer is being created

        async def conclude() -> None:
            record = await self._conclude(
                stream,
                admission=admission,
                completion=completion,
                deltas=len(deltas),
                input_estimate=input_estimate,
                error_code=error_code,
                ttft_ms=ttft_ms,
                duration_ms=(time.monotonic() - received) * 1000,
                reached_upstream=reached_upstream,
                model=served_model,
                reply_chars=sum(map(len, deltas)),
            )
            if record is not None:
                priced.append(record)

        stream.conclude = conclude
        stream.running = True
        # Unique to this request (a reused id on the same connection is another request).
        owner = f"{request.lease}#{next(self._owners)}"
        try:
            try:
                history: tuple[Message, ...] = ()
                system = chat.system
                if chat.session is not None:
                    session = await self._sessions.get(key.tenant, key.user, chat.session, now=time.time())
                    history = session.messages
                    system = chat.system if chat.system is not None else session.system
                turns = tuple(Turn(m.role, m.content) for m in history) + tuple(
                    Turn(m.role, m.content) for m in chat.messages
                )
                input_estimate = estimate_input_tokens(system, [t.content for t in turns])
                spend_before = await self._check_budget(request)
                claim = self._buffer.claim(key, owner)

                admission = await self._admit(request, input_estimate + request.max_tokens, claim)
                self._metrics.decision("admitted")
            except RequestError as exc:
                self._metrics.decision(exc.code)
                await self._emit(stream, frames.error(exc.code, exc.message, exc.retry_after), terminal=True)
                return
            self._leases.add(key.tenant, request.lease)
            if stream.cancel_requested:
                raise asyncio.CancelledError
            if admission.claimed:  # the admission created the buffer
                stream.writer = self._writer(stream)
            else:
                # Before the upstream call: an id still in the buffer (a request that ran a moment
                # ago) is refused with duplicate_id before Bedrock is asked, as the claim does.
                creating = True
                await self._open_writer(stream, owner)
                creating = False
            limits = {
                "requests_remaining": admission.remaining_requests,
                "tokens_remaining": admission.remaining_tokens,
                "reset_seconds": round(admission.reset_seconds, 3),
            }
            provider_request = ProviderRequest(
                model=request.model,
                messages=turns,
                max_tokens=request.max_tokens,
                system=system,
                temperature=chat.temperature,
                top_p=chat.top_p,
                stop=chat.stop,
                guardrail=tenant.guardrail,
            )
            upstream: AsyncGenerator[str | Completion, None] | None = None
            try:
                reached_upstream = True
                served_model, item, upstream = await self._open_upstream(request, provider_request)
                started = True
                await self._emit(stream, frames.start(served_model, limits, chat.session))
                while True:
                    if isinstance(item, str):
                        if ttft_ms is None:
                            ttft_ms = (time.monotonic() - received) * 1000
                        deltas.append(item)
                        await self._emit(stream, frames.delta(item))
                    else:
                        completion = item
                    try:
                        item = await anext(upstream)
                    except StopAsyncIteration:
                        break
                if completion is None:
                    raise UpstreamError("the model stream ended before it was complete")
                if session is not None and completion.stop_reason != "cancelled":
                    reply = Message("assistant", "".join(deltas))
                    user_messages = [Message(m.role, m.content) for m in chat.messages]
                    await self._sessions.append_turn(
                        key.tenant, key.user, session.id, user_messages, reply, now=time.time()
                    )
                await self._emit(stream, self._end(frames, completion, ttft_ms, received), terminal=True)
            except UpstreamError as exc:
                error_code = exc.code
                await self._emit(stream, frames.error(exc.code, exc.message), terminal=True)
            finally:
                if upstream is not None:
                    await upstream.aclose()  # stop paying for tokens nobody will receive
        except asyncio.CancelledError:
            if not stream.cancel_requested:
                raise
            if creating:  # cancelled during the buffer's creation: finish it, so it can be resumed
                with contextlib.suppress(DuplicateId):  # then the cancelled request is not resumable
                    await self._open_writer(stream, owner)
            completion = Completion("cancelled", input_estimate, len(deltas))
            if not started:
                await self._emit(stream, frames.start(request.model, limits, chat.session))
            await self._emit(stream, self._end(frames, completion, ttft_ms, received), terminal=True)
        except GatewayError as exc:
            # Anything else the services raise (e.g. a session store failure) ends this request
            # with a frame, never a dropped connection.
            error_code = exc.code
            await self._emit(stream, frames.error(exc.code, exc.message), terminal=True)
        finally:
            stream.finished = True
            if stream.watcher is not None:
                stream.watcher.cancel()
            if stream.conclude is not None:  # ended without a terminal frame (torn down)
                stream.conclude = None
                await conclude()
            await self._finish(stream, priced[0] if priced else None, spend_before)

    async def _open_upstream(
        self, request: StreamRequest, provider_request: ProviderRequest
    ) -> tuple[str, str | Completion, AsyncGenerator[str | Completion, None]]:
        """Start the upstream stream: retry a throttle or server error before the first token with
        capped exponential backoff and full jitter, then try the fallback models in order.

        Returns the model that serves, the first item it sent and the iterator of the rest.
        After the first token nothing is retried (the caller ends the stream with an error frame).
        """
        provider = await self._providers.provider_for(request.key.tenant, request.tenant.route)
        policy = self._retry
        deadline = time.monotonic() + policy.max_seconds
        models = (request.model, *request.fallbacks)
        last_error: UpstreamError | None = None
        for index, model in enumerate(models):
            attempt_request = replace(provider_request, model=model)
            for attempt in range(policy.attempts):
                upstream = provider.stream(attempt_request)
                try:
                    first = await anext(upstream)
                except UpstreamError as exc:
                    await upstream.aclose()
                    self._metrics.attempt(model, exc.code)
                    if not exc.retryable:
                        raise
                    last_error = exc
                    final = attempt == policy.attempts - 1
                    pause = policy.delay(attempt)
                    if final or time.monotonic() + pause > deadline:
                        break
                    await asyncio.sleep(pause)
                    continue
                except StopAsyncIteration:
                    raise UpstreamError("the model stream ended before it was complete") from None
                self._metrics.attempt(model, "ok")
                if index:
                    log.info(
                        "served by fallback model",
                        extra={"request_id": request.key.request_id, "model": model},
                    )
                return model, first, upstream
            if time.monotonic() >= deadline:
                break
        assert last_error is not None
        raise last_error

    async def _admit(self, request: StreamRequest, estimate: int, claim: Claim | None) -> Admission:
        """Admit through the limiter; a cancel during the call still gets the admission settled.

        A tenant the limiter just refused for its stream cap is refused here for STREAM_CAP_HOLD,
        or, when its limits give it a queue, its request waits in line for a slot (hubgate.slots).
        """
        tenant = request.key.tenant
        limits = request.tenant.limits
        if not limits.stream_queue_ms:
            if self._cap_held(tenant):
                raise TooManyStreams(_STREAM_CAP_MESSAGE)
            return await self._admit_capped(request, estimate, claim)
        deadline = time.monotonic() + limits.stream_queue_ms / 1000
        # A newcomer goes behind the requests already waiting rather than past them.
        if not self._slots.waiting(tenant) and not self._cap_held(tenant):
            with contextlib.suppress(TooManyStreams):
                return await self._admit_capped(request, estimate, claim)
        if not self._queue_has_room(tenant, limits):
            raise TooManyStreams(_STREAM_CAP_MESSAGE)
        woken = False
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TooManyStreams(_STREAM_CAP_MESSAGE)
            await self._slots.wait(tenant, remaining, first=woken)
            woken = True
            if time.monotonic() >= deadline:
                raise TooManyStreams(_STREAM_CAP_MESSAGE)
            with contextlib.suppress(TooManyStreams):  # woken: ask the limiter, past the hold
                return await self._admit_capped(request, estimate, claim)

    async def _admit_capped(self, request: StreamRequest, estimate: int, claim: Claim | None) -> Admission:
        try:
            return await self._admit_once(request, estimate, claim)
        except TooManyStreams:
            self._streams_full[request.key.tenant] = time.monotonic() + STREAM_CAP_HOLD
            raise

    def _queue_has_room(self, tenant: str, limits: LimitPolicy) -> bool:
        """May one more request of the tenant wait here? At most its stream cap of them do."""
        if not limits.stream_queue_ms:
            return False
        bound = limits.max_concurrent_streams
        return bound is None or self._slots.waiting(tenant) < bound

    async def _admit_once(self, request: StreamRequest, estimate: int, claim: Claim | None) -> Admission:
        key = request.key
        call = asyncio.ensure_future(
            self._limiter.admit(
                key.tenant,
                key.user,
                request.tenant.limits,
                lease=request.lease,
                estimate_tokens=estimate,
                now=time.time(),
                claim=claim,
            )
        )
        try:
            return await asyncio.shield(call)
        except asyncio.CancelledError:
            # The decision may already be made in Redis: give the reservation and lease back.
            with contextlib.suppress(Exception):
                admission = await call
                await self._limiter.settle(admission, request.tenant.limits, used_tokens=0, now=time.time())
            raise

    def _text_lengths(self, request: StreamRequest, reply_chars: int) -> dict[str, int]:
        """Character counts of prompt and reply, only with HUBGATE_LOG_TEXT_LENGTHS (never the text)."""
        if not self._log_text_lengths:
            return {}
        prompt_chars = sum(len(m.content) for m in request.chat.messages) + len(request.chat.system or "")
        return {"prompt_chars": prompt_chars, "reply_chars": reply_chars}

    async def _check_budget(self, request: StreamRequest) -> Spend | None:
        """Refuse a tenant whose monthly budget is spent; the spend so far, or None without a budget."""
        budget = request.tenant.budget
        if not budget.active:
            return None
        try:
            spend = await self._meter.month_spend(request.key.tenant, time.time())
        except (OSError, RedisError):
            log.warning("cannot read the monthly spend; admitting without the budget check")
            return None
        if budget_fraction(budget, spend) >= 1.0:
            raise BudgetExhausted("this tenant's monthly budget is spent; it resets on the 1st (UTC)")
        return spend

    async def _warn_budget(self, stream: ActiveStream, before: Spend, record: UsageRecord) -> None:
        budget = stream.request.tenant.budget
        after = Spend(
            before.tokens + record.input_tokens + record.output_tokens, before.cost_usd + record.cost_usd
        )
        used = budget_fraction(budget, after)
        threshold = crossed_threshold(budget_fraction(budget, before), used)
        owner = stream.owner
        if threshold is None or owner is None:
            return
        frame = {
            "type": "budget",
            "threshold": threshold,
            "used": round(used, 4),
            "month": month_of(record.timestamp),
            "spent_usd": round(after.cost_usd, 6),
            "spent_tokens": after.tokens,
            "monthly_budget_usd": budget.usd,
            "monthly_budget_tokens": budget.tokens,
        }
        with contextlib.suppress(OwnerGone):
            await owner.deliver(protocol.encode(frame))

    async def _open_writer(self, stream: ActiveStream, owner: str) -> None:
        """Create the request's resume buffer and its writer; DuplicateId if the id is taken
        (another instance runs it, or the user's request of that id ended within the resume TTL).

        While a client is connected the writer only keeps the frames; it writes them when the
        client's socket drops, when a client resumes elsewhere, and at the end of the request.
        """
        try:
            await self._buffer.create(stream.key, owner)
        except DuplicateId:
            raise
        except GatewayError:
            log.warning("resume buffer unavailable; request %s cannot be resumed", stream.key.request_id)
            return
        stream.writer = self._writer(stream)

    def _writer(self, stream: ActiveStream) -> BufferWriter:
        return BufferWriter(
            self._buffer, stream.key, flush_interval=self._flush_interval, live=stream.owner is None
        )

    @staticmethod
    def _end(
        frames: protocol.FrameBuilder, completion: Completion, ttft_ms: float | None, received: float
    ) -> str:
        return frames.end(
            completion.stop_reason,
            completion.input_tokens,
            completion.output_tokens,
            ttft_ms,
            (time.monotonic() - received) * 1000,
        )

    async def _conclude(
        self,
        stream: ActiveStream,
        *,
        admission: Admission | None,
        completion: Completion | None,
        deltas: int,
        input_estimate: int,
        error_code: str | None,
        ttft_ms: float | None,
        duration_ms: float,
        reached_upstream: bool,
        model: str,
        reply_chars: int,
    ) -> UsageRecord | None:
        """Settle the reservation and release the stream lease, then meter once. Never raises."""
        request = stream.request
        key = request.key
        try:
            estimated = completion is None or completion.stop_reason == "cancelled"
            if completion is not None and completion.stop_reason != "cancelled":
                input_tokens, output_tokens = completion.input_tokens, completion.output_tokens
            elif deltas:
                # Bedrock bills what it generated; without its metadata, count what reached us.
                input_tokens, output_tokens = input_estimate, deltas
            else:
                input_tokens, output_tokens = (input_estimate, 0) if completion is not None else (0, 0)
            priced: UsageRecord | None = None
            if reached_upstream:  # metered first: its aggregate write joins the settlement's pipeline
                priced = self._meter.record(
                    UsageRecord(
                        request_id=key.request_id,
                        connection_id=request.connection_id,
                        tenant=key.tenant,
                        user=key.user,
                        model=model,
                        input_tokens=input_tokens,
                        output_tokens=output_tokens,
                        estimated=estimated,
                        ttft_ms=ttft_ms,
                        duration_ms=duration_ms,
                        stop_reason=None if completion is None else completion.stop_reason,
                        error_code=error_code,
                        timestamp=time.time(),
                    )
                )
            if admission is not None:
                self._leases.discard(key.tenant, request.lease)
                self._streams_full.pop(key.tenant, None)  # a slot is free again
                await self._limiter.settle(
                    admission,
                    request.tenant.limits,
                    used_tokens=input_tokens + output_tokens,
                    now=time.time(),
                )
                self._slots.release(key.tenant)
            if priced is None:
                return None
            log.info(
                "request finished",
                extra={
                    "request_id": key.request_id,
                    "connection_id": request.connection_id,
                    "tenant": key.tenant,
                    "model": model,
                    "outcome": priced.outcome,
                    "input_tokens": priced.input_tokens,
                    "output_tokens": priced.output_tokens,
                    "duration_ms": round(duration_ms, 1),
                    **self._text_lengths(request, reply_chars),
                },
            )
            if self._spans is not None:
                end_ns = time.time_ns()
                self._spans.record(priced, start_ns=end_ns - int(duration_ms * 1_000_000), end_ns=end_ns)
            return priced
        except Exception:  # the request is over whatever happens here; the caller must go on
            log.exception("settling or metering request %s failed", key.request_id)
            return None

    async def _finish(
        self, stream: ActiveStream, priced: UsageRecord | None, spend_before: Spend | None
    ) -> None:
        """Flush the resume buffer, warn about the budget, unregister. Never raises."""
        key = stream.request.key
        try:
            if stream.writer is not None:
                _go_live(stream)
                await stream.writer.aclose()
            if priced is not None and spend_before is not None:
                await self._warn_budget(stream, spend_before, priced)
        except Exception:  # the stream is over whatever happens here; never leak the registration
            log.exception("finishing request %s failed", key.request_id)
        finally:
            if self.active.get(key) is stream:
                del self.active[key]
            if not self.active:
                self._idle.set()
            if stream.owner is not None:
                stream.owner.released(stream)

    async def cancel_all(self) -> None:
        """Cancel every running stream (each ends with a frame, settles and is metered)."""
        streams = list(self.active.values())
        for stream in streams:
            stream.cancel()
        tasks = [s.task for s in streams if s.task is not None]
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
