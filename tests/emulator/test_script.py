"""Reply scripts: determinism, length rules, token counting and every directive, without a server."""

from __future__ import annotations

from typing import Any

import botocore.session
import pytest

from hubgate.emulator import ExpectedReply, InvalidRequest, Operation, expected_reply
from hubgate.emulator.script import (
    DEFAULT_AFTER,
    MAX_DEFAULT_TOKENS,
    MIN_DEFAULT_TOKENS,
    VOCABULARY,
    Fault,
    StopReason,
    build_script,
    parse_directives,
)

HAIKU = "anthropic.claude-3-5-haiku-20241022-v1:0"
CONVERSE = Operation.CONVERSE_STREAM
INVOKE = Operation.INVOKE_WITH_RESPONSE_STREAM
HI: dict[str, Any] = {"messages": [{"role": "user", "content": [{"text": "hi"}]}]}


def converse(text: str, *, system: str | None = None, **inference: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"messages": [{"role": "user", "content": [{"text": text}]}]}
    if system is not None:
        body["system"] = [{"text": system}]
    if inference:
        body["inferenceConfig"] = inference
    return body


def anthropic(text: str, *, max_tokens: int = 1000, system: str | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {
        "anthropic_version": "bedrock-2023-05-31",
        "max_tokens": max_tokens,
        "messages": [{"role": "user", "content": text}],
    }
    if system is not None:
        body["system"] = system
    return body


def reply(text: str, **inference: Any) -> ExpectedReply:
    return expected_reply(HAIKU, converse(text, **inference))


# Determinism and shape -------------------------------------------------------------------------


def test_same_request_same_reply_and_different_prompts_differ() -> None:
    assert reply("Tell me about lighthouses") == reply("Tell me about lighthouses")
    assert reply("Tell me about lighthouses").text != reply("Tell me about harbours").text
    assert expected_reply("other.model-v1", converse("hi")).text != reply("hi").text
    assert reply("hi", temperature=0.2).text != reply("hi", temperature=0.9).text
    system_a = expected_reply(HAIKU, converse("hi", system="Be brief."))
    assert system_a.text != reply("hi").text


def test_each_token_is_one_vocabulary_word_with_a_leading_space_after_the_first() -> None:
    result = reply("Tell me a story")
    assert MIN_DEFAULT_TOKENS <= len(result.tokens) <= MAX_DEFAULT_TOKENS
    assert result.tokens[0] in VOCABULARY
    assert all(token.startswith(" ") and token[1:] in VOCABULARY for token in result.tokens[1:])
    assert result.text == "".join(result.tokens) == " ".join(token.strip() for token in result.tokens)
    assert result.output_tokens == len(result.tokens)
    assert result.stop_reason == "end_turn" and result.fault is None


def test_vocabulary_has_128_distinct_words() -> None:
    assert len(VOCABULARY) == len(set(VOCABULARY)) == 128
    assert all(word.isalpha() and word.islower() for word in VOCABULARY)


def test_default_lengths_spread_across_the_range() -> None:
    lengths = {len(reply(f"prompt number {n}").tokens) for n in range(200)}
    assert min(lengths) >= MIN_DEFAULT_TOKENS and max(lengths) <= MAX_DEFAULT_TOKENS
    assert len(lengths) > 20


def test_max_tokens_cuts_the_reply_to_a_prefix() -> None:
    full = reply("a long answer please [[emulator:tokens=30]]")
    capped = reply("a long answer please [[emulator:tokens=30]]", maxTokens=7)
    assert capped.tokens == full.tokens[:7]
    assert capped.stop_reason == "max_tokens" and capped.output_tokens == 7
    exact = reply("a long answer please [[emulator:tokens=30]]", maxTokens=30)
    assert exact.tokens == full.tokens and exact.stop_reason == "end_turn"


def test_max_tokens_does_not_change_the_words() -> None:
    full = reply("same words")
    assert reply("same words", maxTokens=3).tokens == full.tokens[:3]


def test_stop_sequence_ends_before_the_matching_word() -> None:
    result = reply("[[emulator:reply=one two STOP three]]", stopSequences=["STOP"])
    assert result.tokens == ["one", " two"]
    assert result.stop_reason == "stop_sequence" and result.stop_sequence == "STOP"
    capped_first = reply("[[emulator:reply=one two STOP three]]", stopSequences=["STOP"], maxTokens=1)
    assert capped_first.tokens == ["one"] and capped_first.stop_reason == "max_tokens"


# Token counting --------------------------------------------------------------------------------


def test_input_tokens_count_system_and_every_message_including_markers() -> None:
    body = {
        "system": [{"text": "You are  terse."}, {"text": "Answer in English"}],
        "messages": [
            {"role": "user", "content": [{"text": "first question"}, {"image": {"format": "png"}}]},
            {"role": "assistant", "content": [{"text": "an answer\nover lines"}]},
            {"role": "user", "content": [{"text": "again [[emulator:tokens=5]]"}]},
        ],
    }
    result = expected_reply(HAIKU, body)
    assert result.input_tokens == 3 + 3 + 2 + 4 + 2
    assert result.output_tokens == 5


def test_input_tokens_are_at_least_one() -> None:
    assert reply("").input_tokens == 1
    assert reply("   ").input_tokens == 1


def test_anthropic_body_counts_like_converse_and_says_the_same() -> None:
    via_invoke = expected_reply(HAIKU, anthropic("tell me more", system="Be brief."))
    via_converse = expected_reply(HAIKU, converse("tell me more", system="Be brief."))
    assert via_invoke.text == via_converse.text
    assert via_invoke.input_tokens == via_converse.input_tokens == 5
    blocks = anthropic("ignored")
    blocks["messages"] = [{"role": "user", "content": [{"type": "text", "text": "tell me more"}]}]
    blocks["system"] = [{"type": "text", "text": "Be brief."}]
    assert expected_reply(HAIKU, blocks).text == via_invoke.text


def test_anthropic_max_tokens_caps() -> None:
    result = expected_reply(HAIKU, anthropic("hello [[emulator:tokens=10]]", max_tokens=4))
    assert result.output_tokens == 4 and result.stop_reason == "max_tokens"


# Directives ------------------------------------------------------------------------------------


def test_markers_do_not_change_the_words() -> None:
    plain = reply("hello world [[emulator:tokens=40]]")
    delayed = reply("hello world [[emulator:tokens=40]] [[emulator:ttft_ms=5]]")
    assert delayed.tokens == plain.tokens
    assert reply("hello world [[emulator:tokens=4]]").tokens == plain.tokens[:4]


def test_tokens_sets_the_exact_length() -> None:
    assert reply("x [[emulator:tokens=1]]").tokens == [reply("x [[emulator:tokens=1]]").tokens[0]]
    assert reply("x [[emulator:tokens=200]]").output_tokens == 200


def test_reply_makes_the_model_say_text_word_by_word() -> None:
    result = reply("say it [[emulator:reply=<script>alert(1)</script> and  then  some]]")
    assert result.tokens == ["<script>alert(1)</script>", " and", " then", " some"]
    assert result.text == "<script>alert(1)</script> and then some"
    assert reply("[[emulator:reply=a b c d e]]", maxTokens=2).tokens == ["a", " b"]


def test_directives_are_read_from_the_last_user_message_only() -> None:
    body = {
        "system": [{"text": "[[emulator:fault=throttling]]"}],
        "messages": [
            {"role": "user", "content": [{"text": "[[emulator:fault=internal]]"}]},
            {"role": "assistant", "content": [{"text": "[[emulator:fault=stall]]"}]},
            {"role": "user", "content": [{"text": "plain"}, {"text": "[[emulator:tokens=2]]"}]},
        ],
    }
    result = expected_reply(HAIKU, body)
    assert result.fault is None and result.output_tokens == 2
    trailing_assistant = {**body, "messages": [*body["messages"], {"role": "assistant", "content": []}]}
    assert expected_reply(HAIKU, trailing_assistant).output_tokens == 2


def test_delays_are_per_request_overrides() -> None:
    script = build_script(
        CONVERSE, HAIKU, converse("[[emulator:ttft_ms=250]] [[emulator:token_delay_ms=12.5]]")
    )
    assert script.ttft_ms == 250.0 and script.token_delay_ms == 12.5
    assert build_script(CONVERSE, HAIKU, converse("none")).ttft_ms is None


@pytest.mark.parametrize(
    "fault", ["throttling", "validation", "access_denied", "unavailable", "internal", "not_found"]
)
def test_http_faults_stream_nothing(fault: str) -> None:
    result = reply(f"go [[emulator:fault={fault}]]")
    assert result.fault == fault and result.tokens == [] and result.stop_reason is None


def test_http_fault_statuses_match_the_service_models_error_shapes() -> None:
    model = botocore.session.get_session().get_service_model("bedrock-runtime")
    errors = {shape.name: shape for shape in model.operation_model("ConverseStream").error_shapes}
    for fault in Fault:
        http_error = fault.http_error
        if http_error is None:
            continue
        assert http_error.error_type in errors
        assert errors[http_error.error_type].metadata["error"]["httpStatusCode"] == http_error.status


@pytest.mark.parametrize(
    "fault",
    ["stream_throttling", "stream_model_error", "stream_validation", "stream_unavailable", "cut", "stall"],
)
def test_mid_stream_faults_strike_after_n_tokens(fault: str) -> None:
    full = reply("go [[emulator:tokens=10]]")
    default = reply(f"go [[emulator:tokens=10]] [[emulator:fault={fault}]]")
    assert default.tokens == full.tokens[:DEFAULT_AFTER] and default.stop_reason is None
    assert default.fault == fault
    marker = f"[[emulator:fault={fault}]]"
    assert reply(f"go [[emulator:tokens=10]] {marker} [[emulator:after=7]]").output_tokens == 7
    assert reply(f"go {marker} [[emulator:after=0]]").tokens == []
    assert reply(f"go [[emulator:tokens=2]] {marker} [[emulator:after=5]]").output_tokens == 2


def test_stream_exceptions_are_members_of_both_output_unions() -> None:
    model = botocore.session.get_session().get_service_model("bedrock-runtime")
    unions = [
        model.shape_for("ConverseStreamOutput").members,
        model.shape_for("ResponseStream").members,
    ]
    for fault in Fault:
        if fault.stream_exception is not None:
            assert all(fault.stream_exception in union for union in unions)


def test_guardrail_intervenes_only_with_a_guardrail_config() -> None:
    text = "go [[emulator:tokens=10]] [[emulator:guardrail=intervene]] [[emulator:after=4]]"
    without = reply(text)
    assert without.stop_reason == "end_turn" and without.output_tokens == 10

    body = converse(text)
    body["guardrailConfig"] = {"guardrailIdentifier": "gr-1", "guardrailVersion": "1"}
    result = expected_reply(HAIKU, body)
    assert result.stop_reason == "guardrail_intervened" and result.output_tokens == 4
    assert build_script(CONVERSE, HAIKU, body).guardrail_trace is None

    body["guardrailConfig"]["trace"] = "enabled"
    trace = build_script(CONVERSE, HAIKU, body).guardrail_trace
    assert isinstance(trace, dict)
    assert trace["modelOutput"] == [result.text]
    assert list(trace["outputAssessments"]) == ["gr-1"]


def test_parse_directives_defaults() -> None:
    directives = parse_directives(["no markers here", "[[emulator:fault=cut]]"])
    assert directives.fault is Fault.CUT and directives.after is None and directives.tokens is None


@pytest.mark.parametrize(
    "marker",
    [
        "[[emulator:fault=bogus]]",
        "[[emulator:fault=]]",
        "[[emulator:tokens=0]]",
        "[[emulator:tokens=-1]]",
        "[[emulator:tokens=abc]]",
        "[[emulator:tokens=1.5]]",
        "[[emulator:tokens=100001]]",
        "[[emulator:ttft_ms=-5]]",
        "[[emulator:ttft_ms=nan]]",
        "[[emulator:ttft_ms=inf]]",
        "[[emulator:token_delay_ms=1e3]]",
        "[[emulator:token_delay_ms=600001]]",
        "[[emulator:reply=   ]]",
        "[[emulator:guardrail=maybe]]",
        "[[emulator:colour=blue]]",
        "[[emulator:fault]]",
        "[[emulator:FAULT=cut]]",
        "[[emulator:tokens=3]] [[emulator:tokens=4]]",
        "[[emulator:tokens=3]] [[emulator:reply=a b]]",
        "[[emulator:guardrail=intervene]] [[emulator:fault=cut]]",
        "[[emulator:after=2]]",
        "[[emulator:fault=throttling]] [[emulator:after=2]]",
        "[[emulator:after=x]] [[emulator:fault=cut]]",
    ],
)
def test_bad_directives_are_refused(marker: str) -> None:
    with pytest.raises(InvalidRequest) as caught:
        reply(f"hello {marker}")
    assert "emulator directive" in caught.value.message or "emulator fault" in caught.value.message


# Bodies ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "body",
    [
        [],
        {},
        {"messages": []},
        {"messages": "hi"},
        {"messages": [{"role": "system", "content": [{"text": "hi"}]}]},
        {"messages": [{"role": "assistant", "content": [{"text": "hi"}]}]},
        {"messages": [{"role": "user", "content": "not blocks"}]},
        {"messages": [{"role": "user", "content": [{"text": 5}]}]},
        {"messages": [{"role": "user", "content": ["text"]}]},
        {**HI, "system": "plain"},
        {**HI, "inferenceConfig": {"maxTokens": 0}},
        {**HI, "inferenceConfig": {"maxTokens": True}},
        {**HI, "inferenceConfig": {"temperature": 2}},
        {**HI, "inferenceConfig": {"stopSequences": [""]}},
        {**HI, "inferenceConfig": []},
        {**HI, "guardrailConfig": {"guardrailVersion": "1"}},
    ],
)
def test_bad_converse_bodies_are_refused(body: Any) -> None:
    with pytest.raises(InvalidRequest):
        build_script(CONVERSE, HAIKU, body)


@pytest.mark.parametrize(
    "change",
    [
        {"anthropic_version": None},
        {"max_tokens": None},
        {"max_tokens": 0},
        {"system": 5},
        {"top_p": -0.1},
        {"stop_sequences": "END"},
    ],
)
def test_bad_anthropic_bodies_are_refused(change: dict[str, Any]) -> None:
    body = {key: value for key, value in {**anthropic("hi"), **change}.items() if value is not None}
    with pytest.raises(InvalidRequest):
        build_script(INVOKE, HAIKU, body)


def test_empty_model_id_is_refused() -> None:
    with pytest.raises(InvalidRequest):
        build_script(CONVERSE, "", converse("hi"))


def test_expected_reply_picks_the_operation_from_the_body() -> None:
    body = anthropic("hello [[emulator:tokens=9]]", max_tokens=3)
    assert expected_reply(HAIKU, body).stop_reason == StopReason.MAX_TOKENS
    with pytest.raises(InvalidRequest):
        # Read as a Converse body, a string content is not a list of blocks.
        expected_reply(HAIKU, body, Operation.CONVERSE_STREAM)
