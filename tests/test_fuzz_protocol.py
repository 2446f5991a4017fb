"""Protocol fuzzing against one running gateway (``hubgate serve`` in a child process).

Whatever a client sends — arbitrary text, JSON with the wrong type in any field, odd Unicode ids,
deeply nested or oversized JSON, invalid UTF-8, binary frames, a flood of tiny messages — it gets
an `error` frame or a documented close code (1007, 1008, 1009), never a 1011, and the process
logs no exception. A bystander of another tenant keeps chatting throughout, and once every
client has gone `/readyz` reports no connection and no stream left behind.

Each message sent is followed by a `ping` with a fresh id, so the frames between two `pong`s
answer one message. The parser in ``hubgate.protocol`` is the oracle: a message it refuses must
be answered with exactly the frame the gateway builds from that refusal.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from websockets.exceptions import ConnectionClosed, InvalidState

from hubgate import protocol
from hubgate.errors import RequestError
from hubgate.tokens import mint_dev_token
from tests.support.client import Client
from tests.support.emulator_server import EmulatorServer
from tests.support.gateway_server import TEST_SECRET, GatewayProcess, gateway_settings
from tests.support.process_checks import assert_healthy, wait_idle

NOVA = "amazon.nova-lite-v1:0"
HAIKU = "anthropic.claude-3-5-haiku-20241022-v1:0"
QUICK = "[[emulator:tokens=2]]"
RATE = 200.0  # messages a second per connection: a burst of 1,000
MAX_BYTES = 64 * 1024

SERVER_TYPES = frozenset(
    {
        "ready",
        "start",
        "delta",
        "end",
        "error",
        "pong",
        "auth.ok",
        "auth.expiring",
        "session",
        "session.deleted",
        "draining",
        "budget",
    }
)
# Every code of docs/protocol.md's error table, plus the per-connection message rate warning.
ERROR_CODES = frozenset(
    {
        "invalid_message",
        "unknown_type",
        "duplicate_id",
        "too_many_streams",
        "model_not_allowed",
        "rate_limited",
        "token_rate_limited",
        "limiter_unavailable",
        "budget_exhausted",
        "token_expired",
        "invalid_token",
        "upstream_throttled",
        "upstream_timeout",
        "upstream_error",
        "stream_not_found",
        "session_not_found",
        "message_rate_limited",
    }
)
# The only error uvicorn may log: one line per invalid UTF-8 frame (its own, before hubgate sees it).
TOLERATED_ERRORS = ("Invalid UTF-8 sequence received from client.",)


def fuzz_settings(examples: int) -> settings:
    """Bounded, deterministic enough for CI: no deadline (a socket round trip varies)."""
    return settings(
        max_examples=examples, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
    )


# ---------------------------------------------------------------------------- the one gateway


@pytest.fixture(scope="module")
def fuzz_gateway(
    emulator: EmulatorServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[GatewayProcess]:
    """One `hubgate serve` for the module: tenants without limits, so refusals come from the protocol."""
    path: Path = tmp_path_factory.mktemp("fuzz") / "tenants.yaml"
    tenant = {"models": [NOVA, HAIKU], "default_model": NOVA, "default_max_tokens": 64}
    path.write_text(yaml.safe_dump({"tenants": {"fuzz": tenant, "bystander": tenant}}))
    settings_ = gateway_settings(
        emulator.url, tenants_file=str(path), max_messages_per_second=RATE, stream_grace_seconds=5.0
    )
    gateway = GatewayProcess(settings_)
    gateway.start()
    try:
        yield gateway
    finally:
        gateway.stop()


def token(tenant: str = "fuzz") -> str:
    """A token for a fresh user: request ids never collide with an earlier example's."""
    return mint_dev_token(TEST_SECRET, tenant=tenant, user=f"u-{uuid.uuid4().hex[:12]}", lifetime_seconds=900)


# ---------------------------------------------------------------------------- the bystander


@dataclass
class Bystander:
    """Another tenant's client chatting in a loop while a test fuzzes."""

    client: Client
    completed: int = 0
    failures: list[dict[str, Any]] = field(default_factory=list)
    stop: bool = False

    async def run(self) -> None:
        # Stopped by a flag, not by cancellation: wait_for may swallow a cancel that races a frame.
        while not self.stop:
            frames = await self.client.chat(
                uuid.uuid4().hex, "[[emulator:tokens=5]] [[emulator:token_delay_ms=10]]"
            )
            if frames[-1]["type"] == "end":
                self.completed += 1
            else:
                self.failures.append(frames[-1])


