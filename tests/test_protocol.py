"""The hubgate.v1 wire protocol: client message validation and server frame building (pure)."""

from __future__ import annotations

import contextlib
import json
from typing import Any

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from hubgate.errors import InvalidMessage, RequestError, UnknownType
from hubgate.protocol import (
    MAX_ID_LENGTH,
    MAX_MESSAGES,
    MAX_STOP_LENGTH,
    MAX_STOP_SEQUENCES,
    MAX_TOKENS_CEILING,
    SUBPROTOCOL,
    Auth,
    Cancel,
    Chat,
    ChatMessage,
    FrameBuilder,
    Ping,
    Resume,
    SessionCreate,
    SessionDelete,
    SessionGet,
    encode,
    error_frame,
    parse_client_message,
    ready_frame,
    request_id_of,
    token_from_authorization,
    token_from_subprotocols,
)

USER_HI = [{"role": "user", "content": "hi"}]


def raw(obj: Any) -> str:
    return json.dumps(obj)


def chat(**fields: Any) -> Chat:
    message: dict[str, Any] = {"type": "chat", "id": "r1", "messages": USER_HI}
    message.update(fields)
    parsed = parse_client_message(raw(message))
    assert isinstance(parsed, Chat)
    return parsed


def chat_error(**fields: Any) -> str:
    message: dict[str, Any] = {"type": "chat", "id": "r1", "messages": USER_HI}
    message.update(fields)
    with pytest.raises(InvalidMessage) as info:
        parse_client_message(raw(message))
    return info.value.message


# --------------------------------------------------------------------------- envelope


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("{not json", "not valid JSON"),
        ("", "not valid JSON"),
        ('{"type": "ping"} trailing', "not valid JSON"),
        ("[]", "JSON object"),
        ('"chat"', "JSON object"),
        ("42", "JSON object"),
        ("null", "JSON object"),
        ("{}", "'type' is required"),
        ('{"type": null}', "'type' is required"),
        ('{"type": 7}', "'type' is required"),
    ],
)
def test_envelope_errors_are_invalid_message(text: str, fragment: str) -> None:
    with pytest.raises(InvalidMessage, match=fragment):
        parse_client_message(text)


def test_invalid_utf8_bytes_are_invalid_message() -> None:
    with pytest.raises(InvalidMessage, match="not valid JSON"):
        parse_client_message(b'{"type": "ping", "id": "\xff"}')


def test_bytes_are_accepted() -> None:
    assert parse_client_message(b'{"type": "ping"}') == Ping()


def test_unknown_type() -> None:
    with pytest.raises(UnknownType) as info:
        parse_client_message(raw({"type": "subscribe", "id": "a"}))
    assert info.value.code == "unknown_type"
    assert "subscribe" in info.value.message


def test_unknown_type_is_truncated_in_the_message() -> None:
    with pytest.raises(UnknownType) as info:
        parse_client_message(raw({"type": "x" * 1000}))
    assert len(info.value.message) < 120


def test_type_is_case_sensitive() -> None:
    with pytest.raises(UnknownType):
        parse_client_message(raw({"type": "Chat", "id": "a", "messages": USER_HI}))


# --------------------------------------------------------------------------- message types


def test_chat_minimal() -> None:
    assert chat() == Chat(id="r1", messages=(ChatMessage("user", "hi"),))


def test_chat_every_field() -> None:
    parsed = chat(
        model="amazon.nova-lite-v1:0",
        system="Be brief.",
        max_tokens=256,
        temperature=0.5,
        top_p=1,
        stop=["\n\n", "END"],
        session="s-1",
        messages=[
            {"role": "user", "content": "a"},
            {"role": "assistant", "content": "b"},
            {"role": "user", "content": "c"},
        ],
    )
    assert parsed == Chat(
        id="r1",
        messages=(ChatMessage("user", "a"), ChatMessage("assistant", "b"), ChatMessage("user", "c")),
        model="amazon.nova-lite-v1:0",
        system="Be brief.",
        max_tokens=256,
        temperature=0.5,
        top_p=1.0,
        stop=("\n\n", "END"),
        session="s-1",
    )
    assert isinstance(parsed.top_p, float)


