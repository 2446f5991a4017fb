"""Server-side sessions, resumable streams and draining, through real gateways."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from redis.asyncio import Redis
from websockets.exceptions import ConnectionClosed

from hubgate.resume import StreamKey, header_key, stream_key
from tests.conftest import ws_url
from tests.support.client import Client, seqs_of, text_of
from tests.support.emulator_server import EmulatorServer
from tests.support.gateway_server import GatewayProcess, free_port, gateway_settings, running_gateway
from tests.support.redis_server import RedisServer

Mint = Callable[..., str]


def reply_words(tag: str, n: int) -> str:
    return " ".join(f"{tag}{i}" for i in range(n))


def slow_reply(request_id: str, words: str, delay_ms: int = 25, **fields: Any) -> dict[str, Any]:
    content = f"[[emulator:reply={words}]] [[emulator:token_delay_ms={delay_ms}]]"
    return {"type": "chat", "id": request_id, "messages": [{"role": "user", "content": content}], **fields}


@pytest.fixture(params=["memory", "redis"])
def store_url(request: pytest.FixtureRequest, redis_server: RedisServer) -> str | None:
    return None if request.param == "memory" else redis_server.url


# ---------------------------------------------------------------------------- sessions


async def test_session_lifecycle_and_history_upstream(
    emulator: EmulatorServer, mint: Mint, store_url: str | None
) -> None:
    settings = gateway_settings(emulator.url, redis_url=store_url)
    async with running_gateway(settings):
        client = await Client.open(ws_url(settings), mint())
        await client.send({"type": "session.create", "id": "c1", "system": "You are terse."})
        created = await client.recv()
        assert created["type"] == "session" and created["id"] == "c1"
        session = created["session"]
        assert len(session) >= 22  # at least 128 random bits, URL-safe

        marker = f"m{time.time_ns()}"
        replies = []
        for turn in range(3):
            frames = await client.chat(
                f"t{turn}", f"{marker} turn {turn} [[emulator:tokens=3]]", session=session
            )
            assert frames[0]["session"] == session and frames[-1]["type"] == "end"
            replies.append(text_of(frames))

        sent = await emulator.requests_with(marker)
        assert [len(r["body"]["messages"]) for r in sent] == [1, 3, 5]
        third = sent[-1]["body"]
        assert third["system"] == [{"text": "You are terse."}]
        assert [m["content"][0]["text"] for m in third["messages"][1::2]] == replies[:2]

        await client.send({"type": "session.get", "session": session})
        got = await client.recv()
        assert got["type"] == "session" and got["system"] == "You are terse."
        assert [m["role"] for m in got["messages"]] == ["user", "assistant"] * 3
        assert got["messages"][-1]["content"] == replies[2]

        await client.send({"type": "session.delete", "session": session})
        assert (await client.recv()) == {"type": "session.deleted", "session": session}
        frames = await client.chat("after-delete", "hi", session=session)
        assert frames[-1]["code"] == "session_not_found"
        await client.close()


async def test_history_is_trimmed_to_the_newest_turns(emulator: EmulatorServer, mint: Mint) -> None:
    settings = gateway_settings(emulator.url, session_max_turns=2)
    async with running_gateway(settings):
        client = await Client.open(ws_url(settings), mint())
        await client.send({"type": "session.create", "system": "keep me"})
        session = (await client.recv())["session"]
        marker = f"trim{time.time_ns()}"
        for turn in range(4):
            await client.chat(f"t{turn}", f"{marker} n{turn} [[emulator:tokens=2]]", session=session)
        sent = await emulator.requests_with(marker)
        last = sent[-1]["body"]
        texts = [m["content"][0]["text"] for m in last["messages"] if m["role"] == "user"]
        # Two stored turns (n1, n2) plus the new one; the oldest went, the system prompt stayed.
        assert [t.split()[1] for t in texts] == ["n1", "n2", "n3"]
        assert last["system"] == [{"text": "keep me"}]
        await client.close()


async def test_cancelled_and_failed_turns_are_not_stored(emulator: EmulatorServer, mint: Mint) -> None:
    settings = gateway_settings(emulator.url)
    async with running_gateway(settings):
        client = await Client.open(ws_url(settings), mint())
        await client.send({"type": "session.create"})
        session = (await client.recv())["session"]
        await client.send(slow_reply("c", reply_words("w", 200), session=session))
        while len(client.by_id["c"]) < 3:
            await client.next_frame()
        await client.send({"type": "cancel", "id": "c"})
        assert (await client.until_terminal("c"))[-1]["stop_reason"] == "cancelled"
        failed = await client.chat("f", "[[emulator:fault=throttling]]", session=session)
        assert failed[-1]["type"] == "error"
        await client.send({"type": "session.get", "session": session})
        assert (await client.recv())["messages"] == []
        await client.close()


async def test_sessions_expire_when_idle(emulator: EmulatorServer, mint: Mint) -> None:
    settings = gateway_settings(emulator.url, session_ttl_seconds=1.0)
    async with running_gateway(settings):
        client = await Client.open(ws_url(settings), mint())
        await client.send({"type": "session.create"})
        session = (await client.recv())["session"]
        await asyncio.sleep(1.5)  # past the idle TTL
        await client.send({"type": "session.get", "session": session})
        assert (await client.recv())["code"] == "session_not_found"
        await client.close()


async def test_sessions_are_private_to_tenant_and_user(
    emulator: EmulatorServer, mint: Mint, store_url: str | None
) -> None:
    settings = gateway_settings(emulator.url, redis_url=store_url)
    async with running_gateway(settings):
        owner = await Client.open(ws_url(settings), mint("acme", "alice"))
        await owner.send({"type": "session.create"})
        session = (await owner.recv())["session"]
        answers = []
        for tenant, user, sid in [
            ("acme", "bob", session),
            ("globex", "alice", session),
            ("acme", "bob", "x" * len(session)),
        ]:
            other = await Client.open(ws_url(settings), mint(tenant, user))
            await other.send({"type": "session.get", "session": sid})
            answers.append(await other.recv())
            await other.send({"type": "session.delete", "session": sid})
            answers.append(await other.recv())
            await other.close()
        assert all(a["code"] == "session_not_found" for a in answers)
        assert len({a["message"] for a in answers}) == 1  # no hint that the real one exists
        await owner.send({"type": "session.get", "session": session})
        assert (await owner.recv())["type"] == "session"
        await owner.close()


# ---------------------------------------------------------------------------- resume


async def read_until(client: Client, request_id: str, count: int) -> None:
    while len(client.by_id[request_id]) < count:
        await client.next_frame()


async def test_resume_on_the_same_instance_after_a_drop(
    emulator: EmulatorServer, mint: Mint, store_url: str | None
) -> None:
    settings = gateway_settings(emulator.url, redis_url=store_url)
    words = reply_words("alpha", 60)
    async with running_gateway(settings):
        first = await Client.open(ws_url(settings), mint())
        await first.send(slow_reply("r1", words))
        await read_until(first, "r1", 6)
        seen = list(first.by_id["r1"])
        first.ws.transport.abort()  # a dropped network, not a clean close

        second = await Client.open(ws_url(settings), mint())
        await second.send({"type": "resume", "id": "r1", "after": seen[-1]["seq"]})
        rest = await second.until_terminal("r1")
        frames = seen + rest
        assert seqs_of(frames) == list(range(len(frames)))
        assert text_of(frames) == words
        assert frames[-1]["type"] == "end"
        await second.close()


async def test_a_reply_longer_than_the_resume_ttl_keeps_its_buffer(
    emulator: EmulatorServer, mint: Mint, store_url: str | None
) -> None:
    # The buffer's TTL counts from its last write, and a connected client's frames are written
    # only at the end: the gateway keeps the buffers of running requests alive meanwhile.
    settings = gateway_settings(emulator.url, redis_url=store_url, resume_ttl_seconds=1.5)
    async with running_gateway(settings):
        client = await Client.open(ws_url(settings), mint())
        request_id = f"long{time.time_ns()}"
        words = reply_words("w", 40)
        await client.send(slow_reply(request_id, words, delay_ms=100))  # about 4 s, over the TTL
        frames = await client.until_terminal(request_id)
        assert frames[-1]["type"] == "end" and text_of(frames) == words
        client.by_id.pop(request_id)
        await client.send({"type": "resume", "id": request_id, "after": 0})
        replayed = await client.until_terminal(request_id)
        assert replayed == frames[1:]  # the whole reply is still there to resume
        client.by_id.pop(request_id)
        again = await client.chat(request_id, "[[emulator:tokens=1]]")
        assert [(f["type"], f.get("code")) for f in again] == [("error", "duplicate_id")]
        await client.close()


async def test_resume_after_the_stream_finished(emulator: EmulatorServer, mint: Mint) -> None:
    settings = gateway_settings(emulator.url)
    async with running_gateway(settings):
        client = await Client.open(ws_url(settings), mint())
        frames = await client.chat("done", "[[emulator:reply=one two three]]")
        frames = list(frames)
        await client.send({"type": "resume", "id": "done", "after": 1})
        await read_until(client, "done", len(frames) + len(frames) - 2)
        assert client.by_id["done"][len(frames) :] == frames[2:]
        await client.close()


async def test_resume_of_unknown_or_foreign_streams(emulator: EmulatorServer, mint: Mint) -> None:
    settings = gateway_settings(emulator.url)
    async with running_gateway(settings):
        owner = await Client.open(ws_url(settings), mint("acme", "alice"))
        await owner.send(slow_reply("mine", reply_words("z", 100)))
        await read_until(owner, "mine", 2)
        answers = []
        for tenant, user, request_id in [
            ("acme", "bob", "mine"),
            ("globex", "alice", "mine"),
            ("acme", "alice", "nope"),
        ]:
            other = await Client.open(ws_url(settings), mint(tenant, user))
            await other.send({"type": "resume", "id": request_id, "after": 0})
            answers.append(await other.recv())
            await other.close()
        assert [a["code"] for a in answers] == ["stream_not_found"] * 3
        assert len({a["message"] for a in answers}) == 1
        await owner.close()


async def test_resume_on_a_second_instance(
    emulator: EmulatorServer, mint: Mint, redis_server: RedisServer
) -> None:
    one = gateway_settings(emulator.url, redis_url=redis_server.url, instance_id="one")
    two = gateway_settings(emulator.url, redis_url=redis_server.url, instance_id="two")
    words = reply_words("beta", 80)
    async with running_gateway(one), running_gateway(two):
        first = await Client.open(ws_url(one), mint())
        request_id = f"x{time.time_ns()}"
        await first.send(slow_reply(request_id, words))
        await read_until(first, request_id, 5)
        seen = list(first.by_id[request_id])
        await first.close()

        second = await Client.open(ws_url(two), mint())
        await second.send({"type": "resume", "id": request_id, "after": seen[-1]["seq"]})
        frames = seen + await second.until_terminal(request_id)
        assert seqs_of(frames) == list(range(len(frames)))
        assert text_of(frames) == words
        await second.close()


async def test_frames_reach_redis_only_once_someone_may_resume(
    emulator: EmulatorServer, mint: Mint, redis_server: RedisServer
) -> None:
    """While its client is connected a request writes nothing to its buffer but the header; a
    second client resuming it on another instance (the first socket still open, as when the first
    instance has not noticed a dead network yet) makes it write, and gets every frame."""
    one = gateway_settings(emulator.url, redis_url=redis_server.url, instance_id="one")
    two = gateway_settings(emulator.url, redis_url=redis_server.url, instance_id="two")
    words = reply_words("gamma", 120)
    redis = Redis.from_url(redis_server.url)
    async with running_gateway(one), running_gateway(two):
        first = await Client.open(ws_url(one), mint("acme", "alice"))
        request_id = f"h{time.time_ns()}"
        await first.send(slow_reply(request_id, words, delay_ms=20))
        await read_until(first, request_id, 30)  # 0.6 s of tokens: past two flush intervals
        assert first.by_id[request_id][-1]["type"] == "delta"
        key = StreamKey("acme", "alice", request_id)
        assert await redis.exists(header_key(key)) == 1  # the buffer exists (its header)...
        assert await redis.exists(stream_key(key)) == 0  # ...with no frame written

        second = await Client.open(ws_url(two), mint("acme", "alice"))
        after = first.by_id[request_id][-1]["seq"]
        await second.send({"type": "resume", "id": request_id, "after": after})
        tail = await second.until_terminal(request_id)
        assert [f["seq"] for f in tail] == list(range(after + 1, after + 1 + len(tail)))
        resumed = first.by_id[request_id][: after + 1] + tail
        assert text_of(resumed) == words and resumed[-1]["type"] == "end"
        whole = await first.until_terminal(request_id)  # the first client got everything too
        assert text_of(whole) == words
        await first.close()
        await second.close()
    await redis.aclose()


async def test_cancel_through_another_instance(
    emulator: EmulatorServer, mint: Mint, redis_server: RedisServer
) -> None:
    one = gateway_settings(emulator.url, redis_url=redis_server.url, instance_id="one")
    two = gateway_settings(emulator.url, redis_url=redis_server.url, instance_id="two")
    async with running_gateway(one), running_gateway(two):
        first = await Client.open(ws_url(one), mint())
        request_id = f"k{time.time_ns()}"
        await first.send(slow_reply(request_id, reply_words("c", 400)))
        await read_until(first, request_id, 3)
        seen = list(first.by_id[request_id])
        await first.close()
        second = await Client.open(ws_url(two), mint())
        await second.send({"type": "resume", "id": request_id, "after": seen[-1]["seq"]})
        await second.send({"type": "cancel", "id": request_id})
        frames = await second.until_terminal(request_id)
        assert frames[-1]["type"] == "end" and frames[-1]["stop_reason"] == "cancelled"
        await second.close()


# ---------------------------------------------------------------------------- draining


@pytest.mark.slow
async def test_sigterm_drains_and_clients_resume_elsewhere(
    emulator: EmulatorServer, mint: Mint, redis_server: RedisServer
) -> None:
    base = gateway_settings(emulator.url, redis_url=redis_server.url, drain_seconds=30)
    old = GatewayProcess(base.replace(port=free_port(), instance_id="old"))
    new = GatewayProcess(base.replace(port=free_port(), instance_id="new"))
    old.start()
    new.start()
    try:
        streams = {f"d{i}-{time.time_ns()}": reply_words(f"s{i}w", 60) for i in range(20)}
        clients: dict[str, Client] = {}
        for request_id, words in streams.items():
            client = await Client.open(old.url, mint(user=f"user-{request_id[:3]}"))
            await client.send(slow_reply(request_id, words, delay_ms=40))
            clients[request_id] = client
        for request_id, client in clients.items():
            await read_until(client, request_id, 3)

        old.terminate()
        async with httpx.AsyncClient() as http, asyncio.timeout(5):
            while (await http.get(f"{old.http}/readyz")).status_code != 503:
                await asyncio.sleep(0.02)

        async def follow(request_id: str, client: Client) -> list[dict[str, Any]]:
            frames = list(client.by_id[request_id])
            # Read what the old instance still sends, until it closes with 1012.
            try:
                while frames[-1]["type"] not in ("end", "error"):
                    frame = await client.next_frame(timeout=15)
                    if frame.get("id") == request_id:
                        frames.append(frame)
            except ConnectionClosed:  # the close (1012) ends this phase
                pass
            assert client.ws.close_code in (1012, None) or frames[-1]["type"] in ("end", "error")
            if frames[-1]["type"] in ("end", "error"):
                return frames
            resumed = await Client.open(new.url, mint(user=f"user-{request_id[:3]}"))
            await resumed.send({"type": "resume", "id": request_id, "after": frames[-1]["seq"]})
            frames += await resumed.until_terminal(request_id, timeout=30)
            await resumed.close()
            return frames

        results = await asyncio.gather(*(follow(rid, c) for rid, c in clients.items()))
        for (request_id, words), frames in zip(streams.items(), results, strict=True):
            assert seqs_of(frames) == list(range(len(frames))), request_id
            assert text_of(frames) == words, request_id
            assert frames[-1]["type"] == "end"
        assert old.wait(timeout=40) == 0
    finally:
        old.stop()
        new.stop()


async def test_readyz_and_handshakes_during_drain(emulator: EmulatorServer, mint: Mint) -> None:
    settings = gateway_settings(emulator.url, drain_seconds=10)
    async with running_gateway(settings) as server:
        client = await Client.open(ws_url(settings), mint())
        await client.send(slow_reply("long", reply_words("q", 40), delay_ms=30))
        await read_until(client, "long", 2)
        server.should_exit = True
        assert (await client.next_frame())["type"] in ("draining", "delta")
        # Without a shared buffer the connection stays until its stream is done, then 1012.
        frames = await client.until_terminal("long")
        assert text_of(frames) == reply_words("q", 40)
        assert any(f["type"] == "draining" for f in client.other)
        assert (await client.wait_closed())[0] == 1012
