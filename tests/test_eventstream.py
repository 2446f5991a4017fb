"""The event-stream decoder, checked against the emulator's encoder and botocore's own parser."""

from __future__ import annotations

import itertools
import struct
import uuid

import pytest
from botocore.eventstream import EventStreamBuffer
from hypothesis import given, settings
from hypothesis import strategies as st

from hubgate.emulator.eventstream import (
    ConverseStreamRenderer,
    StreamSummary,
    crc32,
    encode_header,
    encode_message,
    event_message,
    exception_message,
)
from hubgate.providers.eventstream import (
    MAX_HEADERS_LENGTH,
    MAX_MESSAGE_LENGTH,
    MAX_PAYLOAD_LENGTH,
    EventStreamError,
    HeaderValue,
    Message,
    MessageDecoder,
)

# Header types the emulator's encoder does not write: byte, short, timestamp, uuid.
_TYPE_BYTE = 2
_TYPE_SHORT = 3
_TYPE_TIMESTAMP = 8
_TYPE_UUID = 9


def frame(raw_headers: bytes, payload: bytes) -> bytes:
    """A message around an already-encoded header block, with correct checksums."""
    total = 12 + len(raw_headers) + len(payload) + 4
    prelude = struct.pack("!II", total, len(raw_headers))
    body = prelude + struct.pack("!I", crc32(prelude)) + raw_headers + payload
    return body + struct.pack("!I", crc32(body))


def typed_header(name: str, value_type: int, value: bytes) -> bytes:
    """A header with its type tag and already-encoded value, for types ``encode_header`` lacks."""
    raw_name = name.encode()
    return bytes((len(raw_name),)) + raw_name + bytes((value_type,)) + value


def prelude_only(total: int, headers_length: int) -> bytes:
    """Twelve bytes announcing a message, with a correct prelude checksum."""
    prelude = struct.pack("!II", total, headers_length)
    return prelude + struct.pack("!I", crc32(prelude))


def botocore_messages(stream: bytes) -> list[Message]:
    buffer = EventStreamBuffer()
    buffer.add_data(stream)
    return [Message(message.headers, message.payload) for message in buffer]


def decode_in_chunks(stream: bytes, cuts: list[int]) -> list[Message]:
    decoder = MessageDecoder()
    messages: list[Message] = []
    bounds = [0, *sorted(cuts), len(stream)]
    for start, end in itertools.pairwise(bounds):
        messages.extend(decoder.feed(stream[start:end]))
    return messages


def conversation() -> bytes:
    """A whole ConverseStream reply as the emulator renders it."""
    renderer = ConverseStreamRenderer()
    summary = StreamSummary(
        stop_reason="end_turn",
        stop_sequence=None,
        input_tokens=7,
        output_tokens=3,
        latency_ms=120,
        first_byte_latency_ms=40,
    )
    return b"".join((renderer.start(), renderer.delta("Hel"), renderer.delta("lo"), renderer.finish(summary)))


def test_single_message() -> None:
    raw = event_message("contentBlockDelta", {"contentBlockIndex": 0, "delta": {"text": "Hi"}})

    messages = MessageDecoder().feed(raw)

    assert messages == [
        Message(
            {
                ":event-type": "contentBlockDelta",
                ":content-type": "application/json",
                ":message-type": "event",
            },
            b'{"contentBlockIndex":0,"delta":{"text":"Hi"}}',
        )
    ]
    assert type(messages[0].payload) is bytes
    assert messages == botocore_messages(raw)


def test_many_messages_in_one_chunk() -> None:
    stream = conversation()

    messages = MessageDecoder().feed(stream)

    assert [m.headers[":event-type"] for m in messages] == [
        "messageStart",
        "contentBlockDelta",
        "contentBlockDelta",
        "contentBlockStop",
        "messageStop",
        "metadata",
    ]
    assert messages == botocore_messages(stream)


