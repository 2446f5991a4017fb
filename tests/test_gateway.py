"""The WebSocket endpoint end to end: real uvicorn, real websockets client, real aioboto3, emulator."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from hubgate.emulator import expected_reply
from hubgate.settings import Settings
from tests.conftest import ws_url
from tests.support.client import Client, seqs_of, text_of
from tests.support.emulator_server import EmulatorServer
from tests.support.gateway_server import gateway_settings, running_gateway
from tests.support.redis_server import RedisServer

Mint = Callable[..., str]
HAIKU = "anthropic.claude-3-5-haiku-20241022-v1:0"
NOVA = "amazon.nova-lite-v1:0"


async def last_request(
    emulator: EmulatorServer, predicate: Callable[[dict[str, Any]], bool]
) -> dict[str, Any]:
    async with httpx.AsyncClient() as http:
        records = (await http.get(f"{emulator.url}/_emulator/requests")).json()
    matches = [r for r in records if predicate(r)]
    assert matches, "the emulator saw no such request"
    return matches[-1]


async def stream_counters(emulator: EmulatorServer) -> dict[str, int]:
    async with httpx.AsyncClient() as http:
        counters: dict[str, int] = (await http.get(f"{emulator.url}/_emulator/streams")).json()
        return counters


async def wait_for_counter(emulator: EmulatorServer, name: str, at_least: int, timeout: float = 10.0) -> int:
    async with asyncio.timeout(timeout):
        while True:
            value = (await stream_counters(emulator))[name]
            if value >= at_least:
                return value
            await asyncio.sleep(0.02)


def refused_status(exc: pytest.ExceptionInfo[InvalidStatus]) -> tuple[int, dict[str, Any]]:
    response = exc.value.response
    return response.status_code, json.loads(response.body or b"{}")


# ---------------------------------------------------------------------------- handshake


async def test_ready_frame_with_authorization_header(gateway: Settings, mint: Mint) -> None:
    client = await Client.open(ws_url(gateway), mint("acme", "alice"))
    ready = client.ready
    assert ready["tenant"] == "acme" and ready["user"] == "alice"
    assert ready["protocol"] == "hubgate.v1"
    assert ready["default_model"] == HAIKU and NOVA in ready["models"]
    assert isinstance(ready["connection_id"], str) and ready["expires_at"] > time.time()
    assert client.ws.subprotocol == "hubgate.v1"
    await client.close()


async def test_token_in_subprotocol_is_not_echoed(gateway: Settings, mint: Mint) -> None:
    token = mint()
    client = await Client.open(ws_url(gateway), token, via="subprotocol")
    assert client.ws.subprotocol == "hubgate.v1"
    assert client.ws.response is not None
    assert token not in str(client.ws.response.headers)
    await client.close()


async def test_first_message_auth(gateway: Settings, mint: Mint) -> None:
    client = await Client.open(ws_url(gateway))
    await client.send({"type": "auth", "token": mint("globex", "bob")})
    ready = await client.recv()
    assert ready["type"] == "ready" and ready["tenant"] == "globex" and ready["user"] == "bob"
    await client.close()


async def test_bad_first_message_token_closes_4401(gateway: Settings) -> None:
    client = await Client.open(ws_url(gateway))
    await client.send({"type": "auth", "token": "not-a-jwt"})
    assert (await client.wait_closed())[0] == 4401


async def test_first_message_must_be_auth(gateway: Settings) -> None:
    client = await Client.open(ws_url(gateway))
    await client.send({"type": "ping"})
    assert (await client.wait_closed())[0] == 4401


async def test_auth_deadline_closes_4408(emulator: EmulatorServer) -> None:
    settings = gateway_settings(emulator.url, auth_timeout_seconds=0.3)
    async with running_gateway(settings):
        client = await Client.open(ws_url(settings))
        assert (await client.wait_closed())[0] == 4408


@pytest.mark.parametrize(
    "headers",
    [
        {"Authorization": "Bearer not-a-jwt"},
        {"Authorization": "Basic dXNlcjpwYXNz"},
    ],
)
async def test_bad_token_at_handshake_is_http_401(gateway: Settings, headers: dict[str, str]) -> None:
    with pytest.raises(InvalidStatus) as exc:
        await connect(ws_url(gateway), additional_headers=headers)
    status, body = refused_status(exc)
    assert status == 401 and body["error"]["code"] == "invalid_token"


async def test_expired_token_at_handshake_is_http_401(gateway: Settings, mint: Mint) -> None:
    with pytest.raises(InvalidStatus) as exc:
        await connect(
            ws_url(gateway), additional_headers={"Authorization": f"Bearer {mint(now=time.time() - 900)}"}
        )
    status, body = refused_status(exc)
    assert status == 401 and body["error"]["message"] == "token expired"


@pytest.mark.parametrize("tenant", ["initech", "no-such-tenant"])
async def test_disabled_or_unknown_tenant_is_http_403(gateway: Settings, mint: Mint, tenant: str) -> None:
    with pytest.raises(InvalidStatus) as exc:
        await connect(ws_url(gateway), additional_headers={"Authorization": f"Bearer {mint(tenant)}"})
    status, body = refused_status(exc)
    assert status == 403 and body["error"]["code"] == "tenant_refused"


async def test_disabled_tenant_in_band_closes_4403(gateway: Settings, mint: Mint) -> None:
    client = await Client.open(ws_url(gateway))
    await client.send({"type": "auth", "token": mint("initech")})
    assert (await client.wait_closed())[0] == 4403


async def test_origin_allowlist(emulator: EmulatorServer, mint: Mint) -> None:
    settings = gateway_settings(emulator.url, allowed_origins=("https://chat.example.com",))
    async with running_gateway(settings):
        with pytest.raises(InvalidStatus) as exc:
            await connect(ws_url(settings), origin="https://evil.example.net")  # type: ignore[arg-type]
        assert refused_status(exc)[0] == 403
        client = await Client.open(ws_url(settings), mint(), headers={"Origin": "https://chat.example.com"})
        await client.close()


# ---------------------------------------------------------------------------- streaming


async def test_chat_streams_the_emulators_exact_reply(
    gateway: Settings, mint: Mint, emulator: EmulatorServer
) -> None:
    client = await Client.open(ws_url(gateway), mint())
    frames = await client.chat("r1", "Tell me about lighthouses", system="Be brief.", max_tokens=300)
    assert frames[0]["type"] == "start" and frames[0]["model"] == HAIKU
    assert seqs_of(frames) == list(range(len(frames)))
    end = frames[-1]
    assert end["type"] == "end" and end["stop_reason"] == "end_turn"

    record = await last_request(emulator, lambda r: "lighthouses" in json.dumps(r["body"]))
    assert record["body"]["system"] == [{"text": "Be brief."}]
    assert record["body"]["inferenceConfig"]["maxTokens"] == 300
    expected = expected_reply(HAIKU, record["body"])
    assert text_of(frames) == expected.text
    assert end["usage"] == {"input_tokens": expected.input_tokens, "output_tokens": expected.output_tokens}
    assert end["metrics"]["ttft_ms"] > 0 and end["metrics"]["duration_ms"] >= end["metrics"]["ttft_ms"]
    await client.close()


async def test_max_tokens_cuts_the_reply(gateway: Settings, mint: Mint) -> None:
    client = await Client.open(ws_url(gateway), mint())
    frames = await client.chat("r1", "long one [[emulator:tokens=40]]", max_tokens=5)
    assert frames[-1]["stop_reason"] == "max_tokens"
    assert len([f for f in frames if f["type"] == "delta"]) == 5
    assert frames[-1]["usage"]["output_tokens"] == 5
    await client.close()


async def test_concurrent_requests_interleave_in_order(gateway: Settings, mint: Mint) -> None:
    client = await Client.open(ws_url(gateway), mint())
    words = {f"c{i}": " ".join(f"w{i}x{j}" for j in range(12)) for i in range(3)}
    for request_id, reply in words.items():
        await client.send(
            {
                "type": "chat",
                "id": request_id,
                "messages": [
                    {"role": "user", "content": f"[[emulator:reply={reply}]] [[emulator:token_delay_ms=5]]"}
                ],
            }
        )
    for request_id, reply in words.items():
        frames = await client.until_terminal(request_id)
        assert seqs_of(frames) == list(range(len(frames)))
        assert text_of(frames) == reply
    await client.close()


async def test_cancel_mid_stream_stops_upstream(
    gateway: Settings, mint: Mint, emulator: EmulatorServer
) -> None:
    before = (await stream_counters(emulator))["client_disconnected"]
    client = await Client.open(ws_url(gateway), mint())
    await client.send(
        {
            "type": "chat",
            "id": "slow",
            "messages": [
                {"role": "user", "content": "[[emulator:tokens=400]] [[emulator:token_delay_ms=20]]"}
            ],
        }
    )
    while len([f for f in client.by_id["slow"] if f["type"] == "delta"]) < 3:
        await client.next_frame()
    await client.send({"type": "cancel", "id": "slow"})
    frames = await client.until_terminal("slow")
    end = frames[-1]
    deltas = [f for f in frames if f["type"] == "delta"]
    assert end["type"] == "end" and end["stop_reason"] == "cancelled"
    assert end["usage"]["output_tokens"] == len(deltas) < 400
    assert seqs_of(frames) == list(range(len(frames)))
    await wait_for_counter(emulator, "client_disconnected", before + 1)
    # The connection is still usable.
    await client.send({"type": "ping", "id": "p"})
    assert (await client.recv())["type"] == "pong"
    await client.close()


async def test_cancel_unknown_request(gateway: Settings, mint: Mint) -> None:
    client = await Client.open(ws_url(gateway), mint())
    await client.send({"type": "cancel", "id": "nope"})
    frame = await client.recv()
    assert frame["type"] == "error" and frame["code"] == "stream_not_found" and frame["id"] == "nope"
    await client.close()


async def test_cancel_of_a_finished_request_is_stream_not_found(
    emulator: EmulatorServer, mint: Mint, limiter_url: str | None
) -> None:
    settings = gateway_settings(emulator.url, redis_url=limiter_url)
    async with running_gateway(settings):
        client = await Client.open(ws_url(settings), mint())
        request_id = f"done{time.time_ns()}"
        frames = await client.chat(request_id, "[[emulator:tokens=2]]")
        assert frames[-1]["type"] == "end"
        await client.send({"type": "cancel", "id": request_id})  # its buffer is still kept for resume
        frame = await client.recv()
        assert (frame["type"], frame["code"], frame["id"]) == ("error", "stream_not_found", request_id)
        assert "seq" not in frame
        await client.close()


async def test_a_reused_id_in_memory_is_refused_with_seq_0_before_bedrock_is_asked(
    emulator: EmulatorServer, mint: Mint
) -> None:
    settings = gateway_settings(emulator.url)  # no Redis: the in-memory resume buffer
    async with running_gateway(settings):
        client = await Client.open(ws_url(settings), mint())
        request_id = f"dup{time.time_ns()}"
        first = await client.chat(request_id, f"{request_id} [[emulator:tokens=2]]")
        assert first[-1]["type"] == "end"
        client.by_id.pop(request_id)
        again = await client.chat(request_id, f"{request_id} [[emulator:tokens=2]]")
        assert [(f["type"], f.get("code"), f["seq"]) for f in again] == [("error", "duplicate_id", 0)]
        assert len(await emulator.requests_with(request_id)) == 1  # the duplicate never reached Bedrock
        await client.close()


async def test_a_stall_before_the_first_token_is_retried(emulator: EmulatorServer, mint: Mint) -> None:
    settings = gateway_settings(
        emulator.url, upstream_read_timeout=0.5, upstream_retry_attempts=2, upstream_retry_base_ms=10
    )
    async with running_gateway(settings):
        client = await Client.open(ws_url(settings), mint())
        marker = f"stall{time.time_ns()}"
        frames = await client.chat("s0", f"{marker} [[emulator:fault=stall]] [[emulator:after=0]]")
        assert [(f["type"], f.get("code"), f["seq"]) for f in frames] == [("error", "upstream_timeout", 0)]
        assert len(await emulator.requests_with(marker)) == 2
        await client.close()


async def test_a_failing_session_store_is_an_error_frame_and_the_connection_stays(
    emulator: EmulatorServer, mint: Mint, fresh_redis_server: RedisServer
) -> None:
    settings = gateway_settings(emulator.url, redis_url=fresh_redis_server.url)
    async with running_gateway(settings):
        client = await Client.open(ws_url(settings), mint())
        fresh_redis_server.stop()
        await client.send({"type": "session.create", "id": "s1"})
        frame = await client.recv(timeout=30)
        assert (frame["type"], frame["code"], frame["id"]) == ("error", "internal_error", "s1")
        assert "Traceback" not in frame["message"]
        await client.send({"type": "ping", "id": "p"})
        assert await client.recv() == {"type": "pong", "id": "p"}
        await client.close()


async def test_client_disconnect_cancels_upstream_after_the_grace_period(
    emulator: EmulatorServer, mint: Mint
) -> None:
    settings = gateway_settings(emulator.url, stream_grace_seconds=0.5)
    async with running_gateway(settings):
        before = (await stream_counters(emulator))["client_disconnected"]
        client = await Client.open(ws_url(settings), mint())
        await client.send(
            {
                "type": "chat",
                "id": "gone",
                "messages": [
                    {"role": "user", "content": "[[emulator:tokens=400]] [[emulator:token_delay_ms=20]]"}
                ],
            }
        )
        await client.until_frame("gone", "delta")
        await client.close()
        await wait_for_counter(emulator, "client_disconnected", before + 1)


# ---------------------------------------------------------------------------- upstream faults


@pytest.mark.parametrize(
    ("directive", "code", "deltas"),
    [
        ("fault=throttling", "upstream_throttled", 0),
        ("fault=unavailable", "upstream_throttled", 0),
        ("fault=validation", "upstream_error", 0),
        ("fault=access_denied", "upstream_error", 0),
        ("fault=not_found", "upstream_error", 0),
        ("fault=internal", "upstream_error", 0),
        ("fault=stream_throttling]] [[emulator:after=2", "upstream_throttled", 2),
        ("fault=stream_model_error]] [[emulator:after=3", "upstream_error", 3),
        ("fault=cut]] [[emulator:after=4", "upstream_error", 4),
    ],
)
async def test_upstream_faults_become_error_frames(
    gateway: Settings, mint: Mint, directive: str, code: str, deltas: int
) -> None:
    client = await Client.open(ws_url(gateway), mint())
    frames = await client.chat("f", f"please [[emulator:{directive}]]")
    assert frames[-1]["type"] == "error" and frames[-1]["code"] == code
    assert len([f for f in frames if f["type"] == "delta"]) == deltas
    assert seqs_of(frames) == list(range(len(frames)))
    assert "Traceback" not in frames[-1]["message"]
    await client.close()


async def test_upstream_stall_times_out(emulator: EmulatorServer, mint: Mint) -> None:
    settings = gateway_settings(emulator.url, upstream_read_timeout=0.5)
    async with running_gateway(settings):
        client = await Client.open(ws_url(settings), mint())
        frames = await client.chat("s", "[[emulator:fault=stall]] [[emulator:after=2]]")
        assert frames[-1]["code"] == "upstream_timeout"
        assert len([f for f in frames if f["type"] == "delta"]) == 2
        await client.close()


# ---------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("raw", "code"),
    [
        ("{not json", "invalid_message"),
        ("[1, 2]", "invalid_message"),
        ('{"type": "teleport"}', "unknown_type"),
        ('{"type": "chat", "id": "x"}', "invalid_message"),
        (
            '{"type": "chat", "id": "x", "messages": [{"role": "assistant", "content": "hi"}]}',
            "invalid_message",
        ),
        (
            '{"type": "chat", "id": "x", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}',
            "invalid_message",
        ),
        (
            '{"type": "chat", "id": "x", "messages": [{"role": "user", "content": "hi"}], "model": "gpt-5"}',
            "model_not_allowed",
        ),
        (
            '{"type": "chat", "id": "x", "messages": [{"role": "user", "content": "hi"}], "temperature": 7}',
            "invalid_message",
        ),
    ],
)
async def test_bad_messages_get_error_frames_and_keep_the_connection(
    gateway: Settings, mint: Mint, raw: str, code: str
) -> None:
    client = await Client.open(ws_url(gateway), mint())
    await client.send(raw)
    frame = await client.recv()
    assert frame["type"] == "error" and frame["code"] == code
    frames = await client.chat("after", "still here? [[emulator:tokens=3]]")
    assert frames[-1]["type"] == "end"
    await client.close()


async def test_model_outside_allowlist(gateway: Settings, mint: Mint) -> None:
    client = await Client.open(ws_url(gateway), mint("globex"))
    frames = await client.chat("m", "hi", model=HAIKU)
    assert frames == [
        {"type": "error", "id": "m", "code": "model_not_allowed", "message": frames[0]["message"]}
    ]
    await client.close()


async def test_binary_frame_is_refused_with_error(gateway: Settings, mint: Mint) -> None:
    client = await Client.open(ws_url(gateway), mint())
    await client.ws.send(b"\x00\x01binary")
    frame = await client.recv()
    assert frame["type"] == "error" and frame["code"] == "invalid_message"
    await client.close()


async def test_a_binary_frame_is_never_a_first_message_auth(gateway: Settings, mint: Mint) -> None:
    client = await Client.open(ws_url(gateway))  # no credentials: the first message must be `auth`
    await client.ws.send(json.dumps({"type": "auth", "token": mint()}).encode())
    code, _ = await client.wait_closed()
    assert code == 4401


async def test_duplicate_id_while_streaming(gateway: Settings, mint: Mint) -> None:
    client = await Client.open(ws_url(gateway), mint())
    slow = {
        "type": "chat",
        "id": "same",
        "messages": [{"role": "user", "content": "[[emulator:tokens=50]] [[emulator:token_delay_ms=20]]"}],
    }
    await client.send(slow)
    await client.send(slow)
    codes = []
    frames = await client.until_terminal("same")
    codes = [f.get("code") for f in frames if f["type"] == "error"]
    assert "duplicate_id" in codes
    await client.close()


async def test_per_connection_stream_cap(gateway: Settings, mint: Mint) -> None:
    client = await Client.open(ws_url(gateway), mint())
    for i in range(5):
        await client.send(
            {
                "type": "chat",
                "id": f"s{i}",
                "messages": [
                    {"role": "user", "content": "[[emulator:tokens=30]] [[emulator:token_delay_ms=20]]"}
                ],
            }
        )
    frames = await client.until_terminal("s4")
    assert frames[-1]["code"] == "too_many_streams"
    for i in range(4):
        assert (await client.until_terminal(f"s{i}"))[-1]["type"] == "end"
    await client.close()


async def test_oversize_message_closes_1009(gateway: Settings, mint: Mint) -> None:
    client = await Client.open(ws_url(gateway), mint())
    huge = "x" * (gateway.max_message_bytes + 10)
    await client.send({"type": "chat", "id": "big", "messages": [{"role": "user", "content": huge}]})
    assert (await client.wait_closed())[0] == 1009


# ---------------------------------------------------------------------------- token lifetime


async def test_expiring_token_warns_then_closes_4401(emulator: EmulatorServer, mint: Mint) -> None:
    settings = gateway_settings(emulator.url, auth_expiry_warning_seconds=2.0)
    async with running_gateway(settings):
        client = await Client.open(ws_url(settings), mint(lifetime=3))
        frame = await client.recv(timeout=10)
        assert frame["type"] == "auth.expiring"
        assert (await client.wait_closed(timeout=10))[0] == 4401


async def test_refresh_extends_the_connection(emulator: EmulatorServer, mint: Mint) -> None:
    settings = gateway_settings(emulator.url, auth_expiry_warning_seconds=2.0)
    async with running_gateway(settings):
        client = await Client.open(ws_url(settings), mint(lifetime=3))
        assert (await client.recv(timeout=10))["type"] == "auth.expiring"
        await client.send({"type": "auth", "token": mint(user="mallory")})
        refused = await client.recv()
        assert refused["type"] == "error" and refused["code"] == "invalid_token"
        await client.send({"type": "auth", "token": mint(lifetime=600)})
        ok = await client.recv()
        assert ok["type"] == "auth.ok" and ok["expires_at"] > time.time() + 500
        await asyncio.sleep(3.5)  # past the first token's exp: the connection must still serve
        frames = await client.chat("after-refresh", "[[emulator:tokens=2]]")
        assert frames[-1]["type"] == "end"
        await client.close()


# ---------------------------------------------------------------------------- HTTP routes


async def test_http_routes(gateway: Settings, mint: Mint) -> None:
    base = f"http://127.0.0.1:{gateway.port}"
    async with httpx.AsyncClient() as http:
        assert (await http.get(f"{base}/healthz")).status_code == 200
        assert (await http.get(f"{base}/readyz")).status_code == 200
        assert (await http.get(f"{base}/v1/models")).status_code == 401
        models = await http.get(f"{base}/v1/models", headers={"Authorization": f"Bearer {mint('globex')}"})
        assert models.json() == {"tenant": "globex", "default_model": NOVA, "models": [{"id": NOVA}]}
        refused = await http.get(f"{base}/v1/models", headers={"Authorization": f"Bearer {mint('initech')}"})
        assert refused.status_code == 403


async def test_server_shutdown_closes_1012(emulator: EmulatorServer, mint: Mint) -> None:
    settings = gateway_settings(emulator.url)
    async with running_gateway(settings) as server:
        client = await Client.open(ws_url(settings), mint())
        server.should_exit = True
        assert (await client.wait_closed())[0] == 1012


async def test_cancel_right_after_chat_still_ends_the_request(gateway: Settings, mint: Mint) -> None:
    client = await Client.open(ws_url(gateway), mint())
    chat = {
        "type": "chat",
        "id": "quick",
        "messages": [{"role": "user", "content": "[[emulator:tokens=50]]"}],
    }
    # Both messages in one TCP write: the server reads the cancel before the request's task has run.
    client.ws.protocol.send_text(json.dumps(chat).encode())
    client.ws.protocol.send_text(json.dumps({"type": "cancel", "id": "quick"}).encode())
    client.ws.send_data()
    frames = await client.until_terminal("quick")
    assert frames[-1]["type"] == "end" and frames[-1]["stop_reason"] == "cancelled"
    # The id is free again and the connection's slots are not leaked.
    for i in range(gateway.max_streams_per_connection + 1):
        assert (await client.chat(f"again-{i}", "[[emulator:tokens=1]]"))[-1]["type"] == "end"
    frames = await client.chat("quick", "[[emulator:tokens=1]]")
    assert frames[-1]["type"] == "end"
    await client.close()


async def test_a_finished_request_frees_its_slot_before_the_next_one_arrives(
    gateway: Settings, mint: Mint
) -> None:
    client = await Client.open(ws_url(gateway), mint())
    lanes = gateway.max_streams_per_connection
    rounds = 15
    sent = dict.fromkeys(range(lanes), 0)

    async def send_next(lane: int) -> None:
        sent[lane] += 1
        await client.send(
            {
                "type": "chat",
                "id": f"{lane}-{sent[lane]}",
                "messages": [{"role": "user", "content": "[[emulator:tokens=2]]"}],
            }
        )

    for lane in range(lanes):
        await send_next(lane)
    outcomes: list[str] = []
    async with asyncio.timeout(60):
        while len(outcomes) < lanes * rounds:
            frame = await client.next_frame()
            if frame.get("type") in ("end", "error"):
                outcomes.append(frame.get("code", frame["type"]))
                lane = int(frame["id"].split("-")[0])
                if sent[lane] < rounds:
                    await send_next(lane)  # at once: the slot must already be free
    assert outcomes == ["end"] * (lanes * rounds)
    await client.close()
