"""The event-stream encoder, checked against botocore's own decoder and response parser."""

from __future__ import annotations

import base64
import json
import struct
import zlib
from typing import Any

import botocore.session
import pytest
from botocore.eventstream import ChecksumMismatch, EventStreamBuffer, EventStreamMessage
from botocore.parsers import EventStreamJSONParser

from hubgate.emulator.eventstream import (
    MAX_PAYLOAD_LENGTH,
    AnthropicStreamRenderer,
    ConverseStreamRenderer,
    StreamSummary,
    encode_header,
    encode_message,
    event_message,
    exception_message,
)


def decode(data: bytes, chunk_size: int | None = None) -> list[EventStreamMessage]:
    """Every message in ``data``, fed to botocore's buffer in pieces as a socket would."""
    buffer = EventStreamBuffer()
    messages: list[EventStreamMessage] = []
    step = chunk_size or len(data) or 1
    for start in range(0, len(data), step):
        buffer.add_data(data[start : start + step])
        messages.extend(buffer)
    return messages


@pytest.fixture(scope="module")
def service_model() -> Any:
    return botocore.session.get_session().get_service_model("bedrock-runtime")


def parse(service_model: Any, operation: str, data: bytes) -> list[dict[str, Any]]:
    """Parse messages exactly as botocore's EventStream does for ``operation``'s output stream."""
    output = service_model.operation_model(operation).output_shape
    stream_shape = output.members[output.serialization["payload"]]
    parser = EventStreamJSONParser()
    return [parser.parse(message.to_response_dict(), stream_shape) for message in decode(data)]


def test_message_round_trips_through_botocore_with_both_crcs() -> None:
    headers = [
        (":event-type", "contentBlockDelta"),
        ("raw", b"\x00\x01\xff"),
        ("yes", True),
        ("no", False),
        ("small", -7),
        ("large", 2**40),
    ]
    payload = b'{"hello":"world"}'
    data = encode_message(headers, payload)

    (message,) = decode(data)
    assert message.headers == {
        ":event-type": "contentBlockDelta",
        "raw": b"\x00\x01\xff",
        "yes": True,
        "no": False,
        "small": -7,
        "large": 2**40,
    }
    assert message.payload == payload
    total, headers_length, prelude_crc = struct.unpack("!III", data[:12])
    assert total == len(data)
    assert message.prelude.headers_length == headers_length
    assert prelude_crc == zlib.crc32(data[:8])
    assert message.crc == zlib.crc32(data[:-4]) == struct.unpack("!I", data[-4:])[0]


def test_string_header_layout_is_type_7_with_u16_length() -> None:
    assert encode_header(":message-type", "event") == b"\x0d:message-type\x07\x00\x05event"


def test_messages_decode_when_split_at_every_byte() -> None:
    data = b"".join(event_message("chunk", {"n": n}) for n in range(5)) + encode_message([], b"")
    messages = decode(data, chunk_size=1)
    assert [json.loads(m.payload) for m in messages[:5]] == [{"n": n} for n in range(5)]
    assert messages[5].headers == {} and messages[5].payload == b""


def test_a_flipped_bit_fails_botocores_checksum() -> None:
    data = bytearray(event_message("messageStart", {"role": "assistant"}))
    data[20] ^= 0x01
    with pytest.raises(ChecksumMismatch):
        decode(bytes(data))


def test_utf8_text_is_counted_in_bytes() -> None:
    (message,) = decode(event_message("contentBlockDelta", {"delta": {"text": " żółw 🐢"}}))
    assert json.loads(message.payload) == {"delta": {"text": " żółw 🐢"}}


@pytest.mark.parametrize(
    ("headers", "payload"),
    [
        ([("a", "x"), ("a", "y")], b""),
        ([("", "x")], b""),
        ([("n" * 256, "x")], b""),
        ([("a", "x" * 70_000)], b""),
        ([], b"x" * (MAX_PAYLOAD_LENGTH + 1)),
    ],
    ids=["duplicate", "empty-name", "long-name", "long-value", "huge-payload"],
)
def test_encoder_refuses_what_the_decoder_cannot_read(headers: list[Any], payload: bytes) -> None:
    with pytest.raises(ValueError):
        encode_message(headers, payload)


