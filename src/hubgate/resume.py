"""Per-request frame buffers, so a client that lost its connection can reconnect anywhere and replay.

The gateway process that runs a request writes its server frames (``seq`` 0, 1, 2, ..., then one
terminal ``end`` or ``error``) through a ``BufferWriter``, which batches them off the hot path. A
resuming connection, on any process, calls ``replay``: every frame after the client's last ``seq``,
then the live tail until the terminal frame.

``read`` guarantees the frames it returns continue ``after`` exactly (no gap, no duplicate, in
order) and raises ``StreamNotFound`` when it cannot: the buffer is missing, expired, another
tenant's or user's (all indistinguishable), trimmed past ``after``, or already finished at or before
``after``. Two backends: ``RedisStreamBuffer`` (shared by all processes) and
``MemoryStreamBuffer`` (one process: tests and ``hubgate dev``).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, Protocol
from urllib.parse import quote

import orjson
from redis.asyncio import Redis
from redis.exceptions import RedisError

from hubgate.errors import DuplicateId, InternalError, InvalidMessage, StreamNotFound
from hubgate.keys import Claim, tenant_tag
from hubgate.scripts import Script, ScriptRunner

logger = logging.getLogger(__name__)

# Same rule as the protocol's request ids: non-empty, printable, at most 128 characters.
MAX_REQUEST_ID_LENGTH: Final = 128
_NOT_FOUND: Final = "stream not found"
_TRIMMED: Final = "the frames after this seq are no longer buffered"
_FINISHED: Final = "the stream already finished at or before this seq"
# Frames handed out per read; replay simply reads again, and a bounded reply keeps one resuming
# client from pulling a whole 10000-frame buffer through one Redis reply.
_READ_COUNT: Final = 512
# Redis entries are batches of up to a writer's max_batch (64) frames: read few at a time.
_READ_ENTRIES: Final = 16


@dataclass(frozen=True, slots=True)
class StreamKey:
    """Which buffer: requests are named by their client-chosen id, within one tenant's user."""

    tenant: str
    user: str
    request_id: str


@dataclass(frozen=True, slots=True)
class BufferedFrame:
    """One server frame: its ``seq``, its JSON text as sent, and whether it ends the request."""

    seq: int
    data: bytes
    terminal: bool


@dataclass(frozen=True, slots=True)
class Control:
    """Signals between a resuming reader (any instance) and the instance running the request."""

    reader_until: float = 0.0  # wall-clock time until which a reader said it is tailing the buffer
    cancel: bool = False  # a client asked, through another instance, to cancel the request


# --- pure helpers ---------------------------------------------------------------------------


def valid_request_id(request_id: str) -> bool:
    return 0 < len(request_id) <= MAX_REQUEST_ID_LENGTH and request_id.isprintable()


def stream_key(key: StreamKey) -> str:
    """The Redis key of one buffer's frames: ``{t:<tenant>}:rs:<user>:<request_id>``.

    User and request id are percent-encoded: ordinary ids are unchanged, but user ``a`` with
    request ``b:c`` and user ``a:b`` with request ``c`` get different keys. The tenant's hash tag
    (``tenant_tag``) keeps every key of the tenant in one Redis Cluster slot.
    """
    return f"{tenant_tag(key.tenant)}:rs:{quote(key.user, safe='')}:{quote(key.request_id, safe='')}"


def header_key(key: StreamKey) -> str:
    """The key that says a buffer exists (its claim), beside the frames in the same hash slot."""
    return stream_key(key) + ":h"


def check_after(after: int) -> None:
    if after < -1:
        raise InvalidMessage("'after' must be -1 or the last seq received")


def check_increasing(frames: Sequence[BufferedFrame]) -> None:
    """Frames of one append must be consecutive (``seq`` + 1 each), only the last terminal."""
    for previous, frame in itertools.pairwise(frames):
        if frame.seq != previous.seq + 1 or previous.terminal:
            raise InternalError("frames appended out of order")


def continuation(after: int, frames: Sequence[BufferedFrame], *, ended: bool) -> list[BufferedFrame]:
    """The leading frames that continue ``after`` with no gap.

    ``frames`` are stored frames with ``seq > after`` in order; ``ended`` says whether the newest
    stored frame is terminal. Raises StreamNotFound when the next frame is gone (trimmed, or a
    batch that never reached the buffer), or when nothing can follow because the stream ended.
    """
    out: list[BufferedFrame] = []
    expected = after + 1
    for frame in frames:
        if frame.seq != expected:
            break
        out.append(frame)
        expected += 1
    if frames and not out:
        raise StreamNotFound(_TRIMMED)
    if not frames and ended:
        raise StreamNotFound(_FINISHED)
    return out


