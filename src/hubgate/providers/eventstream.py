"""Decoder for ``application/vnd.amazon.eventstream``, the framing of Bedrock's streaming responses.

No I/O: bytes go in, whole messages come out. It replaces botocore's ``EventStreamBuffer``, which
copies its whole buffer once per message, on a path taken once per streamed token.

Wire format of one message (all integers unsigned big-endian unless noted)::

    [total length: u32][headers length: u32][prelude CRC-32: u32]
    [headers: headers length bytes][payload ...]
    [message CRC-32: u32]

The prelude CRC covers the first 8 bytes; the message CRC covers everything before it, prelude
CRC included. Each header is ``[name length: u8][name: UTF-8][type: u8][value]``, the value by
type: 0 true and 1 false (no bytes), 2 byte (1, signed), 3 short (2, signed), 4 integer (4,
signed), 5 long (8, signed), 6 byte array and 7 string (``[length: u16][bytes]``, UTF-8 for a
string), 8 timestamp (8, signed milliseconds since the epoch, kept as an ``int``), 9 UUID (16
bytes, kept as ``bytes``). Values decode exactly as botocore decodes them.
"""

from __future__ import annotations

import struct
from typing import Final, NamedTuple
from zlib import crc32

HeaderValue = bool | int | bytes | str
"""A decoded header value: types 0/1 ``bool``; 2-5 and 8 ``int``; 6 and 9 ``bytes``; 7 ``str``."""

# The limits botocore enforces (botocore/eventstream.py _MAX_HEADERS_LENGTH, _MAX_PAYLOAD_LENGTH), so
# this decoder refuses exactly the messages the one it replaces refuses. They also bound how much a
# peer can make us buffer: a prelude announcing more is refused before its body arrives.
MAX_HEADERS_LENGTH: Final = 128 * 1024
MAX_PAYLOAD_LENGTH: Final = 24 * 1024 * 1024

_PRELUDE_LENGTH: Final = 12
_MESSAGE_CRC_LENGTH: Final = 4
# Prelude plus message CRC: the length of a message with no headers and no payload.
_MIN_MESSAGE_LENGTH: Final = _PRELUDE_LENGTH + _MESSAGE_CRC_LENGTH
MAX_MESSAGE_LENGTH: Final = _MIN_MESSAGE_LENGTH + MAX_HEADERS_LENGTH + MAX_PAYLOAD_LENGTH
# A stream repeats a handful of header blocks (one per event type), so each decoder remembers the
# first few it decodes. Both bounds keep a hostile stream from growing the cache.
_HEADER_CACHE_ENTRIES: Final = 32
_HEADER_CACHE_MAX_KEY: Final = 1024

_PRELUDE = struct.Struct("!III")
_CRC = struct.Struct("!I")
_TYPE_FALSE: Final = 1
_TYPE_BYTES: Final = 6
_TYPE_STRING: Final = 7
_TYPE_UUID: Final = 9
_UUID_LENGTH: Final = 16
# Fixed-width signed integers: byte, short, integer, long and timestamp.
_INTEGERS: Final = {
    2: struct.Struct("!b"),
    3: struct.Struct("!h"),
    4: struct.Struct("!i"),
    5: struct.Struct("!q"),
    8: struct.Struct("!q"),
}


class EventStreamError(Exception):
    """The bytes are not a valid event stream: a bad checksum, length, or header."""


class Message(NamedTuple):
    """One decoded message.

    A named tuple rather than a dataclass: it is built once per streamed token, and a tuple is
    the cheapest object to build.
    """

    headers: dict[str, HeaderValue]
    payload: bytes


class MessageDecoder:
    """Turns the chunks of one event stream, however they are split, into messages.

    After it raises ``EventStreamError`` the stream cannot be resynchronised (nothing marks where
    the next message starts), so every later ``feed`` raises too.
    """

    def __init__(self) -> None:
        self._buffer = bytearray()
        # How many buffered bytes the next attempt to decode needs: a whole prelude, or the whole
        # message once its prelude is known. Feeding a large message in small chunks then costs
        # one copy, not one decode attempt per chunk.
        self._wanted = _PRELUDE_LENGTH
        self._failure: EventStreamError | None = None
        # Raw header block -> its decoded headers. Callers get copies, so may change them.
        self._header_cache: dict[bytes, dict[str, HeaderValue]] = {}

    def feed(self, data: bytes) -> list[Message]:
        """Every message completed by ``data``, in order; a trailing partial message is kept.

        Raises ``EventStreamError`` for corrupt input; messages that came before the corrupt one
        in the same call are not returned.
        """
        if self._failure is not None:
            raise EventStreamError("the event stream already failed to decode") from self._failure
        buffer = self._buffer
        if buffer:
            if len(buffer) + len(data) < self._wanted:
                buffer += data
                return []
            data = b"".join((buffer, data))
            buffer.clear()
        elif data.__class__ is not bytes:
            # Slices of a bytearray or memoryview are not bytes; payloads must be.
            data = bytes(data)
        try:
            messages, consumed, wanted = _decode(data, self._header_cache)
        except EventStreamError as exc:
            self._failure = exc
            raise
        if consumed < len(data):
            buffer += memoryview(data)[consumed:]
        self._wanted = wanted
        return messages