@pytest.fixture(autouse=True)
async def bystander(fuzz_gateway: GatewayProcess) -> AsyncIterator[Bystander]:
    """Another tenant chats throughout each test; afterwards nothing may be left behind.

    The bystander must have completed chats during the test and still complete one after it.
    Then, with every client gone, the gateway must be alive with no connection and no stream
    left, and must have logged no exception.
    """
    client = await Client.open(fuzz_gateway.url, token("bystander"))
    watcher = Bystander(client)
    task = asyncio.create_task(watcher.run())
    yield watcher
    async with asyncio.timeout(30):
        while watcher.completed < 1 and not task.done():
            await asyncio.sleep(0.02)
        watcher.stop = True
        await task  # a crash of the loop (a closed socket, a timeout) fails the test here
        assert watcher.failures == []
        after = await client.chat(uuid.uuid4().hex, QUICK)
        assert after[-1]["type"] == "end"
        await client.close()

    await wait_idle(fuzz_gateway)
    assert_healthy(fuzz_gateway, tolerated=TOLERATED_ERRORS)


# ---------------------------------------------------------------------------- exchanges


def check_frame(frame: Any) -> None:
    """Every server frame is a JSON object of a documented type; errors carry a documented code."""
    assert isinstance(frame, dict) and frame.get("type") in SERVER_TYPES, frame
    if frame["type"] == "error":
        assert frame["code"] in ERROR_CODES, frame
        assert isinstance(frame["message"], str) and frame["message"], frame
        assert "Traceback" not in frame["message"]
    if frame["type"] in ("start", "delta", "end"):
        assert isinstance(frame["id"], str) and isinstance(frame["seq"], int), frame


def expected_refusal(raw: str) -> dict[str, Any] | None:
    """The exact error frame the gateway answers `raw` with when the parser refuses it."""
    try:
        protocol.parse_client_message(raw)
    except RequestError as exc:
        frame: dict[str, Any] = json.loads(
            protocol.encode(
                protocol.error_frame(
                    exc.code, exc.message, request_id=protocol.request_id_of(raw), retry_after=exc.retry_after
                )
            )
        )
        return frame
    return None


def is_terminal(frame: dict[str, Any]) -> bool:
    return frame["type"] == "end" or (frame["type"] == "error" and "seq" in frame)


@dataclass
class Exchange:
    sent: list[str | bytes]
    windows: list[list[dict[str, Any]]]  # frames received before the pong that follows each message
    frames: list[dict[str, Any]]  # everything, in order


async def exchange(gateway: GatewayProcess, messages: list[str | bytes], timeout: float = 30.0) -> Exchange:
    """Send each message followed by a sync `ping`, read every answer, wait for admitted requests.

    All messages go out in one write (the client's protocol object buffers them), so the gateway
    sees them back to back. Returns once every pong arrived and every `chat` the gateway admitted
    has its terminal frame; the connection must stay open throughout.
    """
    client = await Client.open(gateway.url, token())
    syncs = [f"sync-{uuid.uuid4().hex}" for _ in messages]
    for message, sync in zip(messages, syncs, strict=True):
        if isinstance(message, bytes):
            client.ws.protocol.send_binary(message)
        else:
            client.ws.protocol.send_text(message.encode())
        client.ws.protocol.send_text(json.dumps({"type": "ping", "id": sync}).encode())
    client.ws.send_data()

    result = Exchange(list(messages), [[] for _ in messages], [])
    try:
        async with asyncio.timeout(timeout):
            index = 0
            while index < len(messages):
                frame = json.loads(await client.ws.recv())
                check_frame(frame)
                if frame == {"type": "pong", "id": syncs[index]}:
                    index += 1
                    continue
                result.windows[index].append(frame)
                result.frames.append(frame)
            admitted = admitted_chats(result)
            while any(
                sum(1 for f in result.frames if f.get("id") == rid and is_terminal(f)) < count
                for rid, count in admitted.items()
            ):
                frame = json.loads(await client.ws.recv())
                check_frame(frame)
                result.frames.append(frame)
    except ConnectionClosed as exc:
        pytest.fail(f"the gateway closed the connection: {exc.rcvd}; sent {messages!r}")
    await client.close()
    return result