# --- the interface --------------------------------------------------------------------------


class StreamBuffer(Protocol):
    """Where the frames of live and recently finished requests are kept for replay."""

    def claim(self, key: StreamKey, owner: str) -> Claim | None:
        """The key whose creation creates this buffer, for an admission to create in its own
        step (see ``hubgate.keys.Claim``); None when the buffer is not kept where the limiter is."""
        ...

    async def create(self, key: StreamKey, owner: str = "") -> None:
        """Start an empty buffer (when no admission created its claim); DuplicateId if a live one
        exists that ``owner`` (when given) did not create, InvalidMessage for a bad id."""
        ...

    async def append(self, key: StreamKey, frames: Sequence[BufferedFrame]) -> None:
        """Add frames (increasing ``seq``) in one round trip and refresh the TTL; StreamNotFound if gone."""
        ...

    async def read(self, key: StreamKey, after: int, *, block_seconds: float) -> list[BufferedFrame]:
        """Frames with ``seq > after`` continuing ``after``, waiting up to ``block_seconds`` if none yet."""
        ...

    async def exists(self, key: StreamKey) -> bool:
        """Whether a live buffer exists for ``key``."""
        ...

    async def running(self, key: StreamKey) -> bool:
        """True when the buffer exists and does not hold its terminal frame yet."""
        ...

    ttl_seconds: float  # a buffer expires this long after its last write (or ``touch``)

    async def touch(self, keys: Sequence[StreamKey]) -> None:
        """Push the expiry of these buffers (of requests still running) to now + the TTL."""
        ...

    async def signal_reader(self, key: StreamKey, until: float) -> None:
        """Say a reader is tailing ``key`` until ``until`` (wall clock), so its producer keeps going
        and writes its frames to the buffer as they come (see ``watch_readers``)."""
        ...

    async def watch_readers(self, on_reader: Callable[[StreamKey], None]) -> None:
        """Call ``on_reader(key)`` for each ``signal_reader`` made by any instance; runs until cancelled."""
        ...

    async def request_cancel(self, key: StreamKey) -> None:
        """Ask the instance running ``key`` to cancel it."""
        ...

    async def control(self, key: StreamKey) -> Control:
        """The signals set for ``key`` (defaults when none)."""
        ...

    async def aclose(self) -> None:
        """Release what the buffer owns."""
        ...


# --- in memory ------------------------------------------------------------------------------


class _MemoryStream:
    __slots__ = ("changed", "ended", "expires_at", "frames", "last_seq")

    def __init__(self, max_frames: int, expires_at: float) -> None:
        self.frames: deque[BufferedFrame] = deque(maxlen=max_frames)
        self.expires_at = expires_at
        self.last_seq = -1
        self.ended = False
        self.changed = asyncio.Condition()

    def after(self, after: int) -> list[BufferedFrame]:
        # Walk back from the newest frame: a tailing reader only pays for what is new.
        out: list[BufferedFrame] = []
        for frame in reversed(self.frames):
            if frame.seq <= after:
                break
            out.append(frame)
        out.reverse()
        return out[:_READ_COUNT]


