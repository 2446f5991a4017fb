"""The `hubgate.v1` wire protocol: parse client messages, build server frames.

Pure functions and plain classes: no sockets, no clocks (time is passed in). The WebSocket
endpoint in ``hubgate.gateway`` only pumps what this module parses and builds.
The contract is written out for client authors in ``docs/protocol.md``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final, Literal

import orjson

from hubgate.errors import InvalidMessage, UnknownType

SUBPROTOCOL: Final = "hubgate.v1"
BEARER_PREFIX: Final = "bearer."

MAX_ID_LENGTH: Final = 128
MAX_MESSAGES: Final = 500
MAX_STOP_SEQUENCES: Final = 4
MAX_STOP_LENGTH: Final = 256
MAX_TOKENS_CEILING: Final = 200_000
MAX_TOKEN_LENGTH: Final = 8192

Role = Literal["user", "assistant"]


@dataclass(frozen=True, slots=True)
class ChatMessage:
    role: Role
    content: str


@dataclass(frozen=True, slots=True)
class Chat:
    id: str
    messages: tuple[ChatMessage, ...]
    model: str | None = None
    system: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    stop: tuple[str, ...] = ()
    session: str | None = None


@dataclass(frozen=True, slots=True)
class Cancel:
    id: str


@dataclass(frozen=True, slots=True)
class Ping:
    id: str | None = None


@dataclass(frozen=True, slots=True)
class Auth:
    token: str


@dataclass(frozen=True, slots=True)
class Resume:
    id: str
    after: int


@dataclass(frozen=True, slots=True)
class SessionCreate:
    id: str | None = None
    system: str | None = None


@dataclass(frozen=True, slots=True)
class SessionGet:
    session: str
    id: str | None = None


@dataclass(frozen=True, slots=True)
class SessionDelete:
    session: str
    id: str | None = None


ClientMessage = Chat | Cancel | Ping | Auth | Resume | SessionCreate | SessionGet | SessionDelete


# --------------------------------------------------------------------------- parsing


def _load(raw: str | bytes) -> dict[str, Any]:
    try:
        value = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise InvalidMessage("message is not valid JSON") from exc
    if not isinstance(value, dict):
        raise InvalidMessage("message must be a JSON object")
    return value


def _id(obj: Mapping[str, Any], field: str = "id", *, required: bool = True) -> str | None:
    value = obj.get(field)
    if value is None:
        if required:
            raise InvalidMessage(f"'{field}' is required")
        return None
    if not isinstance(value, str) or not value or len(value) > MAX_ID_LENGTH or not value.isprintable():
        raise InvalidMessage(
            f"'{field}' must be a non-empty printable string of at most {MAX_ID_LENGTH} characters"
        )
    return value


def _opt_str(obj: Mapping[str, Any], field: str) -> str | None:
    value = obj.get(field)
    if value is None:
        return None
    if not isinstance(value, str):
        raise InvalidMessage(f"'{field}' must be a string")
    return value


def _opt_number(obj: Mapping[str, Any], field: str, lo: float, hi: float) -> float | None:
    value = obj.get(field)
    if value is None:
        return None
    # bool is an int subclass in Python; true/false is not a number on the wire.
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise InvalidMessage(f"'{field}' must be a number")
    if not lo <= value <= hi:
        raise InvalidMessage(f"'{field}' must be between {lo:g} and {hi:g}")
    return float(value)


def _messages(obj: Mapping[str, Any]) -> tuple[ChatMessage, ...]:
    raw = obj.get("messages")
    if not isinstance(raw, list) or not raw:
        raise InvalidMessage("'messages' must be a non-empty list")
    if len(raw) > MAX_MESSAGES:
        raise InvalidMessage(f"'messages' may hold at most {MAX_MESSAGES} entries")
    out: list[ChatMessage] = []
    expected: Role = "user"
    for index, item in enumerate(raw):
        if not isinstance(item, dict):
            raise InvalidMessage(f"messages[{index}] must be an object")
        role = item.get("role")
        content = item.get("content")
        if role not in ("user", "assistant"):
            raise InvalidMessage(f"messages[{index}].role must be 'user' or 'assistant'")
        if not isinstance(content, str) or not content.strip():
            raise InvalidMessage(f"messages[{index}].content must be a non-empty string")
        # Bedrock Converse requires turns to alternate, starting with the user.
        if role != expected:
            raise InvalidMessage(
                f"messages[{index}].role must be '{expected}' (roles alternate, starting with user)"
            )
        out.append(ChatMessage(role=role, content=content))
        expected = "assistant" if role == "user" else "user"
    if out[-1].role != "user":
        raise InvalidMessage("the last message must have role 'user'")
    return tuple(out)


def _chat(obj: Mapping[str, Any]) -> Chat:
    request_id = _id(obj)
    assert request_id is not None
    model = _opt_str(obj, "model")
    if model is not None and (not model or len(model) > 2048):
        raise InvalidMessage("'model' must be a non-empty string")
    max_tokens = obj.get("max_tokens")
    if max_tokens is not None and (
        isinstance(max_tokens, bool)
        or not isinstance(max_tokens, int)
        or not 1 <= max_tokens <= MAX_TOKENS_CEILING
    ):
        raise InvalidMessage(f"'max_tokens' must be an integer between 1 and {MAX_TOKENS_CEILING}")
    stop_raw = obj.get("stop")
    stop: tuple[str, ...] = ()
    if stop_raw is not None:
        if isinstance(stop_raw, str):
            stop_raw = [stop_raw]
        if (
            not isinstance(stop_raw, list)
            or len(stop_raw) > MAX_STOP_SEQUENCES
            or not all(isinstance(s, str) and 0 < len(s) <= MAX_STOP_LENGTH for s in stop_raw)
        ):
            raise InvalidMessage(f"'stop' must be a list of at most {MAX_STOP_SEQUENCES} non-empty strings")
        stop = tuple(stop_raw)
    return Chat(
        id=request_id,
        messages=_messages(obj),
        model=model,
        system=_opt_str(obj, "system"),
        max_tokens=max_tokens,
        temperature=_opt_number(obj, "temperature", 0.0, 1.0),
        top_p=_opt_number(obj, "top_p", 0.0, 1.0),
        stop=stop,
        session=_id(obj, "session", required=False),
    )


def _resume(obj: Mapping[str, Any]) -> Resume:
    request_id = _id(obj)
    assert request_id is not None
    after = obj.get("after")
    if after is None:  # absent or null: nothing received yet
        after = -1
    if isinstance(after, bool) or not isinstance(after, int) or after < -1 or after > 2**31:
        raise InvalidMessage("'after' must be an integer >= -1 (the last seq received, -1 for none)")
    return Resume(id=request_id, after=after)


def _auth(obj: Mapping[str, Any]) -> Auth:
    token = obj.get("token")
    if not isinstance(token, str) or not token:
        raise InvalidMessage("'token' must be a non-empty string")
    return Auth(token=token)


def _session_ref(obj: Mapping[str, Any]) -> str:
    session = _id(obj, "session")
    assert session is not None
    return session


def parse_client_message(raw: str | bytes) -> ClientMessage:
    """Validate one client message; raise InvalidMessage or UnknownType with a client-safe text."""
    obj = _load(raw)
    kind = obj.get("type")
    if not isinstance(kind, str):
        raise InvalidMessage("'type' is required")
    match kind:
        case "chat":
            return _chat(obj)
        case "cancel":
            request_id = _id(obj)
            assert request_id is not None
            return Cancel(id=request_id)
        case "ping":
            return Ping(id=_id(obj, required=False))
        case "auth":
            return _auth(obj)
        case "resume":
            return _resume(obj)
        case "session.create":
            return SessionCreate(id=_id(obj, required=False), system=_opt_str(obj, "system"))
        case "session.get":
            return SessionGet(session=_session_ref(obj), id=_id(obj, required=False))
        case "session.delete":
            return SessionDelete(session=_session_ref(obj), id=_id(obj, required=False))
        case _:
            raise UnknownType(f"unknown message type {kind[:64]!r}")


def request_id_of(raw: str | bytes) -> str | None:
    """Best effort: the `id` of a message that failed validation, so its error frame can name it."""
    try:
        obj = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    if isinstance(obj, dict):
        value = obj.get("id")
        if isinstance(value, str) and 0 < len(value) <= MAX_ID_LENGTH and value.isprintable():
            return value
    return None


def token_from_subprotocols(offered: list[str]) -> tuple[str | None, bool]:
    """(token, hubgate.v1 offered) from a Sec-WebSocket-Protocol list like ``hubgate.v1, bearer.<jwt>``."""
    token = None
    for item in offered:
        if item.startswith(BEARER_PREFIX) and len(item) > len(BEARER_PREFIX):
            token = item[len(BEARER_PREFIX) :]
    return token, SUBPROTOCOL in offered


def token_from_authorization(value: str | None) -> str | None:
    """The token of an ``Authorization: Bearer <jwt>`` header, or None."""
    if not value:
        return None
    scheme, _, token = value.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


# --------------------------------------------------------------------------- frames


def encode(frame: Mapping[str, Any]) -> str:
    """Serialise one server frame to the JSON text sent on the socket."""
    return orjson.dumps(frame).decode()


def ready_frame(
    *,
    connection_id: str,
    tenant: str,
    user: str,
    models: list[str],
    default_model: str,
    expires_at: float,
) -> dict[str, Any]:
    return {
        "type": "ready",
        "connection_id": connection_id,
        "tenant": tenant,
        "user": user,
        "models": models,
        "default_model": default_model,
        "expires_at": int(expires_at),
        "protocol": SUBPROTOCOL,
    }


def error_frame(
    code: str,
    message: str,
    *,
    request_id: str | None = None,
    seq: int | None = None,
    retry_after: float | None = None,
) -> dict[str, Any]:
    frame: dict[str, Any] = {"type": "error"}
    if request_id is not None:
        frame["id"] = request_id
    if seq is not None:
        frame["seq"] = seq
    frame["code"] = code
    frame["message"] = message
    if retry_after is not None:
        # Whole milliseconds, never 0 for a refusal: a client that retries at once is refused again.
        frame["retry_after"] = max(0.001, round(retry_after, 3))
    return frame


class FrameBuilder:
    """Builds the frames of one request, numbering them with `seq` (0, 1, 2, ...).

    The delta frame is the hot path (one per token): its JSON is put together from a
    pre-encoded prefix so each token costs one small string escape.
    """

    __slots__ = ("_prefix", "request_id", "seq")

    def __init__(self, request_id: str, seq: int = 0) -> None:
        self.request_id = request_id
        self.seq = seq
        self._prefix = '{"type":"delta","id":' + orjson.dumps(request_id).decode() + ',"seq":'

    def _next(self) -> int:
        seq = self.seq
        self.seq = seq + 1
        return seq

    def start(self, model: str, limits: Mapping[str, Any] | None = None, session: str | None = None) -> str:
        frame: dict[str, Any] = {"type": "start", "id": self.request_id, "seq": self._next(), "model": model}
        if session is not None:
            frame["session"] = session
        if limits is not None:
            frame["limits"] = limits
        return encode(frame)

    def delta(self, text: str) -> str:
        try:
            encoded = orjson.dumps(text)
        except TypeError:
            # A lone surrogate (possible in a decoded upstream chunk) is not valid UTF-8.
            encoded = orjson.dumps(text.encode("utf-8", "replace").decode("utf-8"))
        return self._prefix + str(self._next()) + ',"text":' + encoded.decode() + "}"

    def end(
        self,
        stop_reason: str,
        input_tokens: int,
        output_tokens: int,
        ttft_ms: float | None,
        duration_ms: float,
    ) -> str:
        return encode(
            {
                "type": "end",
                "id": self.request_id,
                "seq": self._next(),
                "stop_reason": stop_reason,
                "usage": {"input_tokens": input_tokens, "output_tokens": output_tokens},
                "metrics": {
                    "ttft_ms": None if ttft_ms is None else round(ttft_ms, 2),
                    "duration_ms": round(duration_ms, 2),
                },
            }
        )

    def error(self, code: str, message: str, retry_after: float | None = None) -> str:
        return encode(
            error_frame(code, message, request_id=self.request_id, seq=self._next(), retry_after=retry_after)
        )
