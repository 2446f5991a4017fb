"""From a request body to a script: the exact reply the emulator will stream, and how.

No I/O and no clock: the same (operation, model id, body) always gives the same script.

* Words come from a fixed vocabulary, picked by SHAKE-256 over a SHA-256 of the model id, the
  system and message words (directive markers removed) and the sampling settings, so equal
  prompts give equal replies and a longer reply for the same prompt starts with the shorter one.
* One token is one word; every token after the first carries a leading space.
* Input tokens are the whitespace-separated words of the system texts and every message text
  block (markers included as written), at least 1. Output tokens are the deltas sent.
* Directives are ``[[emulator:key=value]]`` markers in the text of the last user message.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Final, assert_never

import orjson

_VOCABULARY_TEXT: Final = """
    amber anchor apple arrow aspen autumn badge basil beacon birch bloom breeze bridge brook cable
    candle canyon cedar chalk cider clover cobalt comet copper coral cotton crane crystal daisy delta
    desert dune eagle ember falcon feather fern field flint forest fossil garden garnet glacier granite
    harbor hazel heron horizon island ivory jasper juniper kettle lagoon lantern lemon linen lotus maple
    marble meadow meteor mint mirror moss nectar nickel oak ocean olive onyx orbit orchid otter pebble
    pepper pine planet plum prairie quartz quill rain raven reef ribbon river robin saffron sage salmon
    sand sapphire shadow shell silver sky slate snow spark spruce star stone storm summit sun thistle
    thunder tide timber topaz tulip valley velvet violet walnut willow wind winter wren yarrow zephyr
    zinc acorn bramble cloud harvest
"""
# 128 words: one byte of hash output picks a word with no modulo bias.
VOCABULARY: Final[tuple[str, ...]] = tuple(_VOCABULARY_TEXT.split())

MIN_DEFAULT_TOKENS: Final = 16
MAX_DEFAULT_TOKENS: Final = 48
DEFAULT_AFTER: Final = 3
MAX_TOKENS_DIRECTIVE: Final = 100_000
MAX_DELAY_MS: Final = 600_000.0

MARKER: Final = re.compile(r"\[\[emulator:(.*?)\]\]", re.DOTALL)
_KEY: Final = re.compile(r"[a-z_]+")
_UNSIGNED: Final = re.compile(r"[0-9]+")
_DECIMAL: Final = re.compile(r"[0-9]+(?:\.[0-9]+)?")


class InvalidRequest(ValueError):
    """The request cannot be served; the emulator answers 400 ValidationException with this message."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class Operation(StrEnum):
    CONVERSE_STREAM = "converse_stream"
    INVOKE_WITH_RESPONSE_STREAM = "invoke_with_response_stream"


class StopReason(StrEnum):
    END_TURN = "end_turn"
    MAX_TOKENS = "max_tokens"
    STOP_SEQUENCE = "stop_sequence"
    GUARDRAIL_INTERVENED = "guardrail_intervened"


@dataclass(frozen=True, slots=True)
class HttpError:
    """An error answered instead of the stream: status, ``x-amzn-ErrorType`` and message."""

    status: int
    error_type: str
    message: str


class Fault(StrEnum):
    """Values of the ``fault`` directive."""

    THROTTLING = "throttling"
    VALIDATION = "validation"
    ACCESS_DENIED = "access_denied"
    UNAVAILABLE = "unavailable"
    INTERNAL = "internal"
    NOT_FOUND = "not_found"
    STREAM_THROTTLING = "stream_throttling"
    STREAM_MODEL_ERROR = "stream_model_error"
    STREAM_VALIDATION = "stream_validation"
    STREAM_UNAVAILABLE = "stream_unavailable"
    CUT = "cut"
    STALL = "stall"

    @property
    def http_error(self) -> HttpError | None:
        """The HTTP error answered before any event, or None for faults that strike mid-stream."""
        # Status codes and names follow the error shapes of the bedrock-runtime service model.
        match self:
            case Fault.THROTTLING:
                return HttpError(
                    429, "ThrottlingException", "Too many requests, please wait before trying again."
                )
            case Fault.VALIDATION:
                return HttpError(400, "ValidationException", "The emulator was asked to reject this request.")
            case Fault.ACCESS_DENIED:
                return HttpError(
                    403,
                    "AccessDeniedException",
                    "You don't have access to the model with the specified model ID.",
                )
            case Fault.UNAVAILABLE:
                return HttpError(
                    503, "ServiceUnavailableException", "The service is unavailable. Try again later."
                )
            case Fault.INTERNAL:
                return HttpError(
                    500, "InternalServerException", "The system encountered an unexpected error."
                )
            case Fault.NOT_FOUND:
                return HttpError(404, "ResourceNotFoundException", "The requested model was not found.")
            case (
                Fault.STREAM_THROTTLING
                | Fault.STREAM_MODEL_ERROR
                | Fault.STREAM_VALIDATION
                | Fault.STREAM_UNAVAILABLE
                | Fault.CUT
                | Fault.STALL
            ):
                return None
            case _:
                assert_never(self)

    @property
    def stream_exception(self) -> str | None:
        """The ``:exception-type`` sent mid-stream (a member of the output union), if any."""
        match self:
            case Fault.STREAM_THROTTLING:
                return "throttlingException"
            case Fault.STREAM_MODEL_ERROR:
                return "modelStreamErrorException"
            case Fault.STREAM_VALIDATION:
                return "validationException"
            case Fault.STREAM_UNAVAILABLE:
                return "serviceUnavailableException"
            case _:
                return None

    @property
    def mid_stream(self) -> bool:
        """True when the fault strikes after ``after`` tokens rather than before the stream."""
        return self.http_error is None


