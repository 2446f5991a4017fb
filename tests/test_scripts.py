"""The script runner against a real redis-server: calls made together share one round trip."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Callable

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError

from hubgate.errors import DuplicateId
from hubgate.ratelimit import LimitPolicy, RedisLimiter
from hubgate.resume import RedisStreamBuffer, StreamKey, header_key
from hubgate.scripts import Script, ScriptRunner
from tests.conftest import ws_url
from tests.support.client import Client
from tests.support.emulator_server import EmulatorServer
from tests.support.gateway_server import gateway_settings, running_gateway
from tests.support.redis_server import RedisServer

INCR = Script.of("return redis.call('INCRBY', KEYS[1], ARGV[1])")
ECHO = Script.of("return ARGV[1]")
FAIL = Script.of("return redis.error_reply('refused by the script')")


@pytest.fixture
async def client(redis_server: RedisServer) -> AsyncIterator[Redis]:
    redis = Redis.from_url(redis_server.url)
    yield redis
    await redis.aclose()


async def test_calls_made_together_leave_in_one_pipeline(client: Redis) -> None:
    runner = ScriptRunner(client)
    key = f"k-{uuid.uuid4().hex}"
    replies = await asyncio.gather(
        runner.run(INCR, [key], [1]), runner.run(INCR, [key], [10]), runner.run(ECHO, [], ["x"])
    )
    assert replies == [1, 11, b"x"]  # in the order they were made
    assert (runner.batches, runner.calls) == (1, 3)
    assert runner.last_batch == (INCR.sha, INCR.sha, ECHO.sha)
    # One at a time: one round trip each.
    assert await runner.run(INCR, [key], [100]) == 111
    assert await runner.run(INCR, [key], [1000]) == 1111
    assert (runner.batches, runner.calls) == (3, 5)


async def test_scripts_redis_forgot_are_loaded_and_run_again(client: Redis) -> None:
    runner = ScriptRunner(client)
    key = f"k-{uuid.uuid4().hex}"
    await client.script_flush()
    one, two, three = await asyncio.gather(
        runner.run(INCR, [key], [1]), runner.run(ECHO, [], ["y"]), runner.run(INCR, [key], [2])
    )
    assert (one, two, three) == (1, b"y", 3)  # each applied exactly once
    assert runner.script_loads == 2  # one SCRIPT LOAD per distinct script
    await client.script_flush()
    assert await runner.run(INCR, [key], [4]) == 7  # alone, too
    assert runner.script_loads == 3


async def test_an_error_reply_fails_its_call_only(client: Redis) -> None:
    runner = ScriptRunner(client)
    key = f"k-{uuid.uuid4().hex}"
    results = await asyncio.gather(
        runner.run(INCR, [key], [5]),
        runner.run(FAIL, [], []),
        runner.run(ECHO, [], ["z"]),
        return_exceptions=True,
    )
    assert results[0] == 5 and results[2] == b"z"
    assert isinstance(results[1], ResponseError) and "refused by the script" in str(results[1])
    with pytest.raises(ResponseError):
        await runner.run(FAIL, [], [])
    assert runner.batches == 2


async def test_a_caller_that_gives_up_does_not_affect_the_others(client: Redis) -> None:
    runner = ScriptRunner(client)
    key = f"k-{uuid.uuid4().hex}"
    abandoned = asyncio.ensure_future(runner.run(INCR, [key], [1]))
    kept = asyncio.ensure_future(runner.run(INCR, [key], [2]))
    await asyncio.sleep(0)  # both calls are queued
    abandoned.cancel()
    assert await kept == 2  # the abandoned call never left
    assert runner.calls == 1
    assert int(await client.get(key)) == 2


async def test_a_lost_connection_fails_every_call_of_the_batch(fresh_redis_server: RedisServer) -> None:
    server = fresh_redis_server
    redis = Redis.from_url(server.url, socket_connect_timeout=1.0, socket_timeout=1.0)
    runner = ScriptRunner(redis)
    try:
        assert await runner.run(ECHO, [], ["up"]) == b"up"
        server.kill()
        results = await asyncio.gather(
            runner.run(ECHO, [], ["a"]), runner.run(ECHO, [], ["b"]), return_exceptions=True
        )
        assert all(isinstance(r, RedisConnectionError | OSError) for r in results), results
        server.start()
        assert await runner.run(ECHO, [], ["back"]) == b"back"  # the runner recovers with Redis
    finally:
        await redis.aclose()


# ---------------------------------------------------------------------------- through a gateway


def scripts_counters(text: str) -> tuple[float, float]:
    values: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            values[sample.name] = sample.value
    return values["hubgate_redis_script_calls_total"], values["hubgate_redis_round_trips_total"]


async def test_a_request_costs_one_round_trip_to_start_and_one_to_end(
    emulator: EmulatorServer, mint: Callable[..., str], redis_server: RedisServer
) -> None:
    """Admission (which also creates the resume buffer) is one script call; settlement, the
    buffer's frames and the usage aggregate leave together in one pipeline. Nothing per token."""
    settings = gateway_settings(emulator.url, redis_url=redis_server.url, lease_ttl_seconds=600)
    redis = Redis.from_url(redis_server.url)
    async with running_gateway(settings), httpx.AsyncClient() as http:
        url = f"http://127.0.0.1:{settings.port}/metrics"
        client = await Client.open(ws_url(settings), mint("acme", "alice"))
        request_id = f"rt{time.time_ns()}"
        await client.chat("warm", "[[emulator:tokens=2]]")  # scripts loaded, pools warm
        calls, trips = scripts_counters((await http.get(url)).text)
        frames = await client.chat(request_id, "[[emulator:tokens=40]]")
        after_calls, after_trips = scripts_counters((await http.get(url)).text)
        await client.close()
        assert frames[-1]["type"] == "end" and frames[-1]["usage"]["output_tokens"] == 40
        assert (after_calls - calls, after_trips - trips) == (4, 2)
        # What those calls did: the buffer holds every frame (one append), the usage is counted.
        assert await redis.exists(f"{{t:acme}}:rs:alice:{request_id}:h") == 1
        entries = await redis.xrange(f"{{t:acme}}:rs:alice:{request_id}")
        assert len(entries) == 1 and entries[0][1][b"d"].count(b"\n") == len(frames) - 1
        assert len(await redis.keys(f"{{t:acme}}:metered:{request_id}:*")) == 1
    await redis.aclose()