def _decode(data: bytes, header_cache: dict[bytes, dict[str, HeaderValue]]) -> tuple[list[Message], int, int]:
    """The whole messages at the start of ``data``, the bytes they span, and the bytes the next needs.

    Offsets walk one immutable ``bytes`` object: nothing is copied but each payload and each
    header block, and the checksums run over memoryview slices. Decoded header blocks are
    remembered in ``header_cache``.
    """
    messages: list[Message] = []
    view = memoryview(data)
    size = len(data)
    start = 0
    while size - start >= _PRELUDE_LENGTH:
        total, headers_length, prelude_crc = _PRELUDE.unpack_from(data, start)
        # The checksum first: if it fails the lengths are noise, and saying so is the better error.
        if crc32(view[start : start + 8]) != prelude_crc:
            raise EventStreamError("prelude checksum mismatch")
        if total < _MIN_MESSAGE_LENGTH:
            raise EventStreamError(f"total length {total} is shorter than an empty message")
        if headers_length > MAX_HEADERS_LENGTH:
            raise EventStreamError(f"headers length {headers_length} exceeds {MAX_HEADERS_LENGTH}")
        payload_length = total - _MIN_MESSAGE_LENGTH - headers_length
        if payload_length < 0:
            raise EventStreamError(f"headers length {headers_length} does not fit in a {total}-byte message")
        if payload_length > MAX_PAYLOAD_LENGTH:
            raise EventStreamError(f"payload length {payload_length} exceeds {MAX_PAYLOAD_LENGTH}")
        end = start + total
        if end > size:
            return messages, start, total
        crc_at = end - _MESSAGE_CRC_LENGTH
        if crc32(view[start:crc_at]) != _CRC.unpack_from(data, crc_at)[0]:
            raise EventStreamError("message checksum mismatch")
        headers_start = start + _PRELUDE_LENGTH
        headers_end = headers_start + headers_length
        raw_headers = data[headers_start:headers_end]
        cached = header_cache.get(raw_headers)
        if cached is None:
            headers = _decode_headers(raw_headers)
            if len(header_cache) < _HEADER_CACHE_ENTRIES and headers_length <= _HEADER_CACHE_MAX_KEY:
                header_cache[raw_headers] = headers.copy()
        else:
            headers = cached.copy()
        messages.append(Message(headers, data[headers_end:crc_at]))
        start = end
    return messages, start, _PRELUDE_LENGTH


def _decode_headers(data: bytes) -> dict[str, HeaderValue]:
    """The headers in a message's header block; every length is checked against its end."""
    headers: dict[str, HeaderValue] = {}
    position = 0
    end = len(data)
    try:
        while position < end:
            name_end = position + 1 + data[position]
            # The type byte follows the name, so it must also fall inside the headers.
            if name_end >= end:
                raise EventStreamError("truncated header name")
            name = data[position + 1 : name_end].decode()
            value_type = data[name_end]
            position = name_end + 1
            value: HeaderValue
            if value_type in (_TYPE_STRING, _TYPE_BYTES):
                value_start = position + 2
                if value_start > end:
                    raise EventStreamError(f"truncated length of header {name!r}")
                position = value_start + (data[value_start - 2] << 8 | data[value_start - 1])
                if position > end:
                    raise EventStreamError(f"truncated value of header {name!r}")
                raw = data[value_start:position]
                value = raw.decode() if value_type == _TYPE_STRING else raw
            elif value_type <= _TYPE_FALSE:
                value = value_type != _TYPE_FALSE
            elif value_type == _TYPE_UUID:
                value = data[position : position + _UUID_LENGTH]
                position += _UUID_LENGTH
                if position > end:
                    raise EventStreamError(f"truncated value of header {name!r}")
            else:
                integer = _INTEGERS.get(value_type)
                if integer is None:
                    raise EventStreamError(f"header {name!r} has unknown value type {value_type}")
                if position + integer.size > end:
                    raise EventStreamError(f"truncated value of header {name!r}")
                value = integer.unpack_from(data, position)[0]
                position += integer.size
            if name in headers:
                raise EventStreamError(f"duplicate header {name!r}")
            headers[name] = value
    except UnicodeDecodeError as exc:
        raise EventStreamError("header name or string value is not valid UTF-8") from exc
    return headers