def stream_exception_message(exception_type: str) -> str:
    """The ``message`` of an in-stream exception."""
    return f"The emulator injected a {exception_type} mid-stream."


@dataclass(frozen=True, slots=True)
class Directives:
    """The directives of one request; None means not given."""

    fault: Fault | None = None
    after: int | None = None
    tokens: int | None = None
    reply: str | None = None
    ttft_ms: float | None = None
    token_delay_ms: float | None = None
    guardrail_intervene: bool = False
    fault_model: str | None = None  # the fault applies only to requests for this model id


@dataclass(frozen=True, slots=True)
class Prompt:
    """The parts of a request body that decide the reply, whichever operation carried it."""

    system: tuple[str, ...]
    messages: tuple[tuple[str, tuple[str, ...]], ...]  # (role, text blocks)
    max_tokens: int | None
    stop_sequences: tuple[str, ...]
    temperature: float | None
    top_p: float | None
    guardrail: Mapping[str, object] | None = None

    @property
    def last_user_texts(self) -> tuple[str, ...]:
        for role, texts in reversed(self.messages):
            if role == "user":
                return texts
        return ()


@dataclass(frozen=True, slots=True)
class Script:
    """Everything the emulator streams for one request.

    ``tokens`` are the deltas actually sent (already cut by maxTokens, a stop sequence, a
    guardrail or a mid-stream fault). ``stop_reason`` is None when no closing events are sent.
    ``ttft_ms``/``token_delay_ms`` are per-request overrides; None means the server's setting.
    """

    operation: Operation
    model_id: str
    tokens: tuple[str, ...]
    input_tokens: int
    stop_reason: StopReason | None
    stop_sequence: str | None
    fault: Fault | None
    ttft_ms: float | None
    token_delay_ms: float | None
    guardrail_trace: object | None

    @property
    def output_tokens(self) -> int:
        return len(self.tokens)

    @property
    def text(self) -> str:
        return "".join(self.tokens)


@dataclass(frozen=True)
class ExpectedReply:
    """What a client of the emulator receives for a request, for exact assertions in tests.

    ``tokens`` lists the delta texts in order and ``text`` is their concatenation. ``stop_reason``
    is None when the stream ends without ``messageStop`` (a mid-stream fault, ``cut``, ``stall``)
    and for HTTP faults, where ``tokens`` is empty.
    """

    text: str
    tokens: list[str] = field(default_factory=list)
    input_tokens: int = 0
    output_tokens: int = 0
    stop_reason: str | None = None
    stop_sequence: str | None = None
    fault: str | None = None


# Directives ------------------------------------------------------------------------------------


def _parse_delay(key: str, value: str) -> float:
    if not _DECIMAL.fullmatch(value):
        raise InvalidRequest(f"emulator directive {key} must be a non-negative number of milliseconds")
    delay = float(value)
    if not math.isfinite(delay) or delay > MAX_DELAY_MS:
        raise InvalidRequest(f"emulator directive {key} must be at most {MAX_DELAY_MS:.0f}")
    return delay


def _parse_count(key: str, value: str, minimum: int, maximum: int) -> int:
    if not _UNSIGNED.fullmatch(value) or not minimum <= int(value) <= maximum:
        raise InvalidRequest(f"emulator directive {key} must be an integer from {minimum} to {maximum}")
    return int(value)