def test_chat_ignores_unknown_fields_and_nulls() -> None:
    assert chat(extra={"x": 1}, model=None, system=None, max_tokens=None, stop=None) == chat()


def test_cancel() -> None:
    assert parse_client_message(raw({"type": "cancel", "id": "r1"})) == Cancel(id="r1")
    with pytest.raises(InvalidMessage, match="'id' is required"):
        parse_client_message(raw({"type": "cancel"}))


def test_ping_with_and_without_id() -> None:
    assert parse_client_message(raw({"type": "ping"})) == Ping()
    assert parse_client_message(raw({"type": "ping", "id": "p1"})) == Ping(id="p1")
    with pytest.raises(InvalidMessage):
        parse_client_message(raw({"type": "ping", "id": ""}))


def test_auth() -> None:
    assert parse_client_message(raw({"type": "auth", "token": "eyJ.x.y"})) == Auth(token="eyJ.x.y")
    for token in (None, "", 5, ["t"]):
        with pytest.raises(InvalidMessage, match="'token' must be a non-empty string"):
            parse_client_message(raw({"type": "auth", "token": token}))


def test_resume() -> None:
    assert parse_client_message(raw({"type": "resume", "id": "r1", "after": 7})) == Resume("r1", 7)
    assert parse_client_message(raw({"type": "resume", "id": "r1"})) == Resume("r1", -1)
    assert parse_client_message(raw({"type": "resume", "id": "r1", "after": -1})) == Resume("r1", -1)
    assert parse_client_message(raw({"type": "resume", "id": "r1", "after": None})) == Resume("r1", -1)
    for after in (-2, 1.5, True, "3", 2**31 + 1):
        with pytest.raises(InvalidMessage, match="'after'"):
            parse_client_message(raw({"type": "resume", "id": "r1", "after": after}))
    with pytest.raises(InvalidMessage, match="'id' is required"):
        parse_client_message(raw({"type": "resume", "after": 0}))


def test_session_messages() -> None:
    assert parse_client_message(raw({"type": "session.create"})) == SessionCreate()
    assert parse_client_message(raw({"type": "session.create", "id": "q", "system": "s"})) == SessionCreate(
        id="q", system="s"
    )
    assert parse_client_message(raw({"type": "session.get", "session": "s1"})) == SessionGet("s1")
    assert parse_client_message(raw({"type": "session.delete", "session": "s1", "id": "q"})) == (
        SessionDelete("s1", id="q")
    )
    for kind in ("session.get", "session.delete"):
        with pytest.raises(InvalidMessage, match="'session' is required"):
            parse_client_message(raw({"type": kind}))
    with pytest.raises(InvalidMessage, match="'system' must be a string"):
        parse_client_message(raw({"type": "session.create", "system": 1}))


# --------------------------------------------------------------------------- ids


@pytest.mark.parametrize(
    "value",
    ["", "x" * (MAX_ID_LENGTH + 1), "a\nb", "tab\there", "nul\x00", "bell\x07", "\u200b", 12, ["a"], True],
    ids=["empty", "too-long", "newline", "tab", "nul", "control", "zero-width", "int", "list", "bool"],
)
def test_bad_ids_are_refused(value: Any) -> None:
    with pytest.raises(InvalidMessage, match="'id' must be a non-empty printable string of at most 128"):
        parse_client_message(raw({"type": "cancel", "id": value}))


@pytest.mark.parametrize(
    "value", ["a", "x" * MAX_ID_LENGTH, "req-1:2/3", "é", "日本語", "emoji-😀", "with space"]
)
def test_good_ids_are_kept(value: str) -> None:
    assert parse_client_message(raw({"type": "cancel", "id": value})) == Cancel(id=value)


def test_id_length_counts_characters_not_bytes() -> None:
    value = "é" * MAX_ID_LENGTH  # 256 bytes of UTF-8, 128 characters
    assert parse_client_message(raw({"type": "cancel", "id": value})) == Cancel(id=value)


def test_chat_requires_an_id() -> None:
    with pytest.raises(InvalidMessage, match="'id' is required"):
        parse_client_message(raw({"type": "chat", "messages": USER_HI}))


