"""Resume buffers: the pure helpers, both backends against the same behaviour, the writer, replay."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from redis.asyncio import Redis

from hubgate.errors import DuplicateId, InternalError, InvalidMessage, StreamNotFound
from hubgate.resume import (
    READERS_CHANNEL,
    BufferedFrame,
    BufferWriter,
    MemoryStreamBuffer,
    RedisStreamBuffer,
    StreamBuffer,
    StreamKey,
    continuation,
    header_key,
    replay,
    stream_key,
    valid_request_id,
)
from tests.support.redis_server import RedisServer, free_port

WAIT = 5.0  # upper bound for anything that should happen promptly; never a synchronisation sleep


def frame(seq: int, *, terminal: bool = False) -> BufferedFrame:
    kind = "end" if terminal else "delta"
    return BufferedFrame(seq, f'{{"type":"{kind}","id":"r","seq":{seq}}}'.encode(), terminal)


def frames(start: int, stop: int, *, terminal_last: bool = False) -> list[BufferedFrame]:
    out = [frame(seq) for seq in range(start, stop)]
    if terminal_last:
        out[-1] = frame(stop - 1, terminal=True)
    return out


async def collect(iterator: AsyncIterator[BufferedFrame]) -> list[BufferedFrame]:
    return [f async for f in iterator]


# --- pure -----------------------------------------------------------------------------------


def test_continuation_takes_the_gapless_prefix() -> None:
    assert continuation(2, frames(3, 6), ended=False) == frames(3, 6)
    assert continuation(2, [frame(3), frame(4), frame(6)], ended=False) == [frame(3), frame(4)]
    assert continuation(2, [], ended=False) == []
    with pytest.raises(StreamNotFound, match="no longer buffered"):
        continuation(2, frames(5, 8), ended=False)
    with pytest.raises(StreamNotFound, match="already finished"):
        continuation(7, [], ended=True)


def test_request_ids_and_keys() -> None:
    assert valid_request_id("0b6f3c1e-8f3a-4c3e-9f0e-4f1a2b3c4d5e") and valid_request_id("x" * 128)
    assert not any(valid_request_id(i) for i in ("", "x" * 129, "a\nb", "a\x00b"))
    assert stream_key(StreamKey("acme", "u1", "req-1")) == "{t:acme}:rs:u1:req-1"
    # A ':' in a user or request id must not let one user address another's buffer.
    assert stream_key(StreamKey("t", "a", "b:c")) != stream_key(StreamKey("t", "a:b", "c"))
    assert stream_key(StreamKey("t}x", "u", "r")).startswith("{t:t%7Dx}:")


# --- both backends --------------------------------------------------------------------------


@dataclass
class Backend:
    kind: str
    make: Callable[..., StreamBuffer]  # keyword arguments: ttl_seconds, max_frames
    tenant: str

    def key(self, request_id: str | None = None, *, user: str = "alice") -> StreamKey:
        return StreamKey(self.tenant, user, request_id or str(uuid.uuid4()))


@pytest.fixture(params=["memory", "redis"])
async def backend(request: pytest.FixtureRequest) -> AsyncIterator[Backend]:
    tenant = f"t-{uuid.uuid4().hex[:8]}"
    if request.param == "memory":
        yield Backend("memory", MemoryStreamBuffer, tenant)
        return
    server: RedisServer = request.getfixturevalue("redis_server")
    client = Redis.from_url(server.url)
    try:
        yield Backend("redis", lambda **kw: RedisStreamBuffer(client, **kw), tenant)
    finally:
        await client.aclose()


def default(backend: Backend, *, ttl_seconds: float = 60, max_frames: int = 1000) -> StreamBuffer:
    return backend.make(ttl_seconds=ttl_seconds, max_frames=max_frames)


async def test_append_then_read_after_any_seq(backend: Backend) -> None:
    buf = default(backend)
    key = backend.key()
    await buf.create(key)
    assert await buf.exists(key)
    assert await buf.read(key, -1, block_seconds=0) == []
    await buf.append(key, frames(0, 3))
    await buf.append(key, frames(3, 10, terminal_last=True))
    assert await buf.read(key, -1, block_seconds=0) == frames(0, 10, terminal_last=True)
    assert await buf.read(key, 4, block_seconds=0) == frames(5, 10, terminal_last=True)
    assert await buf.read(key, 8, block_seconds=0) == [frame(9, terminal=True)]
    with pytest.raises(StreamNotFound, match="already finished"):
        await buf.read(key, 9, block_seconds=1)
    with pytest.raises(InvalidMessage):
        await buf.read(key, -2, block_seconds=0)
    await buf.aclose()


async def test_read_waits_then_wakes_on_append(backend: Backend) -> None:
    buf = default(backend)
    key = backend.key()
    await buf.create(key)
    await buf.append(key, frames(0, 2))
    reader = asyncio.create_task(buf.read(key, 1, block_seconds=30))
    await buf.append(key, frames(2, 4))
    assert await asyncio.wait_for(reader, WAIT) == frames(2, 4)


async def test_read_with_nothing_new_returns_empty_after_the_block(backend: Backend) -> None:
    buf = default(backend)
    key = backend.key()
    await buf.create(key)
    started = time.monotonic()
    assert await buf.read(key, -1, block_seconds=0.05) == []
    assert 0.04 <= time.monotonic() - started < WAIT


async def test_replay_yields_every_frame_once_and_stops_at_the_terminal(backend: Backend) -> None:
    buf = default(backend)
    key = backend.key()
    await buf.create(key)
    await buf.append(key, frames(0, 5))
    tail = asyncio.create_task(collect(replay(buf, key, -1, poll_seconds=10)))
    middle = asyncio.create_task(collect(replay(buf, key, 2, poll_seconds=10)))
    for start in range(5, 40, 7):
        await buf.append(key, frames(start, start + 7, terminal_last=start + 7 == 40))
    everything = frames(0, 40, terminal_last=True)
    assert await asyncio.wait_for(tail, WAIT) == everything
    assert await asyncio.wait_for(middle, WAIT) == everything[3:]
    assert await collect(replay(buf, key, 38)) == everything[39:]


async def test_replay_stops_at_its_deadline_without_a_terminal(backend: Backend) -> None:
    buf = default(backend)
    key = backend.key()
    await buf.create(key)
    await buf.append(key, frames(0, 3))
    got = await asyncio.wait_for(collect(replay(buf, key, 0, deadline=time.monotonic() + 0.1)), WAIT)
    assert got == frames(1, 3)


async def test_create_twice_is_a_duplicate(backend: Backend) -> None:
    buf = default(backend)
    key = backend.key()
    await buf.create(key)
    with pytest.raises(DuplicateId):
        await buf.create(key)
    await buf.append(key, frames(0, 1, terminal_last=True))
    with pytest.raises(DuplicateId):  # finished but still buffered: the id is still taken
        await buf.create(key)
    await buf.create(backend.key(key.request_id, user="bob"))  # ids are per user
    with pytest.raises(InvalidMessage):
        await buf.create(backend.key("x" * 129))


async def test_other_owners_and_bad_ids_cannot_find_a_buffer(backend: Backend) -> None:
    buf = default(backend)
    key = backend.key("req-1")
    await buf.create(key)
    await buf.append(key, frames(0, 3))
    strangers = [
        StreamKey("other-tenant", key.user, key.request_id),
        StreamKey(key.tenant, "bob", key.request_id),
        StreamKey(key.tenant, key.user, str(uuid.uuid4())),
        StreamKey(key.tenant, key.user, ""),
        StreamKey(key.tenant, key.user, "r" * 129),
        StreamKey(key.tenant, key.user, "req\n1"),
    ]
    seen = set()
    for stranger in strangers:
        assert not await buf.exists(stranger)
        for attempt in (
            buf.read(stranger, -1, block_seconds=0),
            collect(replay(buf, stranger, -1)),
            buf.append(stranger, [frame(3)]),
        ):
            with pytest.raises(StreamNotFound) as caught:
                await attempt
            seen.add((type(caught.value), str(caught.value), caught.value.code))
    assert seen == {(StreamNotFound, "stream not found", "stream_not_found")}
    assert await buf.read(key, -1, block_seconds=0) == frames(0, 3)


async def test_out_of_order_appends_are_refused(backend: Backend) -> None:
    buf = default(backend)
    key = backend.key()
    await buf.create(key)
    await buf.append(key, frames(0, 3))
    for bad in ([frame(2)], [frame(5), frame(4)]):
        with pytest.raises(InternalError):
            await buf.append(key, bad)
    assert await buf.read(key, -1, block_seconds=0) == frames(0, 3)


async def test_length_is_bounded_and_a_trimmed_start_is_not_found(backend: Backend) -> None:
    buf = default(backend, max_frames=16)
    key = backend.key()
    await buf.create(key)
    for start in range(0, 600, 50):
        await buf.append(key, frames(start, start + 50))
    with pytest.raises(StreamNotFound, match="no longer buffered"):
        await buf.read(key, -1, block_seconds=0)
    assert await buf.read(key, 590, block_seconds=0) == frames(591, 600)


async def test_a_long_backlog_comes_back_in_bounded_reads(backend: Backend) -> None:
    buf = default(backend, max_frames=5000)
    key = backend.key()
    await buf.create(key)
    for start in range(0, 1200, 50):  # in batches, as a BufferWriter appends
        await buf.append(key, frames(start, start + 50, terminal_last=start == 1150))
    first = await buf.read(key, -1, block_seconds=0)
    assert 0 < len(first) < 1200 and first == frames(0, len(first))
    assert await collect(replay(buf, key, -1)) == frames(0, 1200, terminal_last=True)


# --- expiry ---------------------------------------------------------------------------------


async def test_memory_buffer_expires_and_append_refreshes() -> None:
    now = [0.0]
    buf = MemoryStreamBuffer(ttl_seconds=10, max_frames=100, clock=lambda: now[0])
    key = StreamKey("t", "u", "r")
    await buf.create(key)
    now[0] = 9.0
    await buf.append(key, frames(0, 2))  # lives until 19
    now[0] = 18.0
    assert await buf.read(key, -1, block_seconds=0) == frames(0, 2)
    now[0] = 19.0
    assert not await buf.exists(key)
    with pytest.raises(StreamNotFound):
        await buf.read(key, -1, block_seconds=0)
    await buf.create(key)  # an expired id may be used again


async def test_memory_touch_keeps_a_running_buffer_and_ignores_missing_ones() -> None:
    now = [0.0]
    buf = MemoryStreamBuffer(ttl_seconds=10, max_frames=100, clock=lambda: now[0])
    key, other = StreamKey("t", "u", "r"), StreamKey("t", "u", "gone")
    await buf.create(key)
    assert buf.ttl_seconds == 10
    now[0] = 8.0
    await buf.touch([key, other])  # lives until 18; the unknown key is skipped
    now[0] = 17.0
    assert await buf.running(key)
    await buf.append(key, frames(0, 1, terminal_last=True))
    assert await buf.exists(key) and not await buf.running(key)
    assert not await buf.exists(other)


async def test_redis_touch_pushes_the_expiry_of_header_and_frames(redis_server: RedisServer) -> None:
    client = Redis.from_url(redis_server.url)
    try:
        buf = RedisStreamBuffer(client, ttl_seconds=300, max_frames=100)
        key = StreamKey(f"t-{uuid.uuid4().hex[:8]}", "u", "r")
        await buf.create(key)
        await buf.append(key, frames(0, 1))
        await client.pexpire(header_key(key), 5_000)
        await client.pexpire(stream_key(key), 5_000)
        await buf.touch([key, StreamKey(key.tenant, "u", "never-created"), StreamKey("t", "u", "")])
        assert 299_000 < await client.pttl(header_key(key)) <= 300_000
        assert 299_000 < await client.pttl(stream_key(key)) <= 300_000
        assert not await client.exists(header_key(StreamKey(key.tenant, "u", "never-created")))
        assert await buf.running(key)
    finally:
        await client.aclose()


async def test_redis_ttl_is_set_and_refreshed_by_append(redis_server: RedisServer) -> None:
    client = Redis.from_url(redis_server.url)
    try:
        buf = RedisStreamBuffer(client, ttl_seconds=300, max_frames=100)
        key = StreamKey(f"t-{uuid.uuid4().hex[:8]}", "u", "r")
        await buf.create(key)
        name, header = stream_key(key), header_key(key)
        assert 299_000 < await client.pttl(header) <= 300_000
        assert not await client.exists(name)  # the frames' stream comes with the first append
        await client.pexpire(header, 5_000)
        await buf.append(key, frames(0, 2))
        assert 299_000 < await client.pttl(name) <= 300_000
        assert 299_000 < await client.pttl(header) <= 300_000
        assert await client.type(name) in (b"stream", "stream")
        entries = await client.xrange(name)
        # One entry per append: the batch's first seq, its frames newline-separated, the terminal flag.
        assert [fields for _, fields in entries or ()] == [
            {b"s": b"0", b"d": frame(0).data + b"\n" + frame(1).data, b"t": b"0"},
        ]
    finally:
        await client.aclose()


async def test_redis_expired_buffer_is_not_found_and_not_recreated_by_append(
    redis_server: RedisServer,
) -> None:
    client = Redis.from_url(redis_server.url)
    try:
        buf = RedisStreamBuffer(client, ttl_seconds=60, max_frames=100)
        key = StreamKey(f"t-{uuid.uuid4().hex[:8]}", "u", "r")
        await buf.create(key)
        await buf.append(key, frames(0, 1))
        await client.delete(stream_key(key), header_key(key))  # what expiry does, without waiting for it
        with pytest.raises(StreamNotFound):
            await buf.append(key, frames(1, 2))
        assert not await client.exists(stream_key(key))
        with pytest.raises(StreamNotFound):
            await buf.read(key, -1, block_seconds=0)
    finally:
        await client.aclose()


async def test_redis_block_is_shortened_to_fit_the_socket_timeout(redis_server: RedisServer) -> None:
    client = Redis.from_url(redis_server.url, socket_timeout=0.5)
    try:
        buf = RedisStreamBuffer(client, ttl_seconds=60, max_frames=100)
        key = StreamKey("t-short", "u", str(uuid.uuid4()))
        await buf.create(key)
        started = time.monotonic()
        assert await buf.read(key, -1, block_seconds=5) == []  # not a socket timeout error
        assert time.monotonic() - started < 2.0
    finally:
        await client.aclose()


async def test_redis_decoded_responses_work_too(redis_server: RedisServer) -> None:
    client = Redis.from_url(redis_server.url, decode_responses=True)
    try:
        buf = RedisStreamBuffer(client, ttl_seconds=60, max_frames=100)
        key = StreamKey("t-decoded", "u", str(uuid.uuid4()))
        await buf.create(key)
        reader = asyncio.create_task(buf.read(key, -1, block_seconds=30))
        await buf.append(key, frames(0, 3, terminal_last=True))
        assert await asyncio.wait_for(reader, WAIT) == frames(0, 3, terminal_last=True)
    finally:
        await client.aclose()


async def test_redis_unreachable_is_an_internal_error() -> None:
    client = Redis.from_url(f"redis://127.0.0.1:{free_port()}/0", socket_connect_timeout=0.5)
    try:
        buf = RedisStreamBuffer(client, ttl_seconds=60, max_frames=100)
        key = StreamKey("t", "u", "r")
        for attempt in (buf.create(key), buf.read(key, -1, block_seconds=0), buf.append(key, [frame(0)])):
            with pytest.raises(InternalError) as caught:
                await attempt
            assert "127.0.0.1" not in str(caught.value)
    finally:
        await client.aclose()


# --- BufferWriter ---------------------------------------------------------------------------


class CountingBuffer(MemoryStreamBuffer):
    """The memory buffer, counting append calls (each one a round trip in Redis)."""

    def __init__(self) -> None:
        super().__init__(ttl_seconds=60, max_frames=10_000)
        self.appends: list[int] = []

    async def append(self, key: StreamKey, frames: Sequence[BufferedFrame]) -> None:
        self.appends.append(len(frames))
        await super().append(key, frames)


class FailingBuffer(MemoryStreamBuffer):
    """The memory buffer whose appends fail as an unreachable Redis would make them."""

    def __init__(self) -> None:
        super().__init__(ttl_seconds=60, max_frames=10_000)

    async def append(self, key: StreamKey, frames: Sequence[BufferedFrame]) -> None:
        raise InternalError("resume buffer unavailable")


async def test_writer_batches_and_flushes_everything_on_close() -> None:
    buf = CountingBuffer()
    key = StreamKey("t", "u", "r")
    await buf.create(key)
    writer = BufferWriter(buf, key, flush_interval=60, max_batch=64)
    for f in frames(0, 201, terminal_last=True):
        writer.push(f)
    await writer.aclose()
    assert sum(buf.appends) == 201 and len(buf.appends) <= 4 and max(buf.appends) <= 64
    assert await collect(replay(buf, key, -1)) == frames(0, 201, terminal_last=True)
    with pytest.raises(RuntimeError):
        writer.push(frame(201))


async def test_writer_flushes_a_partial_batch_after_the_interval() -> None:
    buf = CountingBuffer()
    key = StreamKey("t", "u", "r")
    await buf.create(key)
    writer = BufferWriter(buf, key, flush_interval=0.01, max_batch=64)
    for f in frames(0, 3):
        writer.push(f)
    assert await asyncio.wait_for(buf.read(key, -1, block_seconds=WAIT), WAIT) == frames(0, 3)
    assert buf.appends == [3]
    writer.push(frame(3, terminal=True))  # terminal: sent without waiting for the interval
    assert await asyncio.wait_for(buf.read(key, 2, block_seconds=WAIT), WAIT) == [frame(3, terminal=True)]
    await writer.aclose()
    assert buf.appends == [3, 1]


async def test_writer_close_with_nothing_pushed_is_a_no_op() -> None:
    writer = BufferWriter(CountingBuffer(), StreamKey("t", "u", "r"))
    await writer.aclose()
    await writer.aclose()


async def test_writer_logs_but_never_raises_when_the_buffer_fails(caplog: pytest.LogCaptureFixture) -> None:
    buf = FailingBuffer()
    key = StreamKey("t", "u", "r")
    await buf.create(key)
    writer = BufferWriter(buf, key, flush_interval=60, max_batch=4)
    with caplog.at_level(logging.WARNING, logger="hubgate.resume"):
        for f in frames(0, 10, terminal_last=True):
            writer.push(f)
        await writer.aclose()
    failures = [r for r in caplog.records if r.name == "hubgate.resume"]
    assert len(failures) == 2  # the first failure with its traceback, then one summary
    assert "10 frame(s) in 3 batch(es)" in failures[-1].getMessage()


async def test_writer_end_to_end_through_redis(redis_server: RedisServer) -> None:
    client = Redis.from_url(redis_server.url)
    try:
        buf = RedisStreamBuffer(client, ttl_seconds=60, max_frames=10_000)
        key = StreamKey(f"t-{uuid.uuid4().hex[:8]}", "u", "r")
        await buf.create(key)
        tail = asyncio.create_task(collect(replay(buf, key, -1, poll_seconds=1)))
        writer = BufferWriter(buf, key, flush_interval=0.005, max_batch=16)
        for f in frames(0, 300, terminal_last=True):
            writer.push(f)
            if f.seq % 40 == 0:
                await asyncio.sleep(0)  # let the writer and the reader interleave with the producer
        await writer.aclose()
        assert await asyncio.wait_for(tail, WAIT) == frames(0, 300, terminal_last=True)
    finally:
        await client.aclose()


async def test_a_writer_not_live_sends_nothing_until_it_goes_live() -> None:
    buf = CountingBuffer()
    key = StreamKey("t", "u", "r")
    await buf.create(key)
    writer = BufferWriter(buf, key, flush_interval=0.001, max_batch=4, live=False)
    for f in frames(0, 300):
        writer.push(f)
    assert not writer.live
    assert await buf.read(key, -1, block_seconds=0.05) == []  # well past the flush interval
    assert buf.appends == []
    writer.go_live()  # e.g. the client's socket dropped: the backlog goes in one append
    assert await asyncio.wait_for(buf.read(key, -1, block_seconds=WAIT), WAIT) == frames(0, 300)
    assert buf.appends == [300]
    for f in frames(300, 306):  # from now on, in batches of max_batch
        writer.push(f)
    writer.push(frame(306, terminal=True))
    await writer.aclose()
    assert buf.appends[1:] == [4, 3]
    assert await collect(replay(buf, key, 299)) == [*frames(300, 306), frame(306, terminal=True)]


async def test_a_writer_not_live_sends_everything_in_one_append_at_close() -> None:
    buf = CountingBuffer()
    key = StreamKey("t", "u", "r")
    await buf.create(key)
    writer = BufferWriter(buf, key, flush_interval=0.001, max_batch=8, live=False, backlog_batch=1000)
    for f in frames(0, 501, terminal_last=True):
        writer.push(f)
    await writer.aclose()
    assert buf.appends == [501]
    assert await collect(replay(buf, key, -1)) == frames(0, 501, terminal_last=True)


async def test_a_backlog_larger_than_one_batch_goes_in_backlog_sized_appends() -> None:
    buf = CountingBuffer()
    key = StreamKey("t", "u", "r")
    await buf.create(key)
    writer = BufferWriter(buf, key, max_batch=8, live=False, backlog_batch=100)
    for f in frames(0, 250, terminal_last=True):
        writer.push(f)
    await writer.aclose()
    assert buf.appends == [100, 100, 50]


async def test_memory_buffer_tells_watchers_about_readers() -> None:
    buf = MemoryStreamBuffer(ttl_seconds=60, max_frames=100)
    seen: list[StreamKey] = []
    arrived = asyncio.Event()

    def on_reader(key: StreamKey) -> None:
        seen.append(key)
        arrived.set()

    watch = asyncio.create_task(buf.watch_readers(on_reader))
    await asyncio.sleep(0)  # let the watcher register
    key = StreamKey("t", "u", "r")
    await buf.signal_reader(key, time.time() + 3)
    await asyncio.wait_for(arrived.wait(), WAIT)
    assert seen == [key]
    watch.cancel()
    with pytest.raises(asyncio.CancelledError):
        await watch
    await buf.signal_reader(key, time.time() + 3)
    assert seen == [key]


async def test_redis_buffer_tells_every_instance_about_readers(redis_server: RedisServer) -> None:
    clients = [Redis.from_url(redis_server.url, socket_timeout=5) for _ in range(3)]
    reader_side, *instances = [RedisStreamBuffer(c, ttl_seconds=60, max_frames=100) for c in clients]
    queues: list[asyncio.Queue[StreamKey]] = [asyncio.Queue(), asyncio.Queue()]
    watches = [
        asyncio.create_task(b.watch_readers(q.put_nowait)) for b, q in zip(instances, queues, strict=True)
    ]
    try:
        key = StreamKey("acme", "alice", f"r{uuid.uuid4().hex[:8]}")
        # Subscribing takes a moment; a reader repeats its signal, as replaying clients do.
        deadline = time.monotonic() + WAIT
        for queue in queues:
            while True:
                await reader_side.signal_reader(key, time.time() + 3)
                try:
                    assert await asyncio.wait_for(queue.get(), 0.2) == key
                    break
                except TimeoutError:
                    assert time.monotonic() < deadline, "no watcher heard the reader"
        assert (await reader_side.control(key)).reader_until > time.time()
        for queue in queues:  # repeated signals
            while not queue.empty():
                assert queue.get_nowait() == key
        # Anything else published on the channel is ignored.
        await clients[0].publish(READERS_CHANNEL, b"not json")
        await clients[0].publish(READERS_CHANNEL, b'["a", 1, "c"]')
        await reader_side.signal_reader(StreamKey("a", "b", "c"), time.time() + 3)
        for queue in queues:
            assert await asyncio.wait_for(queue.get(), WAIT) == StreamKey("a", "b", "c")
    finally:
        for watch in watches:
            watch.cancel()
        await asyncio.gather(*watches, return_exceptions=True)
        for c in clients:
            await c.aclose()


async def test_redis_reader_watch_survives_a_redis_restart() -> None:
    server = RedisServer()
    server.start()
    client = Redis.from_url(server.url, socket_timeout=5)
    try:
        buf = RedisStreamBuffer(client, ttl_seconds=60, max_frames=100)
        queue: asyncio.Queue[StreamKey] = asyncio.Queue()
        watch = asyncio.create_task(buf.watch_readers(queue.put_nowait))
        key = StreamKey("t", "u", "r")

        async def heard() -> None:
            deadline = time.monotonic() + 3 * WAIT
            while True:
                with contextlib.suppress(InternalError):
                    await buf.signal_reader(key, time.time() + 3)
                try:
                    assert await asyncio.wait_for(queue.get(), 0.2) == key
                    return
                except TimeoutError:
                    assert time.monotonic() < deadline, "the watcher never heard the reader"

        await heard()
        server.restart()  # the subscription drops; the watcher subscribes again
        await heard()
        watch.cancel()
        await asyncio.gather(watch, return_exceptions=True)
    finally:
        await client.aclose()
        server.stop()


# --- any interleaving -----------------------------------------------------------------------

Op = tuple[str, int]
ops_st = st.lists(
    st.one_of(
        st.tuples(st.just("push"), st.integers(1, 12)),
        st.tuples(st.just("yield"), st.just(0)),
        st.tuples(st.just("read"), st.just(0)),
    ),
    max_size=25,
)


async def check_interleaving(buf: StreamBuffer, key: StreamKey, ops: list[Op], max_batch: int) -> None:
    await buf.create(key)
    tail = asyncio.create_task(collect(replay(buf, key, -1, poll_seconds=0.5)))
    writer = BufferWriter(buf, key, flush_interval=0.001, max_batch=max_batch)
    polled: list[BufferedFrame] = []
    seq = 0
    for op, n in ops:
        if op == "push":
            for _ in range(n):
                writer.push(frame(seq))
                seq += 1
        elif op == "yield":
            await asyncio.sleep(0)
        else:
            polled += await buf.read(key, polled[-1].seq if polled else -1, block_seconds=0)
    writer.push(frame(seq, terminal=True))
    await writer.aclose()
    polled += await collect(replay(buf, key, polled[-1].seq if polled else -1))
    expected = [*frames(0, seq), frame(seq, terminal=True)]
    assert polled == expected
    assert await asyncio.wait_for(tail, WAIT) == expected


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=ops_st, max_batch=st.integers(1, 8))
async def test_any_interleaving_in_memory_yields_each_seq_once_in_order(
    ops: list[Op], max_batch: int
) -> None:
    buf = MemoryStreamBuffer(ttl_seconds=60, max_frames=10_000)
    await check_interleaving(buf, StreamKey("t", "u", "r"), ops, max_batch)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=ops_st, max_batch=st.integers(1, 8))
async def test_any_interleaving_in_redis_yields_each_seq_once_in_order(
    redis_server: RedisServer, ops: list[Op], max_batch: int
) -> None:
    client = Redis.from_url(redis_server.url)
    try:
        buf = RedisStreamBuffer(client, ttl_seconds=60, max_frames=10_000)
        await check_interleaving(buf, StreamKey("t-hypothesis", "u", str(uuid.uuid4())), ops, max_batch)
    finally:
        await client.aclose()