def parse_directives(texts: Sequence[str]) -> Directives:
    """Read every ``[[emulator:key=value]]`` marker in ``texts``; raise InvalidRequest on any bad one."""
    values: dict[str, str] = {}
    for text in texts:
        for match in MARKER.finditer(text):
            key, separator, value = match.group(1).partition("=")
            if not separator or not _KEY.fullmatch(key):
                raise InvalidRequest(f"malformed emulator directive {match.group(0)!r}; expected key=value")
            if key in values:
                raise InvalidRequest(f"emulator directive {key} is given more than once")
            values[key] = value

    fault: Fault | None = None
    after: int | None = None
    tokens: int | None = None
    reply: str | None = None
    ttft_ms: float | None = None
    token_delay_ms: float | None = None
    guardrail_intervene = False
    fault_model: str | None = None
    for key, value in values.items():
        match key:
            case "fault":
                try:
                    fault = Fault(value)
                except ValueError:
                    choices = ", ".join(f.value for f in Fault)
                    raise InvalidRequest(f"unknown emulator fault {value!r}; use one of {choices}") from None
            case "after":
                after = _parse_count(key, value, 0, MAX_TOKENS_DIRECTIVE)
            case "tokens":
                tokens = _parse_count(key, value, 1, MAX_TOKENS_DIRECTIVE)
            case "reply":
                if not value.split():
                    raise InvalidRequest("emulator directive reply needs at least one word")
                reply = value
            case "ttft_ms":
                ttft_ms = _parse_delay(key, value)
            case "token_delay_ms":
                token_delay_ms = _parse_delay(key, value)
            case "fault_model":
                if not value.strip():
                    raise InvalidRequest("emulator directive fault_model needs a model id")
                fault_model = value.strip()
            case "guardrail":
                if value != "intervene":
                    raise InvalidRequest("emulator directive guardrail only accepts the value intervene")
                guardrail_intervene = True
            case _:
                raise InvalidRequest(f"unknown emulator directive {key!r}")

    if tokens is not None and reply is not None:
        raise InvalidRequest("emulator directives tokens and reply cannot be combined")
    if guardrail_intervene and fault is not None:
        raise InvalidRequest("emulator directives guardrail and fault cannot be combined")
    if after is not None and not guardrail_intervene and (fault is None or not fault.mid_stream):
        raise InvalidRequest("emulator directive after needs a mid-stream fault or guardrail=intervene")
    if fault_model is not None and fault is None:
        raise InvalidRequest("emulator directive fault_model needs a fault")
    return Directives(fault, after, tokens, reply, ttft_ms, token_delay_ms, guardrail_intervene, fault_model)


# Request bodies --------------------------------------------------------------------------------


def _object(value: object, where: str) -> Mapping[str, object]:
    if not isinstance(value, dict):
        raise InvalidRequest(f"{where} must be a JSON object")
    return value


def _optional_int(body: Mapping[str, object], key: str, where: str, *, required: bool = False) -> int | None:
    value = body.get(key)
    if value is None:
        if required:
            raise InvalidRequest(f"{where}{key} is required")
        return None
    # bool is an int subclass; JSON true is not a token count.
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InvalidRequest(f"{where}{key} must be an integer of at least 1")
    return value


def _optional_unit(body: Mapping[str, object], key: str, where: str) -> float | None:
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 1:
        raise InvalidRequest(f"{where}{key} must be a number from 0 to 1")
    return float(value)


def _stop_sequences(body: Mapping[str, object], key: str, where: str) -> tuple[str, ...]:
    value = body.get(key)
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(s, str) and s for s in value):
        raise InvalidRequest(f"{where}{key} must be a list of non-empty strings")
    return tuple(value)


def _messages(body: Mapping[str, object], *, anthropic: bool) -> tuple[tuple[str, tuple[str, ...]], ...]:
    raw = body.get("messages")
    if not isinstance(raw, list) or not raw:
        raise InvalidRequest("messages must be a non-empty list")
    messages: list[tuple[str, tuple[str, ...]]] = []
    for index, item in enumerate(raw):
        message = _object(item, f"messages[{index}]")
        role = message.get("role")
        if not isinstance(role, str) or role not in ("user", "assistant"):
            raise InvalidRequest(f"messages[{index}].role must be user or assistant")
        content = message.get("content")
        if anthropic and isinstance(content, str):
            messages.append((role, (content,)))
            continue
        if not isinstance(content, list):
            raise InvalidRequest(f"messages[{index}].content must be a list of content blocks")
        messages.append((role, _texts(content, f"messages[{index}].content", anthropic=anthropic)))
    if not any(role == "user" for role, _ in messages):
        raise InvalidRequest("messages must contain a user message")
    return tuple(messages)