def test_session_reference_follows_the_id_rules() -> None:
    assert chat(session="x" * MAX_ID_LENGTH).session == "x" * MAX_ID_LENGTH
    for value in ("", "x" * (MAX_ID_LENGTH + 1), "a\nb", 3):
        assert "'session' must be" in chat_error(session=value)


# --------------------------------------------------------------------------- messages


@pytest.mark.parametrize("messages", [None, [], {}, "hi", 3])
def test_messages_must_be_a_non_empty_list(messages: Any) -> None:
    assert chat_error(messages=messages) == "'messages' must be a non-empty list"


def test_messages_missing() -> None:
    with pytest.raises(InvalidMessage, match="'messages' must be a non-empty list"):
        parse_client_message(raw({"type": "chat", "id": "r1"}))


def test_message_entries_must_be_objects() -> None:
    assert chat_error(messages=["hi"]) == "messages[0] must be an object"


@pytest.mark.parametrize("role", ["system", "User", "", None, 1, "tool"])
def test_wrong_roles(role: Any) -> None:
    assert chat_error(messages=[{"role": role, "content": "x"}]) == (
        "messages[0].role must be 'user' or 'assistant'"
    )


@pytest.mark.parametrize("content", [None, "", "   \n", 5, ["x"], {"text": "x"}, True])
def test_content_must_be_a_non_blank_string(content: Any) -> None:
    assert chat_error(messages=[{"role": "user", "content": content}]) == (
        "messages[0].content must be a non-empty string"
    )


def test_first_message_must_be_user() -> None:
    message = chat_error(messages=[{"role": "assistant", "content": "a"}, {"role": "user", "content": "b"}])
    assert message.startswith("messages[0].role must be 'user'")


def test_roles_must_alternate() -> None:
    message = chat_error(messages=[{"role": "user", "content": "a"}, {"role": "user", "content": "b"}])
    assert message.startswith("messages[1].role must be 'assistant'")
    message = chat_error(
        messages=[
            {"role": "user", "content": "a"},
            {"role": "assistant", "content": "b"},
            {"role": "assistant", "content": "c"},
        ]
    )
    assert message.startswith("messages[2].role must be 'user'")


def test_last_message_must_be_user() -> None:
    message = chat_error(messages=[{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}])
    assert message == "the last message must have role 'user'"


def test_message_count_limit() -> None:
    def turns(n: int) -> list[dict[str, str]]:
        return [{"role": "user" if i % 2 == 0 else "assistant", "content": "x"} for i in range(n)]

    assert len(chat(messages=turns(MAX_MESSAGES - 1)).messages) == MAX_MESSAGES - 1
    # MAX_MESSAGES is even, so a full list ends with an assistant turn; the count is checked first.
    assert (
        chat_error(messages=turns(MAX_MESSAGES + 1)) == f"'messages' may hold at most {MAX_MESSAGES} entries"
    )


def test_content_whitespace_is_kept() -> None:
    assert chat(messages=[{"role": "user", "content": "  padded\n"}]).messages[0].content == "  padded\n"


# --------------------------------------------------------------------------- model, system


def test_model() -> None:
    assert chat(model="m").model == "m"
    assert chat(model="x" * 2048).model == "x" * 2048
    for value in ("", "x" * 2049):
        assert chat_error(model=value) == "'model' must be a non-empty string"
    assert chat_error(model=5) == "'model' must be a string"


def test_system() -> None:
    assert chat(system="You are terse.").system == "You are terse."
    assert chat_error(system=["x"]) == "'system' must be a string"


# --------------------------------------------------------------------------- max_tokens


@pytest.mark.parametrize("value", [1, 2, 1000, MAX_TOKENS_CEILING])
def test_max_tokens_in_range(value: int) -> None:
    assert chat(max_tokens=value).max_tokens == value


@pytest.mark.parametrize("value", [0, -1, MAX_TOKENS_CEILING + 1, 1.0, 10.5, "10", True, False, [1]])
def test_max_tokens_refused(value: Any) -> None:
    assert chat_error(max_tokens=value) == "'max_tokens' must be an integer between 1 and 200000"


# --------------------------------------------------------------------------- temperature, top_p