def admitted_chats(result: Exchange) -> Counter[str]:
    """Chats the parser accepts and the connection did not refuse at once: each owes one terminal frame."""
    admitted: Counter[str] = Counter()
    for raw, window in zip(result.sent, result.windows, strict=True):
        if isinstance(raw, bytes):
            continue
        try:
            parsed = protocol.parse_client_message(raw)
        except RequestError:
            continue
        if not isinstance(parsed, protocol.Chat):
            continue
        refused = any(f["type"] == "error" and "seq" not in f and f.get("id") == parsed.id for f in window)
        if not refused:
            admitted[parsed.id] += 1
    return admitted


def check_answers(result: Exchange) -> None:
    """Refused messages got exactly the parser's refusal; no frame names an id this client never sent."""
    ids = {protocol.request_id_of(raw) for raw in result.sent} - {None}
    for raw, window in zip(result.sent, result.windows, strict=True):
        if isinstance(raw, bytes):
            continue
        refusal = expected_refusal(raw)
        if refusal is not None:
            assert refusal in window, (raw, window)
    for frame in result.frames:
        if "id" in frame:
            assert frame["id"] in ids, frame


# ---------------------------------------------------------------------------- strategies

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=40)
)
json_values = st.recursive(
    json_scalars,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=10,
)

BASE: dict[str, dict[str, Any]] = {
    "chat": {
        "type": "chat",
        "id": "c",
        "messages": [{"role": "user", "content": QUICK}],
        "model": NOVA,
        "system": "Be brief.",
        "max_tokens": 8,
        "temperature": 0.5,
        "top_p": 0.5,
        "stop": ["zz"],
        "session": "s" * 32,
    },
    "cancel": {"type": "cancel", "id": "c"},
    "ping": {"type": "ping", "id": "p"},
    "auth": {"type": "auth", "token": "a.b.c"},
    "resume": {"type": "resume", "id": "r", "after": -1},
    "session.create": {"type": "session.create", "id": "s", "system": "sys"},
    "session.get": {"type": "session.get", "id": "g", "session": "s" * 32},
    "session.delete": {"type": "session.delete", "id": "d", "session": "s" * 32},
}
Path_ = tuple[str | int, ...]


def field_paths(kind: str) -> list[Path_]:
    """Every field of a message type, nested ones included."""
    paths: list[Path_] = [(name,) for name in BASE[kind]]
    if kind == "chat":
        paths += [("messages", 0), ("messages", 0, "role"), ("messages", 0, "content")]
    return paths


def mutate(kind: str, path: Path_, value: Any, *, delete: bool = False) -> str:
    message = json.loads(json.dumps(BASE[kind]))
    target = message
    for step in path[:-1]:
        target = target[step]
    if delete:
        del target[path[-1]]
    else:
        target[path[-1]] = value
    return json.dumps(message)


ALL_PATHS = [(kind, path) for kind in BASE for path in field_paths(kind)]
WRONG_VALUES: list[Any] = [
    None,
    True,
    False,
    0,
    -1,
    1.5,
    2**64,
    -(2**63) - 1,
    1e308,
    "",
    " ",
    "\u200b",
    "x" * 300,
    [],
    [None],
    [[[]]],
    {},
    {"role": "user"},
]


# ---------------------------------------------------------------------------- the tests


@fuzz_settings(150)
@given(st.lists(st.text(max_size=300) | json_values.map(json.dumps), min_size=1, max_size=8))
async def test_arbitrary_text_frames(fuzz_gateway: GatewayProcess, texts: list[str]) -> None:
    check_answers(await exchange(fuzz_gateway, list(texts)))


async def test_every_wrong_type_in_every_field_of_every_message_type(fuzz_gateway: GatewayProcess) -> None:
    for kind in BASE:
        messages: list[str | bytes] = []
        for path in field_paths(kind):
            messages.append(mutate(kind, path, None, delete=True))
            messages += [mutate(kind, path, value) for value in WRONG_VALUES]
        # Unique chat ids per mutation, so that each valid one runs instead of being a duplicate.
        if kind == "chat":
            messages = [m.replace('"id": "c"', f'"id": "c{i}"', 1) for i, m in enumerate(messages)]
        result = await exchange(fuzz_gateway, messages)
        check_answers(result)
        refused = sum(1 for m in messages if isinstance(m, str) and expected_refusal(m) is not None)
        assert refused >= len(messages) // 2  # nearly every mutation is a wrong type


