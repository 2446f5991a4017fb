"""Tenant isolation on a running gateway whose state lives in Redis.

Tenant A can never reach tenant B's streams (resume, cancel, reusing B's request ids), sessions
(get, delete, chat), usage, or limit state, and the refusals look exactly like the ones for
things that do not exist. Both tenants have a user called `alice`, and they use the same request
ids, so nothing may be keyed by user or id alone. The gateway is ``hubgate serve`` in a child
process sharing the test session's Redis; tenant ids are fresh for every run.
"""

from __future__ import annotations

import asyncio
import re
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
import yaml
from redis.asyncio import Redis
from starlette.routing import Route
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from hubgate.app import create_app
from hubgate.ratelimit.base import tenant_keys
from hubgate.tokens import mint_dev_token
from tests.support.client import Client, seqs_of
from tests.support.emulator_server import EmulatorServer
from tests.support.gateway_server import TEST_SECRET, GatewayProcess, gateway_settings
from tests.support.process_checks import assert_healthy, wait_idle
from tests.support.redis_server import RedisServer

NOVA = "amazon.nova-lite-v1:0"
HAIKU = "anthropic.claude-3-5-haiku-20241022-v1:0"
QUICK = "[[emulator:tokens=2]]"
SUFFIX = uuid.uuid4().hex[:8]
A, B, NOISY = f"alpha-{SUFFIX}", f"beta-{SUFFIX}", f"noisy-{SUFFIX}"
ADMIN_GROUP = "hubgate-admin"


def slow(request_id: str, tokens: int = 40, **fields: Any) -> dict[str, Any]:
    content = f"[[emulator:tokens={tokens}]] [[emulator:token_delay_ms=20]]"
    return {"type": "chat", "id": request_id, "messages": [{"role": "user", "content": content}], **fields}


def token(tenant: str, user: str = "alice", **kwargs: Any) -> str:
    return mint_dev_token(TEST_SECRET, tenant=tenant, user=user, lifetime_seconds=900, **kwargs)


@pytest.fixture(scope="module")
def tenants_file(tmp_path_factory: pytest.TempPathFactory) -> str:
    document = {
        "tenants": {
            # Rates of one a minute refill less than one unit during the test: every figure in
            # `start.limits` is then exact arithmetic on A's own requests.
            A: {
                "models": [NOVA],
                "default_max_tokens": 64,
                "limits": {
                    "requests_per_minute": 1,
                    "request_burst": 1000,
                    "tokens_per_minute": 1,
                    "token_burst": 10_000_000,
                    "max_connections": 20,
                    "max_concurrent_streams": 10,
                },
            },
            B: {"models": [HAIKU, NOVA], "default_max_tokens": 64},
            NOISY: {
                "models": [NOVA],
                "default_max_tokens": 64,
                "limits": {
                    "requests_per_minute": 1,
                    "request_burst": 2,
                    "tokens_per_minute": 1,
                    "token_burst": 300,
                    "max_connections": 2,
                    "max_concurrent_streams": 1,
                },
            },
        }
    }
    path: Path = tmp_path_factory.mktemp("isolation") / "tenants.yaml"
    path.write_text(yaml.safe_dump(document))
    return str(path)


@pytest.fixture(scope="module")
def isolated_gateway(
    emulator: EmulatorServer, redis_server: RedisServer, tenants_file: str
) -> Iterator[GatewayProcess]:
    # A generous Redis budget: on a busy machine a decision over the 50 ms default would fall back
    # to local buckets, and the limit figures compared here are those kept in Redis.
    settings = gateway_settings(
        emulator.url, tenants_file=tenants_file, redis_url=redis_server.url, redis_timeout_ms=2000
    )
    gateway = GatewayProcess(settings)
    gateway.start()
    try:
        yield gateway
    finally:
        gateway.stop()


@pytest.fixture(autouse=True)
async def healthy_afterwards(isolated_gateway: GatewayProcess) -> Any:
    yield
    await wait_idle(isolated_gateway)
    assert_healthy(isolated_gateway)