@pytest.mark.parametrize("field", ["temperature", "top_p"])
@pytest.mark.parametrize("value", [0, 0.0, 0.25, 1, 1.0])
def test_sampling_in_range(field: str, value: float) -> None:
    parsed = chat(**{field: value})
    assert getattr(parsed, field) == value
    assert isinstance(getattr(parsed, field), float)


@pytest.mark.parametrize("field", ["temperature", "top_p"])
@pytest.mark.parametrize("value", [-0.01, 1.0001, 2, -1])
def test_sampling_out_of_range(field: str, value: float) -> None:
    assert chat_error(**{field: value}) == f"'{field}' must be between 0 and 1"


@pytest.mark.parametrize("field", ["temperature", "top_p"])
@pytest.mark.parametrize("value", [True, False, "0.5", [0.5], {}])
def test_sampling_not_a_number(field: str, value: Any) -> None:
    assert chat_error(**{field: value}) == f"'{field}' must be a number"


@pytest.mark.parametrize("field", ["temperature", "top_p"])
@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity", "1e999"])
def test_sampling_non_finite_is_refused(field: str, literal: str) -> None:
    # Not valid JSON (RFC 8259 has no NaN/Infinity; 1e999 overflows): refused before validation.
    head = '{"type":"chat","id":"r1","messages":[{"role":"user","content":"hi"}]'
    text = f'{head},"{field}":{literal}}}'
    with pytest.raises(InvalidMessage):
        parse_client_message(text)


# --------------------------------------------------------------------------- stop


def test_stop_as_string_or_list() -> None:
    assert chat(stop="END").stop == ("END",)
    assert chat(stop=["a", "b"]).stop == ("a", "b")
    assert chat(stop=[]).stop == ()
    assert chat().stop == ()
    assert chat(stop=["s"] * MAX_STOP_SEQUENCES).stop == ("s",) * MAX_STOP_SEQUENCES
    assert chat(stop="x" * MAX_STOP_LENGTH).stop == ("x" * MAX_STOP_LENGTH,)


@pytest.mark.parametrize(
    "value",
    [
        ["s"] * (MAX_STOP_SEQUENCES + 1),
        "",
        [""],
        ["x" * (MAX_STOP_LENGTH + 1)],
        "x" * (MAX_STOP_LENGTH + 1),
        [1],
        ["ok", None],
        5,
        {"a": 1},
    ],
    ids=[
        "too-many",
        "empty-string",
        "empty-item",
        "item-too-long",
        "string-too-long",
        "int-item",
        "null-item",
        "int",
        "object",
    ],
)
def test_stop_refused(value: Any) -> None:
    assert chat_error(stop=value) == "'stop' must be a list of at most 4 non-empty strings"


# --------------------------------------------------------------------------- properties


@given(st.text())
def test_any_text_parses_or_raises_a_request_error(text: str) -> None:
    with contextlib.suppress(RequestError):
        parse_client_message(text)


@given(st.binary())
def test_any_bytes_parse_or_raise_a_request_error(data: bytes) -> None:
    with contextlib.suppress(RequestError):
        parse_client_message(data)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)
message_types = st.sampled_from(
    ["chat", "cancel", "ping", "auth", "resume", "session.create", "session.get", "session.delete", "other"]
)
fields = st.sampled_from(
    [
        "id",
        "messages",
        "model",
        "system",
        "max_tokens",
        "temperature",
        "top_p",
        "stop",
        "session",
        "token",
        "after",
    ]
)


@given(message_types, st.dictionaries(fields, json_values, max_size=6))
def test_any_object_of_a_known_shape_parses_or_raises_a_request_error(
    kind: str, body: dict[str, Any]
) -> None:
    with contextlib.suppress(RequestError):
        parse_client_message(json.dumps({"type": kind, **body}))


# --------------------------------------------------------------------------- request_id_of