@fuzz_settings(150)
@given(
    st.lists(
        st.sampled_from(ALL_PATHS).flatmap(
            lambda kp: json_values.map(lambda value: mutate(kp[0], kp[1], value))  # type: ignore[misc]
        ),
        min_size=1,
        max_size=6,
    )
)
async def test_any_value_in_any_field(fuzz_gateway: GatewayProcess, messages: list[str]) -> None:
    check_answers(await exchange(fuzz_gateway, list(messages)))


@fuzz_settings(100)
@given(st.text(max_size=140))
async def test_unicode_ids(fuzz_gateway: GatewayProcess, request_id: str) -> None:
    messages: list[str | bytes] = [
        json.dumps({"type": "ping", "id": request_id}, ensure_ascii=ensure) for ensure in (True, False)
    ]
    messages += [
        json.dumps({"type": "chat", "id": request_id, "messages": [{"role": "user", "content": QUICK}]}),
        json.dumps({"type": "cancel", "id": request_id}),
        json.dumps({"type": "session.create", "id": request_id}),
    ]
    result = await exchange(fuzz_gateway, messages)
    check_answers(result)
    valid = 0 < len(request_id) <= protocol.MAX_ID_LENGTH and request_id.isprintable()
    for window in result.windows[:2]:
        if valid:
            assert {"type": "pong", "id": request_id} in window  # echoed exactly, whatever the script
        else:
            assert [f["code"] for f in window] == ["invalid_message"]
    if valid:
        chat = [f for f in result.frames if f.get("id") == request_id and "seq" in f]
        assert chat[0]["type"] == "start" and chat[-1]["type"] == "end"


async def test_lone_surrogates_and_odd_json(fuzz_gateway: GatewayProcess) -> None:
    odd = [
        '{"type": "ping", "id": "\\ud800"}',
        '{"type": "ping", "id": "\\udfff\\ud800"}',
        '{"type": "chat", "id": "x", "messages": [{"role": "user", "content": "\\ud83d"}]}',
        '{"type": "ping", "id": 1e400}',
        '{"type": "ping", "id": NaN}',
        '{"type": "ping", "id": "a"} trailing',
        '{"type": "ping", "id": "\\u0000"}',
        '\ufeff{"type": "ping"}',
        '{"type": "ping", "type": "chat"}',
        "",
        " ",
        "null",
        '"ping"',
        "[]",
        "{}",
        '{"type": null}',
        '{"type": ["ping"]}',
        '{"type": "PING"}',
        '{"type": "ping\\u0000"}',
        "{" * 10 + "}" * 10,
    ]
    check_answers(await exchange(fuzz_gateway, list(odd)))