async def read_until(client: Client, request_id: str, count: int) -> None:
    async with asyncio.timeout(10):
        while len(client.by_id[request_id]) < count:
            await client.next_frame()


async def answer(client: Client, message: dict[str, Any]) -> dict[str, Any]:
    """Send one message and return the first frame that is not part of a running stream."""
    await client.send(message)
    async with asyncio.timeout(10):
        while True:
            frame = await client.next_frame()
            if "seq" not in frame:
                return frame


# ---------------------------------------------------------------------------- streams


async def test_another_tenants_streams_cannot_be_resumed_cancelled_or_detected(
    isolated_gateway: GatewayProcess,
) -> None:
    url = isolated_gateway.url
    victim = await Client.open(url, token(B))
    intruder = await Client.open(url, token(A))  # the same user name, another tenant
    target = f"req-{uuid.uuid4().hex}"
    await victim.send(slow(target))
    await read_until(victim, target, 3)

    guessed = ["1", "r1", uuid.uuid4().hex, target.upper(), target + " ", f"{B}:alice:{target}"]
    refusals = []
    for request_id in [target, *guessed]:
        for message in (
            {"type": "resume", "id": request_id, "after": -1},
            {"type": "resume", "id": request_id, "after": 0},
            {"type": "cancel", "id": request_id},
        ):
            refusals.append(await answer(intruder, message))
    assert {(f["type"], f["code"]) for f in refusals} == {("error", "stream_not_found")}
    # "Not yours" and "does not exist" read the same, for resume and for cancel.
    by_type: dict[str, set[str]] = {"resume": set(), "cancel": set()}
    for frame, kind in zip(refusals, ["resume", "resume", "cancel"] * (len(guessed) + 1), strict=True):
        by_type[kind].add(frame["message"])
    assert all(len(messages) == 1 for messages in by_type.values()), by_type

    frames = await victim.until_terminal(target)
    assert frames[-1]["type"] == "end" and frames[-1]["stop_reason"] == "end_turn"  # never cancelled
    assert seqs_of(frames) == list(range(len(frames)))

    # Finished, B's frames stay in the resume buffer for minutes: still invisible to A.
    after = await answer(intruder, {"type": "resume", "id": target, "after": -1})
    assert after["code"] == "stream_not_found" and after["message"] in by_type["resume"]
    # The same id under A is a different request: it runs in full, no duplicate_id reveals B's.
    intruder.by_id.pop(target)  # the refusals above were filed under this id
    mine = await intruder.chat(target, QUICK)
    assert mine[0]["type"] == "start" and mine[-1]["type"] == "end", mine
    await intruder.close()
    await victim.close()


async def test_the_same_request_id_runs_independently_in_two_tenants(
    isolated_gateway: GatewayProcess,
) -> None:
    one = await Client.open(isolated_gateway.url, token(A))
    other = await Client.open(isolated_gateway.url, token(B))
    shared = f"same-{uuid.uuid4().hex}"
    await one.send(slow(shared, tokens=20))
    await other.send(slow(shared, tokens=25))
    first, second = await asyncio.gather(one.until_terminal(shared), other.until_terminal(shared))
    assert [f["type"] for f in first if f["type"] != "delta"] == ["start", "end"]
    assert [f["type"] for f in second if f["type"] != "delta"] == ["start", "end"]
    assert first[-1]["usage"]["output_tokens"] == 20 and second[-1]["usage"]["output_tokens"] == 25
    await one.close()
    await other.close()


# ---------------------------------------------------------------------------- sessions


