"""Encoder for ``application/vnd.amazon.eventstream`` and the Bedrock runtime events built on it.

No I/O: every function here turns values into bytes.

Wire format of one message (all integers big-endian), as decoded by ``botocore.eventstream``::

    [total length: u32][headers length: u32][prelude CRC-32: u32]
    [headers ...][payload ...]
    [message CRC-32: u32]

The prelude CRC covers the first 8 bytes; the message CRC covers everything before it,
prelude CRC included. Each header is ``[name length: u8][name][type: u8][value]``; a string
(type 7) or byte array (type 6) value is ``[length: u16][bytes]``.

The second half of the module renders the two streaming operations the emulator serves:
ConverseStream (``ConverseStreamOutput`` in the bedrock-runtime service model) and
InvokeModelWithResponseStream with an Anthropic messages body (``ResponseStream`` chunks whose
``bytes`` carry Anthropic's own streaming events).
"""

from __future__ import annotations

import base64
import binascii
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final, Protocol

import orjson

HeaderValue = str | bytes | bool | int
"""A header value: ``str`` is type 7, ``bytes`` type 6, ``bool`` types 0/1, ``int`` type 4 or 5."""

# botocore refuses anything larger (botocore/eventstream.py _MAX_HEADERS_LENGTH, _MAX_PAYLOAD_LENGTH).
MAX_HEADERS_LENGTH: Final = 128 * 1024
MAX_PAYLOAD_LENGTH: Final = 24 * 1024 * 1024

_PRELUDE = struct.Struct("!II")
_CRC = struct.Struct("!I")
_TYPE_TRUE: Final = 0
_TYPE_FALSE: Final = 1
_TYPE_INT32: Final = 4
_TYPE_INT64: Final = 5
_TYPE_BYTES: Final = 6
_TYPE_STRING: Final = 7
_INT32_MIN: Final = -(2**31)
_INT32_MAX: Final = 2**31 - 1
_PRELUDE_LENGTH: Final = 12
_MESSAGE_CRC_LENGTH: Final = 4

JSON_CONTENT_TYPE: Final = "application/json"


def crc32(data: bytes, value: int = 0) -> int:
    """CRC-32 as the event-stream format uses it, always as an unsigned 32-bit value."""
    return binascii.crc32(data, value) & 0xFFFFFFFF


def encode_header(name: str, value: HeaderValue) -> bytes:
    """One header: name, type tag and value."""
    raw_name = name.encode("utf-8")
    if not 1 <= len(raw_name) <= 255:
        raise ValueError(f"header name must be 1 to 255 bytes, got {len(raw_name)}")
    prefix = bytes((len(raw_name),)) + raw_name
    # bool before int: bool is a subclass of int.
    if isinstance(value, bool):
        return prefix + bytes((_TYPE_TRUE if value else _TYPE_FALSE,))
    if isinstance(value, int):
        if _INT32_MIN <= value <= _INT32_MAX:
            return prefix + bytes((_TYPE_INT32,)) + struct.pack("!i", value)
        return prefix + bytes((_TYPE_INT64,)) + struct.pack("!q", value)
    if isinstance(value, str):
        type_tag, raw = _TYPE_STRING, value.encode("utf-8")
    else:
        type_tag, raw = _TYPE_BYTES, bytes(value)
    if len(raw) > 0xFFFF:
        raise ValueError(f"header {name!r} value is {len(raw)} bytes; the length field holds at most 65535")
    return prefix + bytes((type_tag,)) + struct.pack("!H", len(raw)) + raw


def encode_headers(headers: Sequence[tuple[str, HeaderValue]]) -> bytes:
    """The headers section, in the order given (the decoder rejects duplicate names)."""
    names = [name for name, _ in headers]
    if len(set(names)) != len(names):
        raise ValueError(f"duplicate header names in {names}")
    return b"".join(encode_header(name, value) for name, value in headers)


def encode_message(headers: Sequence[tuple[str, HeaderValue]], payload: bytes) -> bytes:
    """One complete event-stream message: prelude, prelude CRC, headers, payload, message CRC."""
    raw_headers = encode_headers(headers)
    if len(raw_headers) > MAX_HEADERS_LENGTH:
        raise ValueError(f"headers are {len(raw_headers)} bytes; the limit is {MAX_HEADERS_LENGTH}")
    if len(payload) > MAX_PAYLOAD_LENGTH:
        raise ValueError(f"payload is {len(payload)} bytes; the limit is {MAX_PAYLOAD_LENGTH}")
    total = _PRELUDE_LENGTH + len(raw_headers) + len(payload) + _MESSAGE_CRC_LENGTH
    prelude = _PRELUDE.pack(total, len(raw_headers))
    prelude_crc = _CRC.pack(crc32(prelude))
    message_crc = crc32(payload, crc32(raw_headers, crc32(prelude_crc, crc32(prelude))))
    return b"".join((prelude, prelude_crc, raw_headers, payload, _CRC.pack(message_crc)))