def test_exception_message() -> None:
    raw = exception_message("throttlingException", "slow down")

    (message,) = MessageDecoder().feed(raw)

    assert message.headers[":message-type"] == "exception"
    assert message.headers[":exception-type"] == "throttlingException"
    assert message.payload == b'{"message":"slow down"}'


def test_one_byte_at_a_time() -> None:
    stream = conversation()
    decoder = MessageDecoder()
    arrivals: list[tuple[int, Message]] = []

    for index in range(len(stream)):
        for message in decoder.feed(stream[index : index + 1]):
            arrivals.append((index + 1, message))

    assert [message for _, message in arrivals] == botocore_messages(stream)
    # Each message comes out the moment its last byte arrives, not later.
    ends: list[int] = []
    position = 0
    while position < len(stream):
        position += struct.unpack_from("!I", stream, position)[0]
        ends.append(position)
    assert [at for at, _ in arrivals] == ends


def test_split_at_every_offset() -> None:
    stream = b"".join(
        (
            event_message("messageStart", {"role": "assistant"}),
            encode_message([(":message-type", "event"), ("flag", True)], b""),
            exception_message("modelStreamErrorException", "boom"),
        )
    )
    expected = botocore_messages(stream)
    assert len(expected) == 3

    for cut in range(len(stream) + 1):
        assert decode_in_chunks(stream, [cut]) == expected, cut


def test_split_twice_keeps_partial_tail_across_feeds() -> None:
    stream = conversation()
    expected = botocore_messages(stream)

    for first in range(0, len(stream), 7):
        for second in range(first, len(stream), 53):
            assert decode_in_chunks(stream, [first, second]) == expected


def test_every_header_type() -> None:
    message_id = uuid.UUID("12345678-1234-5678-1234-567812345678").bytes
    raw_headers = b"".join(
        (
            encode_header("true", True),
            encode_header("false", False),
            typed_header("byte", _TYPE_BYTE, struct.pack("!b", -5)),
            typed_header("short", _TYPE_SHORT, struct.pack("!h", -30000)),
            encode_header("integer", -(2**31)),
            encode_header("long", 2**40),
            encode_header("bytes", b"\x00\xff"),
            encode_header("string", "h\u00e9llo"),
            typed_header("timestamp", _TYPE_TIMESTAMP, struct.pack("!q", 1_700_000_000_123)),
            typed_header("uuid", _TYPE_UUID, message_id),
            encode_header("empty", ""),
        )
    )
    raw = frame(raw_headers, b"{}")

    (message,) = MessageDecoder().feed(raw)

    assert message.headers == {
        "true": True,
        "false": False,
        "byte": -5,
        "short": -30000,
        "integer": -(2**31),
        "long": 2**40,
        "bytes": b"\x00\xff",
        "string": "h\u00e9llo",
        "timestamp": 1_700_000_000_123,
        "uuid": message_id,
        "empty": "",
    }
    assert [type(value) for value in message.headers.values()] == [
        bool,
        bool,
        int,
        int,
        int,
        int,
        bytes,
        str,
        int,
        bytes,
        str,
    ]
    assert [message] == botocore_messages(raw)


def test_empty_payload_and_no_headers() -> None:
    raw = encode_message([], b"")
    assert len(raw) == 16

    assert MessageDecoder().feed(raw) == [Message({}, b"")]
    assert botocore_messages(raw) == [Message({}, b"")]


def test_partial_input_returns_nothing_until_complete() -> None:
    raw = event_message("messageStop", {"stopReason": "end_turn"})
    decoder = MessageDecoder()

    assert decoder.feed(b"") == []
    assert decoder.feed(raw[:5]) == []
    assert decoder.feed(raw[5:-1]) == []
    assert decoder.feed(raw[-1:]) == botocore_messages(raw)
    assert decoder.feed(b"") == []