async def test_another_tenants_session_cannot_be_read_deleted_or_chatted_in(
    isolated_gateway: GatewayProcess,
) -> None:
    owner = await Client.open(isolated_gateway.url, token(B))
    created = await answer(owner, {"type": "session.create", "system": "B's secret system prompt"})
    session = created["session"]
    assert (await owner.chat(uuid.uuid4().hex, QUICK, session=session))[-1]["type"] == "end"
    await owner.send({"type": "session.get", "session": session})
    before = await owner.recv()
    assert len(before["messages"]) == 2

    intruder = await Client.open(isolated_gateway.url, token(A))
    never_created = "x" * len(session)
    seen: dict[str, list[dict[str, Any]]] = {}
    for sid in (session, never_created):
        seen[sid] = [
            await answer(intruder, {"type": "session.get", "session": sid, "id": "g"}),
            await answer(intruder, {"type": "session.delete", "session": sid, "id": "d"}),
        ]
        chat = await intruder.chat(f"c-{uuid.uuid4().hex}", QUICK, session=sid)
        assert len(chat) == 1 and chat[0]["seq"] == 0  # refused before anything reached the model
        seen[sid].append({k: v for k, v in chat[0].items() if k != "id"})
    assert all(f["code"] == "session_not_found" for frames in seen.values() for f in frames)
    assert seen[session] == seen[never_created]  # byte for byte the same answers
    assert "secret" not in str(seen)

    await owner.send({"type": "session.get", "session": session})
    assert await owner.recv() == before  # neither deleted nor extended by A
    await intruder.close()
    await owner.close()


# ---------------------------------------------------------------------------- models and limits


async def test_models_are_per_tenant(isolated_gateway: GatewayProcess) -> None:
    async with httpx.AsyncClient() as http:
        listed = await http.get(
            f"{isolated_gateway.http}/v1/models", headers={"Authorization": f"Bearer {token(A)}"}
        )
    assert listed.json()["models"] == [{"id": NOVA}]
    client = await Client.open(isolated_gateway.url, token(A))
    assert client.ready["models"] == [NOVA]
    refused = await client.chat(uuid.uuid4().hex, QUICK, model=HAIKU)  # one of B's models
    assert refused[-1]["code"] == "model_not_allowed"
    await client.close()


async def settled(redis_server: RedisServer, tenant: str) -> None:
    """Wait until the tenant has no stream lease left: its last reservation is settled.

    A request is settled just after its terminal frame is sent, so the next `start.limits` is
    only exact arithmetic once the previous request's lease is gone from Redis.
    """
    client = Redis.from_url(redis_server.url)
    try:
        async with asyncio.timeout(10):
            while await client.zcard(tenant_keys(tenant).streams):
                await asyncio.sleep(0.01)
    finally:
        await client.aclose()


def limits_of(frames: list[dict[str, Any]]) -> tuple[int, int]:
    assert frames[0]["type"] == "start" and frames[-1]["type"] == "end", frames[-1]
    limits = frames[0]["limits"]
    return limits["requests_remaining"], limits["tokens_remaining"]


async def test_another_tenants_traffic_and_refusals_never_touch_our_limits(
    isolated_gateway: GatewayProcess, redis_server: RedisServer
) -> None:
    url = isolated_gateway.url
    ours = await Client.open(url, token(A))
    prompt = "[[emulator:tokens=7]] same prompt every time"
    first = limits_of(await ours.chat(uuid.uuid4().hex, prompt, max_tokens=100))
    await settled(redis_server, A)
    second = limits_of(await ours.chat(uuid.uuid4().hex, prompt, max_tokens=100))
    await settled(redis_server, A)
    step = (first[0] - second[0], first[1] - second[1])
    assert step[0] == 1 and step[1] > 0

    # B runs heavy traffic with the same user name and request ids as A.
    heavy = [await Client.open(url, token(B)) for _ in range(3)]
    await asyncio.gather(
        *(c.chat(f"heavy-{i}", "[[emulator:tokens=30]]", max_tokens=5000) for i, c in enumerate(heavy))
    )
    # The noisy tenant runs into every one of its limits.
    noisy = [await Client.open(url, token(NOISY, f"n{i}")) for i in range(2)]
    with pytest.raises(InvalidStatus) as capped:
        await connect(url, additional_headers={"Authorization": f"Bearer {token(NOISY)}"})
    assert capped.value.response.status_code == 429
    await noisy[0].send(slow("long", tokens=30))
    await read_until(noisy[0], "long", 1)
    assert (await noisy[1].chat("second", QUICK))[-1]["code"] == "too_many_streams"
    await noisy[0].until_terminal("long")
    codes = []
    while not {"rate_limited", "token_rate_limited"} & set(codes):
        assert len(codes) < 10, codes  # a burst of 2 requests and 300 tokens runs out quickly
        codes.append((await noisy[1].chat(f"burst-{len(codes)}", QUICK, max_tokens=200))[-1].get("code"))

    # Meanwhile A's figures moved by exactly its own requests, and A is never refused.
    await settled(redis_server, A)
    third = limits_of(await ours.chat(uuid.uuid4().hex, prompt, max_tokens=100))
    assert (second[0] - third[0], second[1] - third[1]) == step
    extra = await Client.open(url, token(A, "carol"))  # A's connection cap is its own too
    assert (await extra.chat(uuid.uuid4().hex, QUICK))[-1]["type"] == "end"
    for client in [ours, extra, *heavy, *noisy]:
        await client.close()
    assert "deciding locally" not in isolated_gateway.output()  # every figure came from Redis