def _texts(blocks: list[object], where: str, *, anthropic: bool) -> tuple[str, ...]:
    """The text of the text blocks; other blocks (images, tool use, cache points) carry no words here."""
    texts: list[str] = []
    for index, item in enumerate(blocks):
        block = _object(item, f"{where}[{index}]")
        if anthropic and block.get("type") != "text":
            continue
        if "text" not in block:
            continue
        text = block["text"]
        if not isinstance(text, str):
            raise InvalidRequest(f"{where}[{index}].text must be a string")
        texts.append(text)
    return tuple(texts)


def parse_converse(body: object) -> Prompt:
    """Read a Converse / ConverseStream request body."""
    request = _object(body, "the request body")
    system_blocks = request.get("system", [])
    if not isinstance(system_blocks, list):
        raise InvalidRequest("system must be a list of content blocks")
    config = _object(request.get("inferenceConfig", {}), "inferenceConfig")
    guardrail: Mapping[str, object] | None = None
    if request.get("guardrailConfig") is not None:
        guardrail = _object(request["guardrailConfig"], "guardrailConfig")
        for key in ("guardrailIdentifier", "guardrailVersion"):
            if not isinstance(guardrail.get(key), str) or not guardrail[key]:
                raise InvalidRequest(f"guardrailConfig.{key} is required")
    return Prompt(
        system=_texts(system_blocks, "system", anthropic=False),
        messages=_messages(request, anthropic=False),
        max_tokens=_optional_int(config, "maxTokens", "inferenceConfig."),
        stop_sequences=_stop_sequences(config, "stopSequences", "inferenceConfig."),
        temperature=_optional_unit(config, "temperature", "inferenceConfig."),
        top_p=_optional_unit(config, "topP", "inferenceConfig."),
        guardrail=guardrail,
    )


def parse_anthropic(body: object) -> Prompt:
    """Read an Anthropic messages body as InvokeModelWithResponseStream receives it.

    Bedrock requires ``anthropic_version`` and ``max_tokens`` in this body, so the emulator does too.
    """
    request = _object(body, "the request body")
    if not isinstance(request.get("anthropic_version"), str):
        raise InvalidRequest("anthropic_version is required")
    system = request.get("system")
    if system is None:
        system_texts: tuple[str, ...] = ()
    elif isinstance(system, str):
        system_texts = (system,)
    elif isinstance(system, list):
        system_texts = _texts(system, "system", anthropic=True)
    else:
        raise InvalidRequest("system must be a string or a list of content blocks")
    return Prompt(
        system=system_texts,
        messages=_messages(request, anthropic=True),
        max_tokens=_optional_int(request, "max_tokens", "", required=True),
        stop_sequences=_stop_sequences(request, "stop_sequences", ""),
        temperature=_optional_unit(request, "temperature", ""),
        top_p=_optional_unit(request, "top_p", ""),
    )


# The reply -------------------------------------------------------------------------------------


def count_words(texts: Sequence[str]) -> int:
    """The number of whitespace-separated words in ``texts``."""
    return sum(len(text.split()) for text in texts)


def count_input_tokens(prompt: Prompt) -> int:
    """Words of the system texts and of every message text block, markers included; at least 1."""
    message_texts = [text for _, texts in prompt.messages for text in texts]
    return max(1, count_words(prompt.system) + count_words(message_texts))


def _words_without_markers(text: str) -> str:
    return " ".join(MARKER.sub(" ", text).split())


def _seed(model_id: str, prompt: Prompt) -> bytes:
    # Markers are removed (and whitespace normalised) so adding a delay or a fault does not
    # change the words, and maxTokens is left out so a capped reply is a prefix of the uncapped one.
    material = {
        "model_id": model_id,
        "system": [_words_without_markers(text) for text in prompt.system],
        "messages": [[role, [_words_without_markers(t) for t in texts]] for role, texts in prompt.messages],
        "temperature": prompt.temperature,
        "top_p": prompt.top_p,
    }
    return hashlib.sha256(orjson.dumps(material, option=orjson.OPT_SORT_KEYS)).digest()


def generate_words(seed: bytes, count: int) -> list[str]:
    """``count`` vocabulary words from ``seed``; for one seed, fewer words are a prefix of more."""
    # SHAKE-256 output for a shorter length is a prefix of that for a longer one.
    return [VOCABULARY[byte % len(VOCABULARY)] for byte in hashlib.shake_256(seed).digest(count)]