def event_message(event_type: str, payload: object) -> bytes:
    """An ``event`` message carrying ``payload`` as JSON, as botocore's rest-json event parser expects."""
    headers: list[tuple[str, HeaderValue]] = [
        (":event-type", event_type),
        (":content-type", JSON_CONTENT_TYPE),
        (":message-type", "event"),
    ]
    return encode_message(headers, orjson.dumps(payload))


def exception_message(exception_type: str, message: str) -> bytes:
    """An in-stream ``exception`` message; botocore raises it as ``EventStreamError``.

    ``exception_type`` is the member name in the output union (``throttlingException``, ...),
    which botocore reports as the error code.
    """
    headers: list[tuple[str, HeaderValue]] = [
        (":exception-type", exception_type),
        (":content-type", JSON_CONTENT_TYPE),
        (":message-type", "exception"),
    ]
    return encode_message(headers, orjson.dumps({"message": message}))


@dataclass(frozen=True, slots=True)
class StreamSummary:
    """What the closing events report about a finished reply."""

    stop_reason: str
    stop_sequence: str | None
    input_tokens: int
    output_tokens: int
    latency_ms: int
    first_byte_latency_ms: int
    guardrail_trace: object | None = None


class ConverseStreamRenderer:
    """Events of one ConverseStream reply with a single text content block (index 0).

    Bedrock sends no ``contentBlockStart`` for a text block, only for tool use, so neither do we.
    """

    def start(self) -> bytes:
        return event_message("messageStart", {"role": "assistant"})

    def delta(self, token: str) -> bytes:
        return event_message("contentBlockDelta", {"contentBlockIndex": 0, "delta": {"text": token}})

    def finish(self, summary: StreamSummary) -> bytes:
        metadata: dict[str, object] = {
            "usage": {
                "inputTokens": summary.input_tokens,
                "outputTokens": summary.output_tokens,
                "totalTokens": summary.input_tokens + summary.output_tokens,
            },
            "metrics": {"latencyMs": summary.latency_ms},
        }
        if summary.guardrail_trace is not None:
            metadata["trace"] = {"guardrail": summary.guardrail_trace}
        return b"".join(
            (
                event_message("contentBlockStop", {"contentBlockIndex": 0}),
                event_message("messageStop", {"stopReason": summary.stop_reason}),
                event_message("metadata", metadata),
            )
        )


def anthropic_chunk(event: object) -> bytes:
    """A ``chunk`` event: Bedrock wraps each Anthropic streaming event as base64 JSON in ``bytes``."""
    encoded = base64.b64encode(orjson.dumps(event)).decode("ascii")
    return event_message("chunk", {"bytes": encoded})


class AnthropicStreamRenderer:
    """Chunks of one InvokeModelWithResponseStream reply in Anthropic's messages streaming shape."""

    def __init__(self, message_id: str, model: str, input_tokens: int) -> None:
        self.message_id = message_id
        self.model = model
        self.input_tokens = input_tokens

    def start(self) -> bytes:
        message: dict[str, object] = {
            "id": self.message_id,
            "type": "message",
            "role": "assistant",
            "model": self.model,
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            # The running output count starts at 0; the final count is in message_delta.
            "usage": {"input_tokens": self.input_tokens, "output_tokens": 0},
        }
        return anthropic_chunk({"type": "message_start", "message": message}) + anthropic_chunk(
            {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}
        )

    def delta(self, token: str) -> bytes:
        return anthropic_chunk(
            {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": token}}
        )

    def finish(self, summary: StreamSummary) -> bytes:
        metrics = {
            "inputTokenCount": summary.input_tokens,
            "outputTokenCount": summary.output_tokens,
            "invocationLatency": summary.latency_ms,
            "firstByteLatency": summary.first_byte_latency_ms,
        }
        return b"".join(
            (
                anthropic_chunk({"type": "content_block_stop", "index": 0}),
                anthropic_chunk(
                    {
                        "type": "message_delta",
                        "delta": {"stop_reason": summary.stop_reason, "stop_sequence": summary.stop_sequence},
                        "usage": {"output_tokens": summary.output_tokens},
                    }
                ),
                anthropic_chunk({"type": "message_stop", "amazon-bedrock-invocationMetrics": metrics}),
            )
        )


class StreamRenderer(Protocol):
    """What the emulator needs to render one streamed reply, whatever the operation."""

    def start(self) -> bytes: ...

    def delta(self, token: str) -> bytes: ...

    def finish(self, summary: StreamSummary) -> bytes: ...