# ---------------------------------------------------------------------------- admin endpoints


def admin_requests(settings_path: str) -> list[tuple[str, str]]:
    """(method, path) of every /admin route the app mounts, path parameters filled in with B's ids."""
    app = create_app(gateway_settings("http://127.0.0.1:1", tenants_file=settings_path))
    requests = []
    for route in app.routes:
        if isinstance(route, Route) and route.path.startswith("/admin"):
            path = re.sub(r"\{id(:\w+)?\}", B, route.path)
            path = re.sub(r"\{[^}]+\}", "x", path)
            if "/models/" in route.path:
                path = path.replace(B, NOVA)
            for method in sorted(route.methods or {"GET"}):
                requests.append((method, path))
    assert ("GET", "/admin/usage") in requests
    return requests


async def test_admin_endpoints_refuse_every_tenant_token(
    isolated_gateway: GatewayProcess, tenants_file: str
) -> None:
    tenant_tokens = {
        "A's user": token(A),
        "B's user": token(B),
        "another group": token(A, groups=["users", "admins"]),
        "the admin group in another case": token(A, groups=["HUBGATE-ADMIN"]),
        "the admin group with a space": token(A, groups=[f"{ADMIN_GROUP} "]),
    }
    refusals: dict[str, set[str]] = {}
    async with httpx.AsyncClient(base_url=isolated_gateway.http) as http:
        for method, path in admin_requests(tenants_file):
            for name, tenant_token in tenant_tokens.items():
                for params in ({}, {"tenant": B}, {"tenant": B, "format": "csv", "group_by": "user"}):
                    response = await http.request(
                        method,
                        path,
                        params=params,
                        headers={"Authorization": f"Bearer {tenant_token}"},
                        json={"enabled": True, "models": [HAIKU]} if method in ("PUT", "POST") else None,
                    )
                    assert response.status_code == 403, (method, path, name, response.text)
                    refusals.setdefault(f"{method} {path}", set()).add(response.text)
            anonymous = await http.request(method, path)
            assert anonymous.status_code == 401, (method, path)
        # A groups claim that is not a list is not a token at all.
        bad = await http.get("/admin/usage", headers={"Authorization": f"Bearer {_string_groups()}"})
        assert bad.status_code == 401
        # The admin group itself is let in (the refusals above are about the token, not the route).
        admin = await http.get(
            "/admin/usage", params={"tenant": B}, headers={"Authorization": f"Bearer {_admin()}"}
        )
        assert admin.status_code == 200
    # One refusal for every tenant token, whoever's data the request named.
    assert all(len(texts) == 1 for texts in refusals.values()), refusals
    assert not [text for texts in refusals.values() for text in texts if B in text]


def _admin() -> str:
    return token(A, "root", groups=[ADMIN_GROUP])


def _string_groups() -> str:
    claims = {"sub": "root", "custom:tenant_id": A, "cognito:groups": ADMIN_GROUP, "exp": 2**31}
    return jwt.encode(claims, TEST_SECRET, algorithm="HS256")
