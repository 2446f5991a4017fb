"""The pure parts of the Bedrock provider: ConverseStream arguments and error-code mapping."""

from __future__ import annotations

import pytest

from hubgate.errors import RequestError, UpstreamError, UpstreamThrottled, UpstreamTimeout
from hubgate.providers.base import ProviderRequest, Turn
from hubgate.providers.bedrock import converse_arguments, map_error_code

MODEL = "amazon.nova-lite-v1:0"


def request(**fields: object) -> ProviderRequest:
    base: dict[str, object] = {"model": MODEL, "messages": (Turn("user", "hi"),), "max_tokens": 256}
    base.update(fields)
    return ProviderRequest(**base)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- converse_arguments


def test_minimal_request() -> None:
    assert converse_arguments(request()) == {
        "modelId": MODEL,
        "messages": [{"role": "user", "content": [{"text": "hi"}]}],
        "inferenceConfig": {"maxTokens": 256},
    }


def test_conversation_keeps_order_and_roles() -> None:
    turns = (Turn("user", "a"), Turn("assistant", "b"), Turn("user", "c"))
    assert converse_arguments(request(messages=turns))["messages"] == [
        {"role": "user", "content": [{"text": "a"}]},
        {"role": "assistant", "content": [{"text": "b"}]},
        {"role": "user", "content": [{"text": "c"}]},
    ]


def test_system_prompt_is_a_list_of_text_blocks() -> None:
    assert converse_arguments(request(system="Be brief."))["system"] == [{"text": "Be brief."}]


@pytest.mark.parametrize("system", [None, ""])
def test_no_system_key_without_a_prompt(system: str | None) -> None:
    assert "system" not in converse_arguments(request(system=system))


def test_full_inference_config() -> None:
    kwargs = converse_arguments(request(temperature=0.7, top_p=0.9, stop=("\n\nHuman:", "END")))
    assert kwargs["inferenceConfig"] == {
        "maxTokens": 256,
        "temperature": 0.7,
        "topP": 0.9,
        "stopSequences": ["\n\nHuman:", "END"],
    }


def test_zero_sampling_values_are_sent() -> None:
    # 0.0 is a real setting (greedy decoding), not "unset".
    config = converse_arguments(request(temperature=0.0, top_p=0.0))["inferenceConfig"]
    assert config["temperature"] == 0.0
    assert config["topP"] == 0.0


def test_no_stop_sequences_key_when_empty() -> None:
    assert "stopSequences" not in converse_arguments(request(stop=()))["inferenceConfig"]


def test_stop_sequences_are_a_list() -> None:
    assert isinstance(converse_arguments(request(stop=("x",)))["inferenceConfig"]["stopSequences"], list)


def test_arguments_are_only_the_converse_stream_parameters() -> None:
    kwargs = converse_arguments(request(system="s", temperature=0.1, top_p=0.2, stop=("x",)))
    assert set(kwargs) == {"modelId", "messages", "inferenceConfig", "system"}


# --------------------------------------------------------------------------- map_error_code


@pytest.mark.parametrize(
    "code",
    [
        "ThrottlingException",
        "throttlingException",
        "ServiceQuotaExceededException",
        "serviceQuotaExceededException",
        "TooManyRequestsException",
        "ServiceUnavailableException",
        "serviceUnavailableException",
    ],
)
def test_capacity_codes_are_throttling(code: str) -> None:
    error = map_error_code(code)
    assert type(error) is UpstreamThrottled
    assert error.code == "upstream_throttled"
    assert code in error.message


def test_http_429_is_throttling_whatever_the_code() -> None:
    assert type(map_error_code("ModelNotReadyException", 429)) is UpstreamThrottled
    assert type(map_error_code("", 429)) is UpstreamThrottled


@pytest.mark.parametrize("code", ["ModelTimeoutException", "modelTimeoutException"])
def test_model_timeout(code: str) -> None:
    error = map_error_code(code, 408)
    assert type(error) is UpstreamTimeout
    assert error.code == "upstream_timeout"


@pytest.mark.parametrize(
    ("code", "status"),
    [
        ("ValidationException", 400),
        ("validationException", None),
        ("AccessDeniedException", 403),
        ("ResourceNotFoundException", 404),
        ("ModelErrorException", 424),
        ("InternalServerException", 500),
        ("internalServerException", None),
        ("modelStreamErrorException", None),
        ("SomethingNewException", 418),
    ],
)
def test_other_codes_are_upstream_errors(code: str, status: int | None) -> None:
    error = map_error_code(code, status)
    assert type(error) is UpstreamError
    assert error.code == "upstream_error"
    assert code in error.message


def test_codes_are_case_sensitive_beyond_the_first_letter() -> None:
    assert type(map_error_code("THROTTLINGEXCEPTION")) is UpstreamError


def test_unknown_error_without_a_code() -> None:
    assert map_error_code("").message == "Bedrock refused the request (unknown error)"
    assert map_error_code("", 502).message == "Bedrock refused the request (502)"


def test_mapped_errors_are_request_errors() -> None:
    # The gateway reports them as `error` frames on the request; the connection stays open.
    for code in ("ThrottlingException", "ModelTimeoutException", "ValidationException"):
        assert isinstance(map_error_code(code), RequestError)
        assert map_error_code(code).retry_after is None
