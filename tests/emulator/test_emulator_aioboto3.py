"""The emulator as a real server, driven by the unmodified aioboto3 bedrock-runtime client."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from botocore.exceptions import ClientError, EventStreamError

from hubgate.emulator import EmulatorConfig, expected_reply
from hubgate.emulator import app as emulator_app
from hubgate.emulator.app import Recorder, RequestRecord
from hubgate.emulator.script import Operation
from tests.emulator.conftest import ACCESS_KEY_ID, NO_RETRIES, bedrock_session
from tests.support.emulator_server import EmulatorServer

HAIKU = "anthropic.claude-3-5-haiku-20241022-v1:0"
PROFILE_ARN = (
    "arn:aws:bedrock:us-east-1:123456789012:inference-profile/us.anthropic.claude-3-5-haiku-20241022-v1:0"
)


def converse_body(text: str, **extra: Any) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": [{"text": text}]}], **extra}


def anthropic_body(text: str, max_tokens: int = 500) -> dict[str, Any]:
    return {
        "anthropic_version": "bedrock-2023-05-31",
        "max_tokens": max_tokens,
        "system": "Be brief.",
        "messages": [{"role": "user", "content": text}],
    }


async def converse(client: Any, text: str, model_id: str = HAIKU, **extra: Any) -> Any:
    return await client.converse_stream(modelId=model_id, **converse_body(text, **extra))


async def events_of(stream: AsyncIterator[dict[str, Any]]) -> list[dict[str, Any]]:
    return [event async for event in stream]


def delta_texts(events: list[dict[str, Any]]) -> list[str]:
    return [event["contentBlockDelta"]["delta"]["text"] for event in events if "contentBlockDelta" in event]


def chunk_events(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [json.loads(event["chunk"]["bytes"]) for event in events]


# Streaming replies -----------------------------------------------------------------------------


async def test_converse_stream_yields_exactly_the_expected_events(
    bedrock: Any, emulator_server: EmulatorServer
) -> None:
    extra = {"system": [{"text": "Be brief."}], "inferenceConfig": {"maxTokens": 300, "temperature": 0.5}}
    response = await converse(bedrock, "Tell me about lighthouses", **extra)
    assert response["ResponseMetadata"]["HTTPHeaders"]["content-type"] == "application/vnd.amazon.eventstream"
    events = await events_of(response["stream"])

    expected = expected_reply(HAIKU, converse_body("Tell me about lighthouses", **extra))
    deltas = [
        {"contentBlockDelta": {"delta": {"text": token}, "contentBlockIndex": 0}} for token in expected.tokens
    ]
    assert events[: len(deltas) + 4] == [
        {"messageStart": {"role": "assistant"}},
        *deltas,
        {"contentBlockStop": {"contentBlockIndex": 0}},
        {"messageStop": {"stopReason": "end_turn"}},
        {
            "metadata": {
                "usage": {
                    "inputTokens": expected.input_tokens,
                    "outputTokens": expected.output_tokens,
                    "totalTokens": expected.input_tokens + expected.output_tokens,
                },
                "metrics": {"latencyMs": events[-1]["metadata"]["metrics"]["latencyMs"]},
            }
        },
    ]
    assert len(events) == len(deltas) + 4
    assert "".join(delta_texts(events)) == expected.text
    assert expected.input_tokens == 6

    (record,) = emulator_server.requests()
    assert record["id"] == response["ResponseMetadata"]["RequestId"]
    assert record["operation"] == "converse_stream" and record["model_id"] == HAIKU
    await emulator_server.wait_for_streams(lambda s: s["completed"] == 1 and s["active"] == 0)


async def test_inference_profile_arn_model_id_is_decoded(
    bedrock: Any, emulator_server: EmulatorServer
) -> None:
    response = await converse(bedrock, "hello", model_id=PROFILE_ARN)
    events = await events_of(response["stream"])
    assert "".join(delta_texts(events)) == expected_reply(PROFILE_ARN, converse_body("hello")).text
    assert emulator_server.requests()[0]["model_id"] == PROFILE_ARN


async def test_max_tokens_stops_with_max_tokens(bedrock: Any) -> None:
    response = await converse(bedrock, "go [[emulator:tokens=30]]", inferenceConfig={"maxTokens": 5})
    events = await events_of(response["stream"])
    assert len(delta_texts(events)) == 5
    assert {"messageStop": {"stopReason": "max_tokens"}} in events
    assert events[-1]["metadata"]["usage"]["outputTokens"] == 5


async def test_reply_and_stop_sequence_directives(bedrock: Any) -> None:
    response = await converse(
        bedrock,
        "[[emulator:reply=<script>alert(1)</script> is END not shown]]",
        inferenceConfig={"stopSequences": ["END"]},
    )
    events = await events_of(response["stream"])
    assert delta_texts(events) == ["<script>alert(1)</script>", " is"]
    assert {"messageStop": {"stopReason": "stop_sequence"}} in events


async def test_guardrail_intervention_with_trace(bedrock: Any) -> None:
    text = "risky [[emulator:guardrail=intervene]] [[emulator:after=2]]"
    guardrail = {"guardrailIdentifier": "gr-test", "guardrailVersion": "1", "trace": "enabled"}
    response = await converse(bedrock, text, guardrailConfig=guardrail)
    events = await events_of(response["stream"])
    assert len(delta_texts(events)) == 2
    assert {"messageStop": {"stopReason": "guardrail_intervened"}} in events
    trace = events[-1]["metadata"]["trace"]["guardrail"]
    assert trace["modelOutput"] == ["".join(delta_texts(events))]
    assert trace["outputAssessments"]["gr-test"][0]["contentPolicy"]["filters"][0]["action"] == "BLOCKED"


async def test_invoke_with_response_stream_speaks_anthropic(
    bedrock: Any, emulator_server: EmulatorServer
) -> None:
    body = anthropic_body("Tell me about lighthouses [[emulator:tokens=12]]", max_tokens=10)
    response = await bedrock.invoke_model_with_response_stream(modelId=HAIKU, body=json.dumps(body))
    assert response["contentType"] == "application/json"
    events = await events_of(response["body"])
    assert all(set(event) == {"chunk"} for event in events)
    chunks = chunk_events(events)
    expected = expected_reply(HAIKU, body)
    assert [c["type"] for c in chunks] == [
        "message_start",
        "content_block_start",
        *["content_block_delta"] * 10,
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    assert [c["delta"]["text"] for c in chunks if c["type"] == "content_block_delta"] == expected.tokens
    assert chunks[0]["message"]["usage"]["input_tokens"] == expected.input_tokens == 7
    assert chunks[-2]["delta"]["stop_reason"] == "max_tokens"
    assert chunks[-2]["usage"] == {"output_tokens": 10}
    metrics = chunks[-1]["amazon-bedrock-invocationMetrics"]
    assert metrics["inputTokenCount"] == 7 and metrics["outputTokenCount"] == 10
    assert metrics["invocationLatency"] >= metrics["firstByteLatency"] >= 0
    assert emulator_server.requests()[0]["operation"] == "invoke_with_response_stream"


# Faults ----------------------------------------------------------------------------------------

HTTP_FAULTS = [
    ("throttling", "ThrottlingException", 429),
    ("validation", "ValidationException", 400),
    ("access_denied", "AccessDeniedException", 403),
    ("unavailable", "ServiceUnavailableException", 503),
    ("internal", "InternalServerException", 500),
    ("not_found", "ResourceNotFoundException", 404),
]


@pytest.mark.parametrize(("fault", "code", "status"), HTTP_FAULTS)
@pytest.mark.parametrize("operation", ["converse", "invoke"])
async def test_http_faults_raise_the_modelled_exception_once(
    bedrock: Any, emulator_server: EmulatorServer, operation: str, fault: str, code: str, status: int
) -> None:
    text = f"hello [[emulator:fault={fault}]]"
    with pytest.raises(ClientError) as caught:
        if operation == "converse":
            await converse(bedrock, text)
        else:
            await bedrock.invoke_model_with_response_stream(
                modelId=HAIKU, body=json.dumps(anthropic_body(text))
            )
    assert isinstance(caught.value, getattr(bedrock.exceptions, code))
    error = caught.value.response
    assert error["Error"]["Code"] == code and error["Error"]["Message"]
    assert error["ResponseMetadata"]["HTTPStatusCode"] == status
    assert error["ResponseMetadata"]["RetryAttempts"] == 0
    assert len(emulator_server.requests()) == 1


STREAM_FAULTS = [
    ("stream_throttling", "throttlingException"),
    ("stream_model_error", "modelStreamErrorException"),
    ("stream_validation", "validationException"),
    ("stream_unavailable", "serviceUnavailableException"),
]


@pytest.mark.parametrize(("fault", "code"), STREAM_FAULTS)
async def test_stream_faults_raise_event_stream_error_after_n_deltas(
    bedrock: Any, emulator_server: EmulatorServer, fault: str, code: str
) -> None:
    response = await converse(bedrock, f"hi [[emulator:fault={fault}]] [[emulator:after=4]]")
    seen: list[dict[str, Any]] = []
    with pytest.raises(EventStreamError) as caught:
        async for event in response["stream"]:
            seen.append(event)
    assert caught.value.response["Error"]["Code"] == code
    assert len(delta_texts(seen)) == 4 and len(seen) == 5
    await emulator_server.wait_for_streams(lambda s: s["faulted"] == 1 and s["active"] == 0)


async def test_stream_fault_in_invoke_with_response_stream(bedrock: Any) -> None:
    body = anthropic_body("hi [[emulator:fault=stream_model_error]]")
    response = await bedrock.invoke_model_with_response_stream(modelId=HAIKU, body=json.dumps(body))
    seen: list[dict[str, Any]] = []
    with pytest.raises(EventStreamError) as caught:
        async for event in response["body"]:
            seen.append(event)
    assert caught.value.response["Error"]["Code"] == "modelStreamErrorException"
    assert [c["type"] for c in chunk_events(seen)].count("content_block_delta") == 3


async def test_cut_ends_the_response_without_closing_events(
    bedrock: Any, emulator_server: EmulatorServer
) -> None:
    response = await converse(bedrock, "hi [[emulator:fault=cut]] [[emulator:after=2]]")
    events = await events_of(response["stream"])
    assert events[0] == {"messageStart": {"role": "assistant"}}
    assert len(delta_texts(events)) == 2 and len(events) == 3
    await emulator_server.wait_for_streams(lambda s: s["faulted"] == 1 and s["active"] == 0)


async def test_bad_directive_is_a_validation_exception(bedrock: Any) -> None:
    with pytest.raises(bedrock.exceptions.ValidationException) as caught:
        await converse(bedrock, "hi [[emulator:tokens=zero]]")
    assert "tokens" in caught.value.response["Error"]["Message"]


# Client going away -----------------------------------------------------------------------------


async def test_closing_a_stalled_stream_counts_a_client_disconnect(
    bedrock: Any, emulator_server: EmulatorServer
) -> None:
    response = await converse(bedrock, "hi [[emulator:fault=stall]] [[emulator:after=2]]")
    stream = response["stream"]
    events = aiter(stream)
    seen = [await anext(events) for _ in range(3)]
    assert len(delta_texts(seen)) == 2
    # The stream stays open and silent: nothing else arrives.
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(anext(events), timeout=0.3)
    assert (await emulator_server.wait_for_streams(lambda s: s["active"] == 1))["client_disconnected"] == 0

    stream.close()
    counters = await emulator_server.wait_for_streams(lambda s: s["client_disconnected"] == 1)
    assert counters == {"active": 0, "completed": 0, "client_disconnected": 1, "faulted": 0}


async def test_cancelling_the_reader_and_closing_the_client_counts_a_client_disconnect(
    emulator_server: EmulatorServer,
) -> None:
    first_delta = asyncio.Event()

    async def read(client: Any) -> None:
        response = await converse(client, "go [[emulator:tokens=400]] [[emulator:token_delay_ms=20]]")
        async for event in response["stream"]:
            if "contentBlockDelta" in event:
                first_delta.set()

    async with bedrock_session().client(
        "bedrock-runtime", endpoint_url=emulator_server.url, config=NO_RETRIES
    ) as client:
        reader = asyncio.create_task(read(client))
        await asyncio.wait_for(first_delta.wait(), timeout=5)
        reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await reader
    counters = await emulator_server.wait_for_streams(lambda s: s["client_disconnected"] == 1)
    assert counters["active"] == 0 and counters["completed"] == 0


# Pacing ----------------------------------------------------------------------------------------


async def test_configured_delays_pace_the_stream() -> None:
    ttft_ms, token_delay_ms, tokens = 250.0, 40.0, 5
    with EmulatorServer(config=EmulatorConfig(ttft_ms=ttft_ms, token_delay_ms=token_delay_ms)) as server:
        async with bedrock_session().client(
            "bedrock-runtime", endpoint_url=server.url, config=NO_RETRIES
        ) as client:
            started = time.monotonic()
            response = await converse(client, f"go [[emulator:tokens={tokens}]]")
            arrivals: list[float] = []
            async for event in response["stream"]:
                if "contentBlockDelta" in event:
                    arrivals.append(time.monotonic() - started)
    assert len(arrivals) == tokens
    # The server cannot send a delta before its pauses have passed; the client can only see it later.
    assert arrivals[0] >= ttft_ms / 1000
    assert arrivals[-1] >= (ttft_ms + (tokens - 1) * token_delay_ms) / 1000


async def test_delay_directives_override_per_request(bedrock: Any) -> None:
    started = time.monotonic()
    response = await converse(
        bedrock, "go [[emulator:tokens=3]] [[emulator:ttft_ms=200]] [[emulator:token_delay_ms=50]]"
    )
    arrivals: list[float] = []
    async for event in response["stream"]:
        if "contentBlockDelta" in event:
            arrivals.append(time.monotonic() - started)
    assert arrivals[0] >= 0.2 and arrivals[-1] >= 0.3


# Observation and plain HTTP --------------------------------------------------------------------


async def test_requests_record_the_signing_identity_and_reset_clears(emulator_server: EmulatorServer) -> None:
    async with bedrock_session(session_token="FwoGZXIvYXdzEXAMPLE").client(
        "bedrock-runtime", endpoint_url=emulator_server.url, config=NO_RETRIES
    ) as client:
        await events_of((await converse(client, "with a session token"))["stream"])
    async with bedrock_session().client(
        "bedrock-runtime", endpoint_url=emulator_server.url, config=NO_RETRIES
    ) as client:
        await events_of((await converse(client, "without one"))["stream"])

    first, second = emulator_server.requests()
    assert first["access_key_id"] == second["access_key_id"] == ACCESS_KEY_ID
    assert first["security_token_present"] is True and second["security_token_present"] is False
    assert first["body"] == converse_body("with a session token")
    assert first["received_at"] <= second["received_at"] and first["id"] != second["id"]
    await emulator_server.wait_for_streams(lambda s: s["completed"] == 2)

    async with httpx.AsyncClient(base_url=emulator_server.url) as http:
        assert (await http.get("/_emulator/health")).status_code == 200
        assert (await http.post("/_emulator/reset")).status_code == 200
        assert (await http.get("/_emulator/requests")).json() == []
        assert (await http.get("/_emulator/streams")).json() == {
            "active": 0,
            "completed": 0,
            "client_disconnected": 0,
            "faulted": 0,
        }


async def test_malformed_json_and_unknown_operations(emulator_server: EmulatorServer) -> None:
    async with httpx.AsyncClient(base_url=emulator_server.url) as http:
        bad = await http.post(f"/model/{HAIKU}/converse-stream", content=b"{not json")
        assert bad.status_code == 400
        assert bad.headers["x-amzn-errortype"] == "ValidationException"
        assert set(bad.json()) == {"message"}

        not_object = await http.post(f"/model/{HAIKU}/invoke-with-response-stream", content=b"[1, 2]")
        assert (
            not_object.status_code == 400 and not_object.headers["x-amzn-errortype"] == "ValidationException"
        )

        for method, path in [
            ("POST", f"/model/{HAIKU}/converse"),
            ("GET", f"/model/{HAIKU}/converse-stream"),
            ("POST", "/nowhere"),
        ]:
            unknown = await http.request(method, path)
            assert unknown.status_code == 404, path
            assert unknown.headers["x-amzn-errortype"] == "UnknownOperationException"
            assert "Traceback" not in unknown.text
    assert [r["body"] for r in emulator_server.requests()] == [None, [1, 2]]


def test_recorder_keeps_the_last_requests_and_counts_streams() -> None:
    recorder = Recorder(capacity=3)
    for n in range(5):
        recorder.record(RequestRecord(str(n), Operation.CONVERSE_STREAM, HAIKU, {}, None, False, float(n)))
    assert [r["id"] for r in recorder.requests()] == ["2", "3", "4"]
    recorder.stream_started()
    recorder.stream_started()
    recorder.reset()
    recorder.stream_ended(None)
    assert recorder.requests() == []
    assert recorder.streams() == {"active": 1, "completed": 0, "client_disconnected": 0, "faulted": 0}


async def test_an_unexpected_error_answers_without_a_traceback(monkeypatch: pytest.MonkeyPatch) -> None:
    def explode(*args: object) -> None:
        raise RuntimeError("secret internals")

    monkeypatch.setattr(emulator_app, "build_script", explode)
    transport = httpx.ASGITransport(app=emulator_app.create_app(), raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://emulator") as http:
        response = await http.post(f"/model/{HAIKU}/converse-stream", json=converse_body("hi"))
    assert response.status_code == 500
    assert response.headers["x-amzn-errortype"] == "InternalServerException"
    assert "secret" not in response.text and "Traceback" not in response.text