async def test_deeply_nested_json(fuzz_gateway: GatewayProcess) -> None:
    depth = 30_000  # 60 KB: within the size limit, far beyond any parser's recursion limit
    nested: list[str | bytes] = [
        "[" * depth + "]" * depth,
        '{"a":' * (depth // 3) + "1" + "}" * (depth // 3),
        '{"type": "ping", "id": "deep", "x": ' + "[" * depth + "]" * depth + "}",
        '{"type": "chat", "id": "deep", "messages": ' + "[" * depth + "]" * depth + "}",
        "[" * depth,  # never closed
    ]
    assert all(len(m) < MAX_BYTES for m in nested)
    result = await exchange(fuzz_gateway, nested)
    check_answers(result)
    assert all(w and w[0]["code"] == "invalid_message" for w in result.windows)

    client = await Client.open(fuzz_gateway.url, token())
    await client.send("[" * 100_000 + "]" * 100_000)  # 100k brackets: over the size limit
    assert (await client.wait_closed())[0] == 1009


async def test_message_size_limit_is_exact(fuzz_gateway: GatewayProcess) -> None:
    def padded(total: int, filler: str = "x") -> str:
        head, tail = '{"type": "teleport", "pad": "', '"}'
        room = total - len(head) - len(tail)
        return head + filler * (room // len(filler.encode())) + tail

    at_limit = padded(MAX_BYTES)
    assert len(at_limit.encode()) == MAX_BYTES
    chat = json.dumps(
        {"type": "chat", "id": "big", "messages": [{"role": "user", "content": f"{QUICK} " + "w " * 30_000}]}
    )
    assert len(chat.encode()) < MAX_BYTES
    result = await exchange(fuzz_gateway, [at_limit, padded(MAX_BYTES - 7, "é"), chat])
    check_answers(result)
    assert result.windows[0][0]["code"] == "unknown_type"

    over = [
        padded(MAX_BYTES + 1),
        padded(MAX_BYTES + 2, "é"),
        ["x" * 40_000, "y" * 40_000],  # fragments each under the limit, the message over it
        padded(4 * MAX_BYTES),
    ]
    for message in over:
        client = await Client.open(fuzz_gateway.url, token())
        await client.ws.send(message)
        code, _ = await client.wait_closed()
        assert code == 1009


@fuzz_settings(40)
@given(
    data=st.binary(min_size=1, max_size=64).filter(lambda b: not _is_utf8(b)),
    before_auth=st.booleans(),
)
async def test_invalid_utf8_in_a_text_frame_closes_1007(
    fuzz_gateway: GatewayProcess, data: bytes, before_auth: bool
) -> None:
    client = await Client.open(fuzz_gateway.url, None if before_auth else token())
    # The client library refuses to send such a frame; its protocol object does not check.
    client.ws.protocol.send_text(b'{"type": "ping", "id": "' + data + b'"}')
    client.ws.send_data()
    code, _ = await client.wait_closed()
    assert code == 1007


@fuzz_settings(80)
@given(st.text(max_size=300) | st.binary(max_size=300) | json_values.map(json.dumps))
async def test_anything_but_auth_as_the_first_message_closes_4401(
    fuzz_gateway: GatewayProcess, first: str | bytes
) -> None:
    client = await Client.open(fuzz_gateway.url)  # no credentials: the first message must be `auth`
    await client.ws.send(first)
    code, _ = await client.wait_closed()
    assert code == 4401


def _is_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


@fuzz_settings(80)
@given(
    st.lists(
        st.binary(max_size=200)
        | st.sampled_from(
            [
                json.dumps({"type": "chat", "id": "bin", "messages": [{"role": "user", "content": QUICK}]}),
                json.dumps({"type": "ping", "id": "bin"}),
                json.dumps({"type": "auth", "token": "eyJhbGciOiJIUzI1NiJ9.e30.c2ln"}),
            ]
        ).map(str.encode),
        min_size=1,
        max_size=6,
    )
)
async def test_binary_frames_are_refused_and_never_acted_on(
    fuzz_gateway: GatewayProcess, frames: list[bytes]
) -> None:
    result = await exchange(fuzz_gateway, list(frames))
    for window in result.windows:
        assert [(f["type"], f["code"]) for f in window] == [("error", "invalid_message")]
    assert not [f for f in result.frames if "seq" in f]  # no chat sent as binary ever ran


async def test_a_flood_of_tiny_messages_is_answered_then_closed_1008(fuzz_gateway: GatewayProcess) -> None:
    client = await Client.open(fuzz_gateway.url, token())
    ping = json.dumps({"type": "ping"}).encode()
    warnings: list[dict[str, Any]] = []
    pongs = 0
    sent = 0

    async def read() -> int | None:
        nonlocal pongs
        try:
            async for raw in client.ws:
                frame = json.loads(raw)
                check_frame(frame)
                if frame["type"] == "pong":
                    pongs += 1
                else:
                    warnings.append(frame)
        except ConnectionClosed as exc:
            return exc.rcvd.code if exc.rcvd else None
        return None

    reader = asyncio.create_task(read())
    # Thousands of messages a second, in writes of 500, bounded in count and time.
    async with asyncio.timeout(20):
        while not reader.done() and sent < 40_000:
            try:
                for _ in range(500):
                    client.ws.protocol.send_text(ping)
                client.ws.send_data()
            except (InvalidState, ConnectionClosed, OSError):
                break  # the gateway closed the connection under us
            sent += 500
            await asyncio.sleep(0)
        code = await reader
    assert code == 1008
    assert warnings, "no message_rate_limited frame before the close"
    assert {(w["code"], w["retry_after"]) for w in warnings} == {("message_rate_limited", round(1 / RATE, 3))}
    # The burst was served; every dropped message was answered, until the flood went on too long.
    assert RATE * 5 <= pongs < sent
    assert len(warnings) >= RATE * 5