def test_accepts_bytearray_and_memoryview_chunks() -> None:
    raw = event_message("messageStart", {"role": "assistant"})
    decoder = MessageDecoder()

    (first,) = decoder.feed(bytearray(raw))
    (second,) = decoder.feed(memoryview(raw))  # type: ignore[arg-type]

    assert first == second == botocore_messages(raw)[0]
    assert type(first.payload) is bytes
    assert type(second.payload) is bytes


def test_repeated_headers_are_independent_copies() -> None:
    raw = event_message("contentBlockDelta", {"contentBlockIndex": 0, "delta": {"text": "a"}})
    decoder = MessageDecoder()

    seen = []
    for _ in range(3):
        (message,) = decoder.feed(raw)
        seen.append(message.headers[":event-type"])
        message.headers[":event-type"] = "changed"
        message.headers["added"] = True

    assert seen == ["contentBlockDelta"] * 3


def test_many_distinct_header_blocks() -> None:
    stream = b"".join(encode_message([("n", index)], b"x") for index in range(100))

    messages = MessageDecoder().feed(stream)

    assert [m.headers["n"] for m in messages] == list(range(100))
    assert messages == botocore_messages(stream)


def corrupt(raw: bytes, index: int) -> bytes:
    return raw[:index] + bytes((raw[index] ^ 0x01,)) + raw[index + 1 :]


def assert_rejected(raw: bytes, match: str) -> None:
    with pytest.raises(EventStreamError, match=match):
        MessageDecoder().feed(raw)


def test_corrupt_prelude_crc() -> None:
    raw = event_message("messageStart", {"role": "assistant"})

    assert_rejected(corrupt(raw, 9), "prelude checksum")
    # A flipped length bit is caught by the same checksum.
    assert_rejected(corrupt(raw, 3), "prelude checksum")


def test_corrupt_message_crc() -> None:
    raw = event_message("messageStart", {"role": "assistant"})

    assert_rejected(corrupt(raw, len(raw) - 1), "message checksum")
    assert_rejected(corrupt(raw, len(raw) - 10), "message checksum")  # payload byte
    assert_rejected(corrupt(raw, 20), "message checksum")  # header byte


def test_total_length_too_small() -> None:
    assert_rejected(prelude_only(15, 0), "total length 15")
    assert_rejected(prelude_only(0, 0), "total length 0")


def test_headers_length_larger_than_message() -> None:
    assert_rejected(prelude_only(20, 5), "does not fit")
    # Too long for any message, whatever the total says.
    assert_rejected(prelude_only(MAX_MESSAGE_LENGTH, MAX_HEADERS_LENGTH + 1), "exceeds 131072")


def test_oversized_total_length_is_refused_from_the_prelude_alone() -> None:
    decoder = MessageDecoder()

    with pytest.raises(EventStreamError, match="payload length"):
        decoder.feed(prelude_only(MAX_MESSAGE_LENGTH + 1, 0))
    assert_rejected(prelude_only(0xFFFFFFFF, MAX_HEADERS_LENGTH), "payload length")


def test_largest_lengths_are_accepted_as_pending() -> None:
    decoder = MessageDecoder()

    assert decoder.feed(prelude_only(MAX_MESSAGE_LENGTH, MAX_HEADERS_LENGTH)) == []
    assert MAX_MESSAGE_LENGTH == 16 + MAX_HEADERS_LENGTH + MAX_PAYLOAD_LENGTH


def test_unknown_header_type() -> None:
    assert_rejected(frame(typed_header("odd", 10, b""), b"{}"), "unknown value type 10")