async def test_a_duplicate_request_id_is_refused_at_admission_and_charged_nothing(
    emulator: EmulatorServer, mint: Callable[..., str], redis_server: RedisServer
) -> None:
    settings = gateway_settings(emulator.url, redis_url=redis_server.url)
    async with running_gateway(settings):
        client = await Client.open(ws_url(settings), mint("acme", "bob"))
        request_id = f"dup{time.time_ns()}"
        first = await client.chat(request_id, "[[emulator:tokens=2]]")
        remaining = first[0]["limits"]["requests_remaining"]
        assert first[-1]["type"] == "end"
        client.by_id.pop(request_id)
        again = await client.chat(request_id, "[[emulator:tokens=2]]")
        assert again[-1]["type"] == "error" and again[-1]["code"] == "duplicate_id"
        third = await client.chat(f"{request_id}-next", "[[emulator:tokens=2]]")
        # The refused duplicate took nothing from the request bucket (refill only adds).
        assert third[0]["limits"]["requests_remaining"] >= remaining - 1
        await client.close()


async def test_a_claim_is_its_owners_whoever_creates_it(client: Redis) -> None:
    """The limiter's admission and the buffer's own creation agree on who a request id belongs to:
    an admission whose reply was lost (a timeout, then the local fallback) does not make the
    request a duplicate of itself; another request with that id is one."""
    limiter = RedisLimiter(client)
    buffer = RedisStreamBuffer(client, ttl_seconds=60, max_frames=100)
    policy = LimitPolicy(requests_per_minute=600)
    key = StreamKey(f"t-{uuid.uuid4().hex[:8]}", "u", "r1")
    claim = buffer.claim(key, "lease-a")
    assert claim is not None
    admission = await limiter.admit(
        key.tenant, key.user, policy, lease="lease-a", estimate_tokens=1, now=time.time(), claim=claim
    )
    assert admission.claimed
    assert await client.get(header_key(key)) == b"lease-a"
    await buffer.create(key, "lease-a")  # the same request creating it again: fine
    with pytest.raises(DuplicateId):
        await buffer.create(key, "lease-b")
    with pytest.raises(DuplicateId):
        await buffer.create(key)  # no owner: any existing buffer is a duplicate
    # The same admission retried (its first reply lost) is not a duplicate; another request is,
    # and is charged nothing.
    again = await limiter.admit(
        key.tenant, key.user, policy, lease="lease-a", estimate_tokens=1, now=time.time(), claim=claim
    )
    assert again.remaining_requests == admission.remaining_requests
    with pytest.raises(DuplicateId):
        await limiter.admit(
            key.tenant,
            key.user,
            policy,
            lease="lease-b",
            estimate_tokens=1,
            now=time.time(),
            claim=buffer.claim(key, "lease-b"),
        )
    snapshot = await limiter.snapshot(key.tenant, policy, now=time.time())
    assert snapshot["streams"] == 1


