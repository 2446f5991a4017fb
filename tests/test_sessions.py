"""Sessions: the pure history policy, then both stores against the same behaviour."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import pytest
from hypothesis import given
from hypothesis import strategies as st
from redis.asyncio import Redis

from hubgate.errors import InternalError, InvalidMessage, SessionNotFound
from hubgate.sessions import (
    HistoryPolicy,
    MemorySessionStore,
    Message,
    RedisSessionStore,
    SessionStore,
    estimate_tokens,
    new_session_id,
    session_key,
    split_turns,
    trim_history,
    valid_session_id,
)
from hubgate.settings import Settings
from tests.support.redis_server import RedisServer, free_port

U = Message("user", "hi")
A = Message("assistant", "hello")
ROOMY = HistoryPolicy(max_turns=100, max_tokens=100_000, ttl_seconds=60)


def user(text: str) -> Message:
    return Message("user", text)


def bot(text: str) -> Message:
    return Message("assistant", text)


# --- pure -----------------------------------------------------------------------------------


def test_estimate_tokens_is_ceil_of_chars_over_four() -> None:
    assert [estimate_tokens("x" * n) for n in (0, 1, 4, 5, 8, 9)] == [0, 1, 1, 2, 2, 3]


def test_split_turns_groups_user_messages_with_their_reply() -> None:
    msgs = [user("a"), user("b"), bot("c"), user("d"), bot("e"), user("f")]
    assert split_turns(msgs) == [(user("a"), user("b"), bot("c")), (user("d"), bot("e")), (user("f"),)]


def test_trim_keeps_the_newest_turns() -> None:
    msgs = [m for i in range(5) for m in (user(f"q{i}"), bot(f"a{i}"))]
    policy = HistoryPolicy(max_turns=2, max_tokens=10_000, ttl_seconds=1)
    assert trim_history(msgs, None, policy) == (user("q3"), bot("a3"), user("q4"), bot("a4"))


def test_trim_by_tokens_counts_the_system_prompt_and_never_drops_it() -> None:
    # Each turn costs 2 + 2 tokens; the 8-token system prompt leaves room for 3 of 5 turns.
    msgs = [m for i in range(5) for m in (user("x" * 8), bot("y" * 8))]
    policy = HistoryPolicy(max_turns=50, max_tokens=20, ttl_seconds=1)
    assert len(trim_history(msgs, "s" * 32, policy)) == 6
    assert len(trim_history(msgs, None, policy)) == 10


def test_trim_keeps_the_newest_turn_even_over_budget() -> None:
    policy = HistoryPolicy(max_turns=5, max_tokens=1, ttl_seconds=1)
    msgs = [user("old"), bot("old"), user("q" * 100), bot("a" * 100)]
    assert trim_history(msgs, "system", policy) == (user("q" * 100), bot("a" * 100))


def test_policy_rejects_nonsense_and_reads_settings() -> None:
    with pytest.raises(ValueError):
        HistoryPolicy(max_turns=0, max_tokens=1, ttl_seconds=1)
    assert HistoryPolicy.from_settings(Settings()) == HistoryPolicy(50, 16000, 3600.0)


messages_st = st.lists(
    st.builds(Message, st.sampled_from(["user", "assistant"]), st.text(max_size=40)), max_size=30
)


@given(messages_st, st.none() | st.text(max_size=60), st.integers(1, 8), st.integers(1, 200))
def test_trim_is_a_suffix_of_whole_turns_within_bounds(
    msgs: list[Message], system: str | None, max_turns: int, max_tokens: int
) -> None:
    policy = HistoryPolicy(max_turns=max_turns, max_tokens=max_tokens, ttl_seconds=1)
    kept = trim_history(msgs, system, policy)
    turns = split_turns(msgs)
    kept_turns = split_turns(kept)
    assert kept == tuple(msgs[len(msgs) - len(kept) :])
    assert kept_turns == turns[len(turns) - len(kept_turns) :]
    if msgs:
        assert len(kept_turns) >= 1
    if len(kept_turns) > 1:
        cost = sum(estimate_tokens(m.content) for m in kept) + estimate_tokens(system or "")
        assert len(kept_turns) <= max_turns and cost <= max_tokens


def test_session_ids_are_long_random_and_recognisable() -> None:
    ids = {new_session_id() for _ in range(100)}
    assert len(ids) == 100 and all(valid_session_id(i) and len(i) == 32 for i in ids)
    assert not valid_session_id("short") and not valid_session_id(new_session_id() + "x")
    assert not valid_session_id("a" * 31 + ":")


def test_session_keys_share_the_tenant_slot_and_cannot_be_forged() -> None:
    sid = new_session_id()
    assert session_key("acme", "u1", sid) == f"{{t:acme}}:s:u1:{sid}"
    # A '}' or ':' in a claim must not produce another tenant's or user's key.
    assert session_key("a", "b}:s:c", sid) != session_key("a}:s:b", "c", sid)
    assert session_key("a", "b:c", sid) != session_key("a:b", "c", sid)
    assert session_key("x}y", "u", sid).startswith("{t:x%7Dy}:")


# --- both stores ----------------------------------------------------------------------------


@dataclass
class Backend:
    """Builds stores of one kind; `tenant` is unique per test so tests never share Redis keys."""

    kind: str
    make: Callable[[HistoryPolicy], SessionStore]
    tenant: str


@pytest.fixture(params=["memory", "redis"])
async def backend(request: pytest.FixtureRequest) -> AsyncIterator[Backend]:
    tenant = f"t-{uuid.uuid4().hex[:8]}"
    if request.param == "memory":
        yield Backend("memory", MemorySessionStore, tenant)
        return
    server: RedisServer = request.getfixturevalue("redis_server")
    client = Redis.from_url(server.url)
    try:
        yield Backend("redis", lambda policy: RedisSessionStore(client, policy), tenant)
    finally:
        await client.aclose()


async def test_create_get_append_delete(backend: Backend) -> None:
    store = backend.make(ROOMY)
    t = backend.tenant
    created = await store.create(t, "alice", system="be brief", now=100.0)
    assert valid_session_id(created.id) and created.messages == () and created.system == "be brief"
    assert await store.get(t, "alice", created.id, now=101.0) == created

    after = await store.append_turn(t, "alice", created.id, [U], A, now=102.0)
    assert after.messages == (U, A) and after.updated_at == 102.0 and after.created_at == 100.0
    after = await store.append_turn(t, "alice", created.id, [user("a"), user("b")], bot("c"), now=103.0)
    assert after.messages == (U, A, user("a"), user("b"), bot("c"))
    assert await store.get(t, "alice", created.id, now=104.0) == after

    await store.delete(t, "alice", created.id)
    with pytest.raises(SessionNotFound):
        await store.get(t, "alice", created.id, now=105.0)
    with pytest.raises(SessionNotFound):
        await store.delete(t, "alice", created.id)
    await store.aclose()


async def test_append_turn_trims_by_turns_and_tokens(backend: Backend) -> None:
    store = backend.make(HistoryPolicy(max_turns=3, max_tokens=12, ttl_seconds=60))
    t = backend.tenant
    s = await store.create(t, "alice", system="s" * 8, now=0.0)  # 2 tokens of the 12
    for i in range(5):
        s = await store.append_turn(t, "alice", s.id, [user(f"q{i}")], bot(f"a{i}"), now=float(i))
    assert s.messages == (user("q2"), bot("a2"), user("q3"), bot("a3"), user("q4"), bot("a4"))
    s = await store.append_turn(t, "alice", s.id, [user("x" * 24)], bot("y" * 8), now=9.0)  # 8 tokens
    assert s.messages == (user("q4"), bot("a4"), user("x" * 24), bot("y" * 8))
    assert s.system == "s" * 8
    assert (await store.get(t, "alice", s.id, now=10.0)).messages == s.messages


async def test_a_turn_must_be_user_messages_then_an_assistant_reply(backend: Backend) -> None:
    store = backend.make(ROOMY)
    s = await store.create(backend.tenant, "alice", now=0.0)
    for user_messages, reply in [([], A), ([A], A), ([U], U)]:
        with pytest.raises(InvalidMessage):
            await store.append_turn(backend.tenant, "alice", s.id, user_messages, reply, now=1.0)
    assert (await store.get(backend.tenant, "alice", s.id, now=2.0)).messages == ()


async def test_other_owners_and_bad_ids_see_the_same_not_found(backend: Backend) -> None:
    store = backend.make(ROOMY)
    t = backend.tenant
    s = await store.create(t, "alice", now=0.0)
    attempts = [
        ("other-tenant", "alice", s.id),
        (t, "bob", s.id),
        (t, "alice", new_session_id()),
        (t, "alice", "../../etc"),
        (t, "alice", s.id + "x"),
        (t, "alice", ""),
    ]
    messages = set()
    for tenant, usr, sid in attempts:
        for call in (
            store.get(tenant, usr, sid, now=1.0),
            store.append_turn(tenant, usr, sid, [U], A, now=1.0),
            store.delete(tenant, usr, sid),
        ):
            with pytest.raises(SessionNotFound) as caught:
                await call
            messages.add((type(caught.value), str(caught.value), caught.value.code))
    assert messages == {(SessionNotFound, "session not found", "session_not_found")}
    # None of those attempts touched the owner's session.
    assert (await store.get(t, "alice", s.id, now=2.0)).messages == ()


async def test_concurrent_turns_are_all_kept(backend: Backend) -> None:
    store = backend.make(ROOMY)
    t = backend.tenant
    s = await store.create(t, "alice", now=0.0)
    await asyncio.gather(
        *(store.append_turn(t, "alice", s.id, [user(f"q{i}")], bot(f"a{i}"), now=1.0) for i in range(12))
    )
    stored = (await store.get(t, "alice", s.id, now=2.0)).messages
    assert sorted(m.content for m in stored) == sorted(
        [f"q{i}" for i in range(12)] + [f"a{i}" for i in range(12)]
    )
    # Every turn is intact: each question is immediately followed by its own answer.
    assert all(stored[k + 1].content == "a" + stored[k].content[1:] for k in range(0, len(stored), 2))


# --- expiry ---------------------------------------------------------------------------------


async def test_memory_sessions_expire_when_idle_and_access_refreshes() -> None:
    store = MemorySessionStore(HistoryPolicy(max_turns=5, max_tokens=1000, ttl_seconds=10))
    s = await store.create("t", "u", now=0.0)
    await store.get("t", "u", s.id, now=9.0)  # refreshed: lives until 19
    await store.append_turn("t", "u", s.id, [U], A, now=18.0)  # refreshed: lives until 28
    assert (await store.get("t", "u", s.id, now=27.9)).messages == (U, A)
    with pytest.raises(SessionNotFound):
        await store.get("t", "u", s.id, now=38.0)


async def test_memory_delete_judges_expiry_by_the_latest_now_and_sweeps() -> None:
    store = MemorySessionStore(HistoryPolicy(5, 1000, ttl_seconds=10))
    s = await store.create("t", "u", now=0.0)
    other = await store.create("t", "other", now=1.0)
    await store.get("t", "other", other.id, now=10.5)  # time has moved past `s`'s expiry
    assert ("t", "u", s.id) in store._entries
    with pytest.raises(SessionNotFound):
        await store.delete("t", "u", s.id)
    await store.delete("t", "other", other.id)
    stale = await store.create("t", "u", now=12.0)
    await store.create("t", "u", now=40.0)  # sweeps `stale` without anyone asking for it
    assert ("t", "u", stale.id) not in store._entries


async def test_redis_ttl_is_set_and_refreshed_on_access(redis_server: RedisServer) -> None:
    client = Redis.from_url(redis_server.url)
    try:
        store = RedisSessionStore(client, HistoryPolicy(5, 1000, ttl_seconds=60))
        tenant = f"t-{uuid.uuid4().hex[:8]}"
        s = await store.create(tenant, "u", now=0.0)
        key = session_key(tenant, "u", s.id)
        assert 59_000 < await client.pttl(key) <= 60_000
        for touch in (
            store.get(tenant, "u", s.id, now=1.0),
            store.append_turn(tenant, "u", s.id, [U], A, now=2.0),
        ):
            await client.pexpire(key, 5_000)
            await touch
            assert 59_000 < await client.pttl(key) <= 60_000
    finally:
        await client.aclose()


async def test_redis_session_is_gone_after_its_idle_ttl(redis_server: RedisServer) -> None:
    client = Redis.from_url(redis_server.url)
    try:
        store = RedisSessionStore(client, HistoryPolicy(5, 1000, ttl_seconds=0.2))
        s = await store.create("t-expiry", "u", now=0.0)
        deadline = time.monotonic() + 5.0
        while await client.exists(session_key("t-expiry", "u", s.id)):
            assert time.monotonic() < deadline, "session outlived its TTL"
            await asyncio.sleep(0.05)
        with pytest.raises(SessionNotFound):
            await store.get("t-expiry", "u", s.id, now=1.0)
        with pytest.raises(SessionNotFound):
            await store.append_turn("t-expiry", "u", s.id, [U], A, now=1.0)
    finally:
        await client.aclose()


async def test_redis_unreachable_is_an_internal_error() -> None:
    client = Redis.from_url(f"redis://127.0.0.1:{free_port()}/0", socket_connect_timeout=0.5)
    try:
        store = RedisSessionStore(client, ROOMY)
        with pytest.raises(InternalError) as caught:
            await store.create("t", "u", now=0.0)
        assert "127.0.0.1" not in str(caught.value)
        with pytest.raises(InternalError):
            await store.get("t", "u", new_session_id(), now=0.0)
    finally:
        await client.aclose()