def default_length(seed: bytes) -> int:
    """The reply length when no directive sets it: 16 to 48 tokens, from the seed."""
    span = MAX_DEFAULT_TOKENS - MIN_DEFAULT_TOKENS + 1
    return MIN_DEFAULT_TOKENS + int.from_bytes(seed[:4], "big") % span


def as_deltas(words: Sequence[str]) -> tuple[str, ...]:
    """One delta per word, with a leading space on every delta after the first."""
    return tuple(word if index == 0 else " " + word for index, word in enumerate(words))


def _guardrail_trace(prompt: Prompt, deltas: Sequence[str]) -> object | None:
    guardrail = prompt.guardrail
    if guardrail is None or guardrail.get("trace") not in ("enabled", "enabled_full"):
        return None
    # A GuardrailTraceAssessment (bedrock-runtime service model) with one blocking content filter.
    assessment = {
        "contentPolicy": {
            "filters": [
                {
                    "type": "MISCONDUCT",
                    "confidence": "HIGH",
                    "filterStrength": "HIGH",
                    "action": "BLOCKED",
                    "detected": True,
                }
            ]
        }
    }
    return {
        "modelOutput": ["".join(deltas)],
        "outputAssessments": {str(guardrail["guardrailIdentifier"]): [assessment]},
        "actionReason": "Guardrail blocked.",
    }


def build_script(operation: Operation, model_id: str, body: object) -> Script:
    """The script for one request; raises InvalidRequest for a body or directive Bedrock would refuse."""
    match operation:
        case Operation.CONVERSE_STREAM:
            prompt = parse_converse(body)
        case Operation.INVOKE_WITH_RESPONSE_STREAM:
            prompt = parse_anthropic(body)
        case _:
            assert_never(operation)
    if not model_id:
        raise InvalidRequest("modelId is required")
    directives = parse_directives(prompt.last_user_texts)
    input_tokens = count_input_tokens(prompt)
    fault = directives.fault
    if directives.fault_model is not None and not model_id.endswith(directives.fault_model):
        fault = None  # aimed at another model: this one answers normally

    if fault is not None and not fault.mid_stream:
        return Script(operation, model_id, (), input_tokens, None, None, fault, None, None, None)

    seed = _seed(model_id, prompt)
    if directives.reply is not None:
        words = directives.reply.split()
    else:
        words = generate_words(seed, directives.tokens or default_length(seed))

    stop_reason = StopReason.END_TURN
    stop_sequence: str | None = None
    for index, word in enumerate(words):
        if word in prompt.stop_sequences:
            words, stop_reason, stop_sequence = words[:index], StopReason.STOP_SEQUENCE, word
            break
    if prompt.max_tokens is not None and len(words) > prompt.max_tokens:
        words, stop_reason, stop_sequence = words[: prompt.max_tokens], StopReason.MAX_TOKENS, None

    after = DEFAULT_AFTER if directives.after is None else directives.after
    final_reason: StopReason | None = stop_reason
    trace: object | None = None
    if fault is not None:
        words, final_reason, stop_sequence = words[:after], None, None
    elif directives.guardrail_intervene and prompt.guardrail is not None:
        words, final_reason, stop_sequence = words[:after], StopReason.GUARDRAIL_INTERVENED, None
        trace = _guardrail_trace(prompt, as_deltas(words))

    return Script(
        operation=operation,
        model_id=model_id,
        tokens=as_deltas(words),
        input_tokens=input_tokens,
        stop_reason=final_reason,
        stop_sequence=stop_sequence,
        fault=fault,
        ttft_ms=directives.ttft_ms,
        token_delay_ms=directives.token_delay_ms,
        guardrail_trace=trace,
    )


def expected_reply(
    model_id: str, body: Mapping[str, object], operation: Operation | None = None
) -> ExpectedReply:
    """What the emulator streams for ``body`` sent to ``model_id`` (the decoded id, e.g. an ARN).

    ``operation`` defaults to InvokeModelWithResponseStream when the body has ``anthropic_version``
    and to ConverseStream otherwise. Raises InvalidRequest when the emulator would answer 400.
    """
    if operation is None:
        anthropic = "anthropic_version" in body
        operation = Operation.INVOKE_WITH_RESPONSE_STREAM if anthropic else Operation.CONVERSE_STREAM
    script = build_script(operation, model_id, body)
    return ExpectedReply(
        text=script.text,
        tokens=list(script.tokens),
        input_tokens=script.input_tokens,
        output_tokens=script.output_tokens,
        stop_reason=None if script.stop_reason is None else script.stop_reason.value,
        stop_sequence=script.stop_sequence,
        fault=None if script.fault is None else script.fault.value,
    )