def test_request_id_of() -> None:
    assert request_id_of('{"type":"chat","id":"r9","messages":[]}') == "r9"
    assert request_id_of(b'{"id":"r9"}') == "r9"
    assert request_id_of("{broken") is None
    assert request_id_of("[1, 2]") is None
    assert request_id_of('{"type":"chat"}') is None
    assert request_id_of('{"id": 5}') is None
    assert request_id_of('{"id": ""}') is None
    assert request_id_of(raw({"id": "x" * (MAX_ID_LENGTH + 1)})) is None
    assert request_id_of(raw({"id": "a\nb"})) is None
    assert request_id_of(raw({"id": "é" * MAX_ID_LENGTH})) == "é" * MAX_ID_LENGTH


# --------------------------------------------------------------------------- credentials


def test_token_from_subprotocols() -> None:
    assert token_from_subprotocols([SUBPROTOCOL, "bearer.eyJ.a.b"]) == ("eyJ.a.b", True)
    assert token_from_subprotocols(["bearer.eyJ.a.b"]) == ("eyJ.a.b", False)
    assert token_from_subprotocols([SUBPROTOCOL]) == (None, True)
    assert token_from_subprotocols([]) == (None, False)
    assert token_from_subprotocols(["bearer."]) == (None, False)
    assert token_from_subprotocols(["Bearer.tok", "hubgate.v2"]) == (None, False)
    assert token_from_subprotocols(["bearer.one", "bearer.two", SUBPROTOCOL]) == ("two", True)


@pytest.mark.parametrize(
    ("header", "token"),
    [
        ("Bearer abc.def.ghi", "abc.def.ghi"),
        ("bearer abc", "abc"),
        ("BEARER abc", "abc"),
        ("Bearer   abc  ", "abc"),
        (None, None),
        ("", None),
        ("Bearer", None),
        ("Bearer ", None),
        ("Bearer    ", None),
        ("Basic dXNlcjpwYXNz", None),
        ("Token abc", None),
        ("abc", None),
    ],
)
def test_token_from_authorization(header: str | None, token: str | None) -> None:
    assert token_from_authorization(header) == token


# --------------------------------------------------------------------------- frames


def test_frame_builder_numbers_every_frame_from_zero() -> None:
    frames = FrameBuilder("r1")
    sent = [frames.start("m"), frames.delta("a"), frames.delta("b"), frames.end("end_turn", 3, 2, 10.0, 20.0)]
    assert [json.loads(f)["seq"] for f in sent] == [0, 1, 2, 3]
    assert all(json.loads(f)["id"] == "r1" for f in sent)
    assert frames.seq == 4


def test_frame_builder_can_start_at_a_later_seq() -> None:
    frames = FrameBuilder("r1", seq=5)
    assert json.loads(frames.delta("x"))["seq"] == 5
    assert json.loads(frames.error("upstream_error", "broke"))["seq"] == 6


def test_start_frame() -> None:
    limits = {"requests_remaining": 9, "tokens_remaining": None, "reset_seconds": 1.5}
    assert json.loads(FrameBuilder("r1").start("amazon.nova-lite-v1:0", limits)) == {
        "type": "start",
        "id": "r1",
        "seq": 0,
        "model": "amazon.nova-lite-v1:0",
        "limits": limits,
    }
    assert json.loads(FrameBuilder("r1").start("m")) == {"type": "start", "id": "r1", "seq": 0, "model": "m"}
    assert json.loads(FrameBuilder("r1").start("m", session="s1"))["session"] == "s1"


def test_delta_frame_shape() -> None:
    frames = FrameBuilder("r1")
    frames.start("m")
    assert json.loads(frames.delta("Hello")) == {"type": "delta", "id": "r1", "seq": 1, "text": "Hello"}


@pytest.mark.parametrize(
    "text",
    [
        'say "hi"',
        "line one\nline two\r\n",
        "tab\there",
        "back\\slash",
        "</script><script>alert(1)</script>",
        "é ü 日本語 😀",
        "\u2028\u2029",
        "\x00\x01\x1f\x7f",
        "",
        " ",
    ],
)
def test_delta_text_round_trips_exactly(text: str) -> None:
    frame = FrameBuilder("r1").delta(text)
    assert json.loads(frame)["text"] == text
    assert orjson.loads(frame)["text"] == text
    assert "\n" not in frame  # one frame is one line of JSON