class MemoryStreamBuffer:
    """Buffers in a dict, expired by ``clock`` (monotonic seconds); for one process only."""

    def __init__(
        self, *, ttl_seconds: float, max_frames: int, clock: Callable[[], float] = time.monotonic
    ) -> None:
        if ttl_seconds <= 0 or max_frames < 1:
            raise ValueError("ttl_seconds must be > 0 and max_frames >= 1")
        self._ttl = self.ttl_seconds = ttl_seconds
        self._max_frames = max_frames
        self._clock = clock
        self._streams: dict[StreamKey, _MemoryStream] = {}
        self._controls: dict[StreamKey, Control] = {}
        self._watchers: list[Callable[[StreamKey], None]] = []
        self._next_sweep = float("-inf")

    def claim(self, key: StreamKey, owner: str) -> Claim | None:
        return None

    async def create(self, key: StreamKey, owner: str = "") -> None:
        if not valid_request_id(key.request_id):
            raise InvalidMessage("invalid request id")
        now = self._clock()
        self._sweep(now)
        current = self._streams.get(key)
        if current is not None and now < current.expires_at:
            raise DuplicateId("request id already used")
        self._streams[key] = _MemoryStream(self._max_frames, now + self._ttl)

    async def append(self, key: StreamKey, frames: Sequence[BufferedFrame]) -> None:
        if not frames:
            return
        check_increasing(frames)
        stream = self._live(key)
        if frames[0].seq <= stream.last_seq:
            raise InternalError("frames appended out of order")
        stream.frames.extend(frames)
        stream.last_seq = frames[-1].seq
        stream.ended = frames[-1].terminal
        stream.expires_at = self._clock() + self._ttl
        async with stream.changed:
            stream.changed.notify_all()

    async def read(self, key: StreamKey, after: int, *, block_seconds: float) -> list[BufferedFrame]:
        check_after(after)
        stream = self._live(key)
        frames = stream.after(after)
        if not frames and not stream.ended and block_seconds > 0:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(block_seconds), stream.changed:
                    await stream.changed.wait_for(lambda: stream.last_seq > after)
            # It may have expired, or been replaced after expiring, while we waited.
            stream = self._live(key)
            frames = stream.after(after)
        return continuation(after, frames, ended=stream.ended)

    async def exists(self, key: StreamKey) -> bool:
        try:
            self._live(key)
        except StreamNotFound:
            return False
        return True

    async def running(self, key: StreamKey) -> bool:
        try:
            return not self._live(key).ended
        except StreamNotFound:
            return False

    async def touch(self, keys: Sequence[StreamKey]) -> None:
        expires_at = self._clock() + self._ttl
        for key in keys:
            with contextlib.suppress(StreamNotFound):
                self._live(key).expires_at = expires_at

    async def signal_reader(self, key: StreamKey, until: float) -> None:
        self._controls[key] = Control(until, self._controls.get(key, Control()).cancel)
        for on_reader in list(self._watchers):
            on_reader(key)

    async def watch_readers(self, on_reader: Callable[[StreamKey], None]) -> None:
        self._watchers.append(on_reader)
        try:
            await asyncio.get_running_loop().create_future()  # until cancelled
        finally:
            self._watchers.remove(on_reader)

    async def request_cancel(self, key: StreamKey) -> None:
        self._controls[key] = Control(self._controls.get(key, Control()).reader_until, True)

    async def control(self, key: StreamKey) -> Control:
        return self._controls.get(key, Control())

    async def aclose(self) -> None:
        self._streams.clear()
        self._controls.clear()

    def _live(self, key: StreamKey) -> _MemoryStream:
        stream = self._streams.get(key)
        if stream is None:
            raise StreamNotFound(_NOT_FOUND)
        if self._clock() >= stream.expires_at:
            del self._streams[key]
            raise StreamNotFound(_NOT_FOUND)
        return stream

    def _sweep(self, now: float) -> None:
        # One pass per TTL drops buffers nobody resumed, keeping memory bounded.
        if now < self._next_sweep:
            return
        self._next_sweep = now + self._ttl
        for key in [k for k, s in self._streams.items() if now >= s.expires_at]:
            del self._streams[key]
        for key in [k for k in self._controls if k not in self._streams]:
            del self._controls[key]


# --- in Redis -------------------------------------------------------------------------------

# Entry ids are explicit, derived from seq: frame `seq` is 0-(seq+2) (0-1 was a header entry in
# an earlier layout). XADD refuses an id not above the stream's last one, so the stream is
# strictly ordered by seq with no duplicate, and "every frame after seq k" is a plain range read
# from an id computed from k.

# A buffer's header, unless one exists that another owner created (see ``Claim``). KEYS: header.
# ARGV: owner ("-": none, never matches), TTL in ms.
_CREATE_SCRIPT: Final = Script.of("""
local held = redis.call('GET', KEYS[1])
if held and (ARGV[1] == '-' or held ~= ARGV[1]) then
  return 0
end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return 1
""")