async def test_the_time_to_answer_counts_from_when_the_call_leaves(client: Redis) -> None:
    """A call kept waiting by a busy event loop before it leaves is not a slow Redis."""
    runner = ScriptRunner(client)
    call = asyncio.create_task(runner.run(ECHO, [], ["late"], reply_within=0.5))
    await asyncio.sleep(0)  # the call is made; the runner has not sent it yet
    time.sleep(1.0)  # noqa: ASYNC251  (the loop is busy for twice the time Redis has to answer)
    assert await call == b"late"


async def test_a_call_redis_does_not_answer_in_time_fails_and_its_reply_comes_late(
    fresh_redis_server: RedisServer,
) -> None:
    redis = Redis.from_url(fresh_redis_server.url)
    pauser = Redis.from_url(fresh_redis_server.url)
    runner = ScriptRunner(redis)
    key = f"k-{uuid.uuid4().hex}"
    late: list[object] = []
    arrived = asyncio.Event()

    def on_late(reply: object) -> None:
        late.append(reply)
        arrived.set()

    await runner.run(ECHO, [], ["warm"])  # the connection is open before Redis pauses
    await pauser.execute_command("CLIENT", "PAUSE", 400, "ALL")
    started = time.monotonic()
    with pytest.raises(TimeoutError):
        await runner.run(INCR, [key], [5], reply_within=0.05, late=on_late)
    assert time.monotonic() - started < 0.4  # failed before Redis answered
    await asyncio.wait_for(arrived.wait(), 10)
    assert late == [5]  # Redis ran it all the same, and whoever made the call learns it
    assert await redis.get(key) == b"5"
    await redis.aclose()
    await pauser.aclose()


async def test_an_admission_redis_made_after_its_caller_gave_up_is_given_back(
    fresh_redis_server: RedisServer,
) -> None:
    """Without this, the stream slot stays taken until its lease expires."""
    redis = Redis.from_url(fresh_redis_server.url)
    pauser = Redis.from_url(fresh_redis_server.url)
    limiter = RedisLimiter(redis, lease_ttl=600, reply_within=0.05)
    policy = LimitPolicy(max_concurrent_streams=1, tokens_per_minute=1000)
    tenant = f"t-{uuid.uuid4().hex[:8]}"
    warm = await limiter.admit(tenant, "u", policy, lease="warm", estimate_tokens=1, now=time.time())
    await limiter.settle(warm, policy, used_tokens=1, now=time.time())
    before = await limiter.snapshot(tenant, policy, now=time.time())
    await pauser.execute_command("CLIENT", "PAUSE", 300, "ALL")
    with pytest.raises(TimeoutError):
        await limiter.admit(tenant, "u", policy, lease="gave-up", estimate_tokens=100, now=time.time())
    async with asyncio.timeout(10):
        while limiter.undone < 1:
            await asyncio.sleep(0.01)
    after = await limiter.snapshot(tenant, policy, now=time.time())
    assert after["streams"] == 0  # the slot is free again
    tokens_before, tokens_after = before["tokens_remaining"], after["tokens_remaining"]
    assert tokens_before is not None and tokens_after is not None
    assert tokens_after >= tokens_before  # the 100 reserved tokens came back
    admitted = await limiter.admit(tenant, "u", policy, lease="next", estimate_tokens=1, now=time.time())
    assert admitted.stream_lease
    await redis.aclose()
    await pauser.aclose()
