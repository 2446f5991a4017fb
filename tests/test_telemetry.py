"""OpenTelemetry spans (the `otel` extra) as a collector would receive them."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from hubgate.telemetry import build_recorder
from tests.conftest import ws_url
from tests.support.client import Client
from tests.support.emulator_server import EmulatorServer
from tests.support.gateway_server import gateway_settings, running_gateway

Mint = Callable[..., str]


@pytest.fixture(scope="module")
def exporter() -> Iterator[InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    trace.set_tracer_provider(provider)  # once per process, as an application would
    yield exporter


def test_disabled_means_no_recorder() -> None:
    assert build_recorder(False) is None


async def test_spans_follow_the_genai_conventions(
    emulator: EmulatorServer, mint: Mint, exporter: InMemorySpanExporter
) -> None:
    settings = gateway_settings(emulator.url, otel_enabled=True)
    async with running_gateway(settings):
        client = await Client.open(ws_url(settings), mint())
        done = await client.chat("traced", "[[emulator:tokens=6]]")
        await client.chat("broken", "[[emulator:fault=stream_model_error]] [[emulator:after=1]]")
        await client.close()
    spans = {s.attributes["hubgate.request_id"]: s for s in exporter.get_finished_spans()}
    ok = spans["traced"]
    assert ok.name == "chat anthropic.claude-3-5-haiku-20241022-v1:0"
    assert ok.attributes["gen_ai.provider.name"] == "aws.bedrock"
    assert ok.attributes["gen_ai.request.model"] == "anthropic.claude-3-5-haiku-20241022-v1:0"
    assert ok.attributes["gen_ai.usage.output_tokens"] == 6
    assert ok.attributes["gen_ai.usage.input_tokens"] == done[-1]["usage"]["input_tokens"]
    assert ok.attributes["gen_ai.response.finish_reasons"] == ("end_turn",)
    assert ok.attributes["gen_ai.server.time_to_first_token"] > 0
    assert [e.name for e in ok.events] == ["gen_ai.first_chunk"]
    assert ok.end_time > ok.start_time
    failed = spans["broken"]
    assert failed.attributes["error.type"] == "upstream_error"
    assert failed.status.status_code == trace.StatusCode.ERROR