# One batch of frames, only into a buffer whose header (its claim) still exists: an expired
# buffer stays gone rather than coming back without its start. KEYS: frames, header. ARGV: entry
# id, first seq, frames (newline-separated), terminal (0/1), MAXLEN, TTL in ms.
_APPEND_SCRIPT: Final = Script.of("""
if redis.call('EXISTS', KEYS[2]) == 0 then
  return 0
end
redis.call('XADD', KEYS[1], 'MAXLEN', ARGV[5], ARGV[1], 's', ARGV[2], 'd', ARGV[3], 't', ARGV[4])
redis.call('PEXPIRE', KEYS[1], ARGV[6])
redis.call('PEXPIRE', KEYS[2], ARGV[6])
return 1
""")


# Readers announce themselves here, so the instance running a request starts writing its frames.
READERS_CHANNEL: Final = "hubgate:resume:readers"
_RESUBSCRIBE_MAX_SECONDS: Final = 5.0


def _reader_message(key: StreamKey) -> bytes:
    return orjson.dumps([key.tenant, key.user, key.request_id])


def _reader_key(data: Any) -> StreamKey | None:
    """The key a reader message names, or None for anything else on the channel."""
    try:
        tenant, user, request_id = orjson.loads(data)
    except (orjson.JSONDecodeError, TypeError, ValueError):
        return None
    if not all(isinstance(part, str) for part in (tenant, user, request_id)):
        return None
    return StreamKey(tenant, user, request_id)


def _control_key(key: StreamKey) -> str:
    """Beside the buffer, in the same hash slot."""
    return stream_key(key) + ":ctl"


def _entry_id(seq: int) -> str:
    return f"0-{seq + 2}"


def _field(fields: Mapping[Any, Any], name: str) -> Any:
    # The client may or may not have been built with decode_responses=True.
    value = fields.get(name.encode())
    return fields.get(name) if value is None else value


def _decode_entries(entries: Sequence[Any] | None) -> list[BufferedFrame]:
    frames: list[BufferedFrame] = []
    for _stream_id, fields in entries or ():
        first = _field(fields, "s")
        if first is not None:  # a batch: consecutive frames, newline-separated
            raw = _field(fields, "d")
            parts = (raw.encode() if isinstance(raw, str) else bytes(raw)).split(b"\n")
            last_terminal = _field(fields, "t") in (b"1", "1")
            for offset, data in enumerate(parts):
                terminal = last_terminal and offset == len(parts) - 1
                frames.append(BufferedFrame(seq=int(first) + offset, data=data, terminal=terminal))
            continue
        seq = _field(fields, "seq")
        if seq is None:  # the header
            continue
        data = _field(fields, "d")
        terminal = _field(fields, "t")
        frames.append(
            BufferedFrame(
                seq=int(seq),
                data=data.encode() if isinstance(data, str) else bytes(data),
                terminal=terminal in (b"1", "1"),
            )
        )
    return frames


def _xread_entries(response: Any) -> list[Any]:
    """The entries of a one-stream XREAD reply: RESP2 ``[[name, entries]]``, RESP3 ``{name: [entries]}``."""
    if not response:
        return []
    if isinstance(response, Mapping):
        (wrapped,) = response.values()
        return list(wrapped[0])
    return list(response[0][1])


@contextlib.contextmanager
def _redis_boundary() -> Iterator[None]:
    """Translate redis-py and socket failures into the gateway's hierarchy."""
    try:
        yield
    except (RedisError, OSError) as exc:
        raise InternalError("resume buffer unavailable") from exc