@pytest.mark.parametrize(
    "raw_headers",
    [
        pytest.param(b"\x05ab", id="name past end"),
        pytest.param(b"\x03abc", id="no type byte"),
        pytest.param(typed_header("s", 7, b"\x00"), id="string length cut"),
        pytest.param(typed_header("s", 7, b"\x00\x05abc"), id="string value cut"),
        pytest.param(typed_header("b", 6, b"\x00\x02a"), id="bytes value cut"),
        pytest.param(typed_header("i", 4, b"\x00\x00\x01"), id="integer cut"),
        pytest.param(typed_header("t", _TYPE_TIMESTAMP, b"\x00" * 7), id="timestamp cut"),
        pytest.param(typed_header("u", _TYPE_UUID, b"\x00" * 15), id="uuid cut"),
    ],
)
def test_truncated_header(raw_headers: bytes) -> None:
    # The payload after the headers must not be read as the rest of a header.
    assert_rejected(frame(raw_headers, b"payload bytes"), "truncated")


def test_duplicate_header() -> None:
    raw = frame(encode_header("a", "x") + encode_header("a", "y"), b"")

    assert_rejected(raw, "duplicate header 'a'")


def test_invalid_utf8_in_header() -> None:
    assert_rejected(frame(typed_header("s", 7, b"\x00\x01\xff"), b""), "UTF-8")
    assert_rejected(frame(b"\x01\xff\x00", b""), "UTF-8")


def test_decoder_stays_failed_after_an_error() -> None:
    good = event_message("messageStart", {"role": "assistant"})
    decoder = MessageDecoder()

    with pytest.raises(EventStreamError, match="message checksum"):
        decoder.feed(good + corrupt(good, len(good) - 1))
    with pytest.raises(EventStreamError, match="already failed") as excinfo:
        decoder.feed(good)
    assert isinstance(excinfo.value.__cause__, EventStreamError)


def test_error_in_a_later_chunk_after_good_messages() -> None:
    good = event_message("messageStart", {"role": "assistant"})
    decoder = MessageDecoder()

    assert decoder.feed(good + good[:10]) == botocore_messages(good)
    with pytest.raises(EventStreamError, match="message checksum"):
        decoder.feed(corrupt(good, len(good) - 2)[10:])


_NAMES = st.text(min_size=1, max_size=12).filter(lambda name: len(name.encode()) <= 255)
_ENCODABLE_VALUES: st.SearchStrategy[HeaderValue] = st.one_of(
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.binary(max_size=40),
    st.text(max_size=40),
)


@st.composite
def encoder_messages(draw: st.DrawFn) -> bytes:
    """A message written by the emulator's encoder."""
    names = draw(st.lists(_NAMES, max_size=5, unique=True))
    headers = [(name, draw(_ENCODABLE_VALUES)) for name in names]
    return encode_message(headers, draw(st.binary(max_size=300)))


@st.composite
def typed_messages(draw: st.DrawFn) -> bytes:
    """A message with headers of any type, including those the encoder does not write."""
    names = draw(st.lists(_NAMES, max_size=5, unique=True))
    raw_headers = b""
    for name in names:
        value_type = draw(st.integers(min_value=0, max_value=9))
        if value_type in (0, 1):
            value = b""
        elif value_type in (6, 7):
            text = st.text(max_size=30).map(str.encode)
            encoded = draw(text if value_type == 7 else st.binary(max_size=30))
            value = struct.pack("!H", len(encoded)) + encoded
        else:
            width = {2: 1, 3: 2, 4: 4, 5: 8, 8: 8, 9: 16}[value_type]
            value = draw(st.binary(min_size=width, max_size=width))
        raw_headers += typed_header(name, value_type, value)
    return frame(raw_headers, draw(st.binary(max_size=300)))


@settings(max_examples=300, deadline=None)
@given(
    raws=st.lists(st.one_of(encoder_messages(), typed_messages()), min_size=1, max_size=8),
    data=st.data(),
)
def test_random_chunking_matches_botocore(raws: list[bytes], data: st.DataObject) -> None:
    stream = b"".join(raws)
    cuts = data.draw(st.lists(st.integers(min_value=0, max_value=len(stream)), max_size=12))

    messages = decode_in_chunks(stream, cuts)

    assert messages == botocore_messages(stream)
    assert len(messages) == len(raws)