def test_event_message_headers() -> None:
    (message,) = decode(event_message("messageStop", {"stopReason": "end_turn"}))
    assert message.headers == {
        ":event-type": "messageStop",
        ":content-type": "application/json",
        ":message-type": "event",
    }


def test_converse_events_parse_against_the_service_model(service_model: Any) -> None:
    renderer = ConverseStreamRenderer()
    summary = StreamSummary(
        "max_tokens", None, input_tokens=7, output_tokens=2, latency_ms=12, first_byte_latency_ms=3
    )
    data = renderer.start() + renderer.delta("alpha") + renderer.delta(" beta") + renderer.finish(summary)
    assert parse(service_model, "ConverseStream", data) == [
        {"messageStart": {"role": "assistant"}},
        {"contentBlockDelta": {"delta": {"text": "alpha"}, "contentBlockIndex": 0}},
        {"contentBlockDelta": {"delta": {"text": " beta"}, "contentBlockIndex": 0}},
        {"contentBlockStop": {"contentBlockIndex": 0}},
        {"messageStop": {"stopReason": "max_tokens"}},
        {
            "metadata": {
                "usage": {"inputTokens": 7, "outputTokens": 2, "totalTokens": 9},
                "metrics": {"latencyMs": 12},
            }
        },
    ]


def test_converse_metadata_carries_a_guardrail_trace(service_model: Any) -> None:
    trace = {"actionReason": "Guardrail blocked.", "modelOutput": ["a b"]}
    summary = StreamSummary("guardrail_intervened", None, 1, 2, 5, 1, guardrail_trace=trace)
    *_, metadata = parse(service_model, "ConverseStream", ConverseStreamRenderer().finish(summary))
    assert metadata["metadata"]["trace"] == {"guardrail": trace}


@pytest.mark.parametrize("operation", ["ConverseStream", "InvokeModelWithResponseStream"])
@pytest.mark.parametrize(
    "exception_type",
    [
        "throttlingException",
        "modelStreamErrorException",
        "validationException",
        "serviceUnavailableException",
    ],
)
def test_exception_message_is_an_error_botocore_can_name(
    service_model: Any, operation: str, exception_type: str
) -> None:
    data = exception_message(exception_type, "slow down")
    (message,) = decode(data)
    assert message.headers[":message-type"] == "exception"
    assert message.to_response_dict()["status_code"] == 400
    output = service_model.operation_model(operation).output_shape
    stream_shape = output.members[output.serialization["payload"]]
    assert exception_type in stream_shape.members
    parsed = EventStreamJSONParser().parse(message.to_response_dict(), stream_shape)
    assert parsed["Error"] == {"Code": exception_type, "Message": "slow down"}


def test_anthropic_chunks_wrap_base64_json(service_model: Any) -> None:
    renderer = AnthropicStreamRenderer("msg_bdrk_1", "anthropic.claude-3-haiku-20240307-v1:0", input_tokens=4)
    summary = StreamSummary("stop_sequence", "END", 4, 1, latency_ms=30, first_byte_latency_ms=10)
    data = renderer.start() + renderer.delta("hi") + renderer.finish(summary)
    parsed = parse(service_model, "InvokeModelWithResponseStream", data)
    assert all(set(event) == {"chunk"} for event in parsed)
    events = [json.loads(event["chunk"]["bytes"]) for event in parsed]
    assert [e["type"] for e in events] == [
        "message_start",
        "content_block_start",
        "content_block_delta",
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    assert events[0]["message"]["usage"] == {"input_tokens": 4, "output_tokens": 0}
    assert events[0]["message"]["role"] == "assistant" and events[0]["message"]["id"] == "msg_bdrk_1"
    assert events[1]["content_block"] == {"type": "text", "text": ""}
    assert events[2]["delta"] == {"type": "text_delta", "text": "hi"}
    assert events[4]["delta"] == {"stop_reason": "stop_sequence", "stop_sequence": "END"}
    assert events[4]["usage"] == {"output_tokens": 1}
    assert events[5]["amazon-bedrock-invocationMetrics"] == {
        "inputTokenCount": 4,
        "outputTokenCount": 1,
        "invocationLatency": 30,
        "firstByteLatency": 10,
    }
    # The JSON payload of a chunk event really is {"bytes": "<base64>"} on the wire.
    raw = json.loads(decode(renderer.delta("x"))[0].payload)
    assert json.loads(base64.b64decode(raw["bytes"]))["delta"]["text"] == "x"