class RedisStreamBuffer:
    """A header key per request (``header_key``: the buffer exists) and a Redis Stream of frame
    batches at ``stream_key(key)``, created by the first append; fields ``s`` (first seq), ``d``
    (newline-separated frames), ``t`` (ends with the terminal frame).

    A request's keys share its tenant's hash tag, so the scripts work unchanged on Redis Cluster.
    The header is created by the limiter's admission when both live in the same Redis (see
    ``claim``), else by ``create``. The TTL is refreshed on each append; the length is capped
    with ``XADD MAXLEN``. ``read`` blocks with
    ``XREAD BLOCK``, which needs the client's ``socket_timeout`` to be longer than the block: a
    block is shortened to fit a shorter one, so a client tuned for the rate limiter still works,
    only polling more often. The client belongs to the caller; ``aclose`` does not close it.
    """

    def __init__(
        self,
        client: Redis,
        *,
        ttl_seconds: float,
        max_frames: int,
        runner: ScriptRunner | None = None,
    ) -> None:
        if ttl_seconds <= 0 or max_frames < 1:
            raise ValueError("ttl_seconds must be > 0 and max_frames >= 1")
        self._client = client
        # Appends go through the runner: shared with the limiter, a request's last append leaves
        # in the same pipeline as its settlement.
        self._runner = ScriptRunner(client) if runner is None else runner
        self._ttl_ms = max(1, round(ttl_seconds * 1000))
        self.ttl_seconds = ttl_seconds
        self._max_frames = max_frames
        socket_timeout = client.connection_pool.connection_kwargs.get("socket_timeout")
        # Block for at most half the socket timeout: the other half is for the reply to arrive.
        self._max_block_ms = None if socket_timeout is None else max(1, int(socket_timeout * 500))

    def claim(self, key: StreamKey, owner: str) -> Claim | None:
        if not valid_request_id(key.request_id):
            return None
        return Claim(header_key(key), self._ttl_ms, owner)

    async def create(self, key: StreamKey, owner: str = "") -> None:
        if not valid_request_id(key.request_id):
            raise InvalidMessage("invalid request id")
        with _redis_boundary():
            created = await self._runner.run(_CREATE_SCRIPT, (header_key(key),), (owner or "-", self._ttl_ms))
        if not created:
            raise DuplicateId("request id already used")

    async def append(self, key: StreamKey, frames: Sequence[BufferedFrame]) -> None:
        if not frames:
            return
        check_increasing(frames)
        if not valid_request_id(key.request_id):
            raise StreamNotFound(_NOT_FOUND)
        with _redis_boundary():
            # One entry per batch (its id is the batch's last seq, so a range read from any seq
            # finds the batch holding it): one XADD however many frames, and a reader sees the
            # whole batch or none of it. Frames are compact JSON and never contain a newline.
            # Entries hold batches: keep about max_frames frames' worth of them, trimmed exactly
            # (approximate trimming only drops whole nodes of ~100 entries).
            added = await self._runner.run(
                _APPEND_SCRIPT,
                (stream_key(key), header_key(key)),
                (
                    _entry_id(frames[-1].seq),
                    frames[0].seq,
                    b"\n".join(frame.data for frame in frames),
                    1 if frames[-1].terminal else 0,
                    max(1, self._max_frames // len(frames)),
                    self._ttl_ms,
                ),
            )
        if not added:
            raise StreamNotFound(_NOT_FOUND)

    async def read(self, key: StreamKey, after: int, *, block_seconds: float) -> list[BufferedFrame]:
        check_after(after)
        if not valid_request_id(key.request_id):
            raise StreamNotFound(_NOT_FOUND)
        name = stream_key(key)
        with _redis_boundary():
            async with self._client.pipeline(transaction=False) as pipe:
                pipe.exists(header_key(key))
                pipe.xrange(name, min=_entry_id(after + 1), max="+", count=_READ_ENTRIES)
                pipe.xrevrange(name, max="+", min="-", count=1)
                exists, entries, newest = await pipe.execute()
            if not exists:
                raise StreamNotFound(_NOT_FOUND)
            frames = [f for f in _decode_entries(entries) if f.seq > after]
            newest_frames = _decode_entries(newest)
            ended = bool(newest_frames) and newest_frames[-1].terminal
            if not frames and not ended and block_seconds > 0:
                block_ms = max(1, int(block_seconds * 1000))  # BLOCK 0 would mean forever
                if self._max_block_ms is not None:
                    block_ms = min(block_ms, self._max_block_ms)
                response = await self._client.xread(
                    {name: _entry_id(after)}, count=_READ_ENTRIES, block=block_ms
                )
                frames = [f for f in _decode_entries(_xread_entries(response)) if f.seq > after]
        return continuation(after, frames, ended=ended)

    async def exists(self, key: StreamKey) -> bool:
        if not valid_request_id(key.request_id):
            return False
        with _redis_boundary():
            return bool(await self._client.exists(header_key(key)))

    async def running(self, key: StreamKey) -> bool:
        if not valid_request_id(key.request_id):
            return False
        with _redis_boundary():
            async with self._client.pipeline(transaction=False) as pipe:
                pipe.exists(header_key(key))
                pipe.xrevrange(stream_key(key), max="+", min="-", count=1)
                exists, newest = await pipe.execute()
        frames = _decode_entries(newest)
        return bool(exists) and not (frames and frames[-1].terminal)

    async def touch(self, keys: Sequence[StreamKey]) -> None:
        live = [key for key in keys if valid_request_id(key.request_id)]
        if not live:
            return
        with _redis_boundary():
            async with self._client.pipeline(transaction=False) as pipe:
                for key in live:  # PEXPIRE of a key that does not exist (yet) does nothing
                    pipe.pexpire(header_key(key), self._ttl_ms)
                    pipe.pexpire(stream_key(key), self._ttl_ms)
                await pipe.execute()

    async def signal_reader(self, key: StreamKey, until: float) -> None:
        if not valid_request_id(key.request_id):
            raise StreamNotFound(_NOT_FOUND)
        control = _control_key(key)
        with _redis_boundary():
            async with self._client.pipeline(transaction=False) as pipe:
                pipe.hset(control, "reader_until", repr(until))
                pipe.pexpire(control, self._ttl_ms)
                pipe.publish(READERS_CHANNEL, _reader_message(key))
                await pipe.execute()

    async def watch_readers(self, on_reader: Callable[[StreamKey], None]) -> None:
        """Subscribe to the readers channel, resubscribing with backoff while Redis is away.

        A signal sent while unsubscribed is not lost for long: readers repeat theirs every poll.
        """
        delay = 0.1
        while True:
            pubsub = self._client.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(READERS_CHANNEL)
                delay = 0.1
                async for message in pubsub.listen():
                    key = _reader_key(message.get("data"))
                    if key is not None:
                        on_reader(key)
            except (RedisError, OSError) as exc:
                logger.warning("resume reader signals unavailable (%s); retrying in %.1fs", exc, delay)
            finally:
                with contextlib.suppress(RedisError, OSError):
                    await pubsub.aclose()  # type: ignore[no-untyped-call]
            await asyncio.sleep(delay)
            delay = min(delay * 2, _RESUBSCRIBE_MAX_SECONDS)

    async def request_cancel(self, key: StreamKey) -> None:
        await self._set_control(key, "cancel", "1")

    async def control(self, key: StreamKey) -> Control:
        if not valid_request_id(key.request_id):
            return Control()
        with _redis_boundary():
            values = await self._client.hmget(_control_key(key), ["reader_until", "cancel"])
        reader_until, cancel = values
        return Control(float(reader_until) if reader_until else 0.0, bool(cancel))

    async def _set_control(self, key: StreamKey, name: str, value: str) -> None:
        if not valid_request_id(key.request_id):
            raise StreamNotFound(_NOT_FOUND)
        control = _control_key(key)
        with _redis_boundary():
            async with self._client.pipeline(transaction=True) as pipe:
                pipe.hset(control, name, value)
                pipe.pexpire(control, self._ttl_ms)
                await pipe.execute()

    async def aclose(self) -> None:
        """Nothing to release: the Redis client is created and closed by the app's lifespan."""


# --- writing --------------------------------------------------------------------------------


class BufferWriter:
    """Batches one request's frames into ``append`` calls so the token path never waits on Redis.

    ``push`` only queues. A writer created with ``live=False`` (a request whose client is
    connected) keeps its frames in memory and sends nothing until ``go_live`` (the client's socket
    dropped, or a client is resuming the request elsewhere) or ``aclose``; then the whole backlog
    goes in one append. A live writer's background task sends a batch when ``max_batch`` frames
    are queued, when the terminal frame is queued, or ``flush_interval`` seconds after the first
    queued frame; at most one append is in flight, so frames reach the buffer in order. A failed
    append is logged and dropped: the live connection still has those frames, and a resume that
    needs them gets ``stream_not_found`` instead of a stream with a hole.
    """

    def __init__(
        self,
        buffer: StreamBuffer,
        key: StreamKey,
        *,
        flush_interval: float = 0.02,
        max_batch: int = 64,
        live: bool = True,
        backlog_batch: int = 1024,
    ) -> None:
        if flush_interval <= 0 or max_batch < 1 or backlog_batch < 1:
            raise ValueError("flush_interval must be > 0, max_batch and backlog_batch >= 1")
        self._buffer = buffer
        self._key = key
        self._flush_interval = flush_interval
        self._max_batch = max_batch
        self._backlog_batch = max(backlog_batch, max_batch)
        self._live = live
        self._catching_up = False
        self._pending: list[BufferedFrame] = []
        self._has_data = asyncio.Event()
        self._urgent = asyncio.Event()
        self._closing = False
        self._task: asyncio.Task[None] | None = None
        self._failed_batches = 0
        self._lost_frames = 0

    @property
    def live(self) -> bool:
        return self._live

    def push(self, frame: BufferedFrame) -> None:
        """Queue one frame (call from the event loop); never waits."""
        if self._closing:
            raise RuntimeError("BufferWriter is closed")
        self._pending.append(frame)
        if not self._live:
            return
        if frame.terminal or len(self._pending) >= self._max_batch:
            self._urgent.set()
        self._has_data.set()
        self._ensure_task()

    def go_live(self) -> None:
        """Send the backlog now, and every frame from here on in batches."""
        if self._live or self._closing:
            return
        self._live = True
        if self._pending:
            self._catching_up = True
            self._urgent.set()
            self._has_data.set()
            self._ensure_task()

    def close_with(self, frames: Sequence[BufferedFrame]) -> None:
        """Take a request's frames, terminal included, in a writer that never went live; ``aclose``
        sends them. From here the writer counts as live, so nothing hands it the frames again."""
        if self._live or self._closing:
            return
        self._pending.extend(frames)
        self._live = self._closing = True

    async def aclose(self) -> None:
        """Send everything queued, terminal frame included, then stop; logs, never raises, Redis trouble.

        Without a background task (the writer never went live, or was handed its frames by
        ``close_with``) the frames go from the caller's task, at once: with the other calls the
        caller makes at the same moment, they leave in one pipeline.
        """
        if self._task is None:
            self._live = self._closing = True
            backlog, self._pending = self._pending, []
            for start in range(0, len(backlog), self._backlog_batch):
                await self._send(backlog[start : start + self._backlog_batch])
            self._log_losses()
            return
        if not self._live and self._pending:
            self.go_live()
        if self._task is None or self._task.done():
            self._closing = True
            return
        self._closing = True
        self._urgent.set()
        self._has_data.set()
        # Shielded: a connection torn down mid-close must not cut off the final frames.
        await asyncio.shield(self._task)
        self._log_losses()

    def _log_losses(self) -> None:
        if self._failed_batches:
            logger.warning(
                "resume buffer missed %d frame(s) in %d batch(es) for request %r",
                self._lost_frames,
                self._failed_batches,
                self._key.request_id,
            )

    def _ensure_task(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="hubgate-buffer-writer")

    async def _run(self) -> None:
        while True:
            await self._has_data.wait()
            if not self._urgent.is_set():
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self._flush_interval):
                        await self._urgent.wait()
            size = self._backlog_batch if self._catching_up else self._max_batch
            batch = self._pending[:size]
            del self._pending[:size]
            if not self._pending:
                self._catching_up = False
                self._has_data.clear()
            if not self._closing and len(self._pending) < self._max_batch and not self._terminal_pending():
                self._urgent.clear()
            if batch:
                await self._send(batch)
            if self._closing and not self._pending:
                return

    def _terminal_pending(self) -> bool:
        return bool(self._pending) and self._pending[-1].terminal

    async def _send(self, batch: list[BufferedFrame]) -> None:
        try:
            await self._buffer.append(self._key, batch)
        except Exception:
            # The background task must survive anything the buffer raises; only the first
            # failure is logged with its traceback, the rest are counted and summarised at close.
            self._failed_batches += 1
            self._lost_frames += len(batch)
            if self._failed_batches == 1:
                logger.exception("resume buffer append failed for request %r", self._key.request_id)


# --- reading --------------------------------------------------------------------------------


async def replay(
    buffer: StreamBuffer,
    key: StreamKey,
    after: int,
    *,
    poll_seconds: float = 1.0,
    deadline: float | None = None,
) -> AsyncIterator[BufferedFrame]:
    """Yield the frames with ``seq > after`` in order, then the live tail, ending after the terminal frame.

    Raises StreamNotFound as ``read`` does (missing, expired, trimmed past ``after``, already
    finished). ``deadline`` is a ``time.monotonic()`` value; when it passes the iteration ends early,
    and the last frame yielded is then not terminal. Without one, a request whose producer died
    is tailed until its buffer expires, which raises StreamNotFound.
    """
    last = after
    while True:
        wait = poll_seconds
        if deadline is not None:
            wait = max(0.0, min(wait, deadline - time.monotonic()))
        for frame in await buffer.read(key, last, block_seconds=wait):
            yield frame
            if frame.terminal:
                return
            last = frame.seq
        if deadline is not None and time.monotonic() >= deadline:
            return