@pytest.mark.parametrize("request_id", ['quote"id', "back\\slash", "é😀", "</script>"])
def test_delta_escapes_the_request_id(request_id: str) -> None:
    frame = json.loads(FrameBuilder(request_id).delta("x"))
    assert frame["id"] == request_id


def test_delta_matches_the_generic_encoder() -> None:
    frames = FrameBuilder('r"1')
    expected = encode({"type": "delta", "id": 'r"1', "seq": 0, "text": 'a "b"\n</script>'})
    assert frames.delta('a "b"\n</script>') == expected


@given(st.text(), st.text(min_size=1, max_size=MAX_ID_LENGTH), st.integers(min_value=0, max_value=10**9))
def test_delta_round_trips_any_text(text: str, request_id: str, seq: int) -> None:
    frame = FrameBuilder(request_id, seq=seq).delta(text)
    assert json.loads(frame) == {"type": "delta", "id": request_id, "seq": seq, "text": text}


def test_end_frame_shape_and_rounding() -> None:
    frames = FrameBuilder("r1")
    frames.start("m")
    assert json.loads(frames.end("max_tokens", 12, 34, 123.4567, 987.6543)) == {
        "type": "end",
        "id": "r1",
        "seq": 1,
        "stop_reason": "max_tokens",
        "usage": {"input_tokens": 12, "output_tokens": 34},
        "metrics": {"ttft_ms": 123.46, "duration_ms": 987.65},
    }


def test_end_frame_without_a_first_token() -> None:
    frame = json.loads(FrameBuilder("r1").end("cancelled", 5, 0, None, 3.0))
    assert frame["metrics"] == {"ttft_ms": None, "duration_ms": 3.0}
    assert frame["stop_reason"] == "cancelled"


def test_request_error_frame_shape() -> None:
    frames = FrameBuilder("r1")
    assert json.loads(frames.error("rate_limited", "slow down", retry_after=2.5)) == {
        "type": "error",
        "id": "r1",
        "seq": 0,
        "code": "rate_limited",
        "message": "slow down",
        "retry_after": 2.5,
    }
    assert json.loads(frames.error("upstream_error", "broke")) == {
        "type": "error",
        "id": "r1",
        "seq": 1,
        "code": "upstream_error",
        "message": "broke",
    }


def test_error_frame_without_request() -> None:
    assert error_frame("invalid_message", "bad") == {
        "type": "error",
        "code": "invalid_message",
        "message": "bad",
    }
    assert error_frame("duplicate_id", "dup", request_id="r1") == {
        "type": "error",
        "id": "r1",
        "code": "duplicate_id",
        "message": "dup",
    }
    assert error_frame("x", "y", seq=0)["seq"] == 0


@pytest.mark.parametrize(
    ("retry_after", "sent"),
    [
        (2.0, 2.0),
        (1.23456, 1.235),
        (0.0015, 0.002),
        (0.0004, 0.001),
        (0.0, 0.001),
        (-3.0, 0.001),
        (60, 60),
    ],
)
def test_error_frame_retry_after_is_rounded_to_ms_and_never_zero(retry_after: float, sent: float) -> None:
    assert error_frame("rate_limited", "m", retry_after=retry_after)["retry_after"] == pytest.approx(sent)


def test_error_frame_encodes_as_json() -> None:
    frame = error_frame("rate_limited", 'quote " and \n', request_id="r1", seq=0, retry_after=1)
    assert json.loads(encode(frame)) == frame


def test_ready_frame() -> None:
    frame = ready_frame(
        connection_id="c1",
        tenant="acme",
        user="alice",
        models=["a", "b"],
        default_model="a",
        expires_at=1_700_000_000.9,
    )
    assert frame == {
        "type": "ready",
        "connection_id": "c1",
        "tenant": "acme",
        "user": "alice",
        "models": ["a", "b"],
        "default_model": "a",
        "expires_at": 1_700_000_000,
        "protocol": "hubgate.v1",
    }
    assert json.loads(encode(frame)) == frame


def test_delta_with_a_lone_surrogate_is_still_valid_json() -> None:
    builder = FrameBuilder("r")
    frame = json.loads(builder.delta("ok \ud800 done"))
    assert frame["text"] == "ok ? done" and frame["seq"] == 0
