"""Retries before the first token, fallback models, and guardrail interventions."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from hubgate.providers.base import Guardrail
from hubgate.streams import RetryPolicy
from hubgate.tenants import Tenant, TenantRegistry
from tests.conftest import ws_url
from tests.support.client import Client, text_of
from tests.support.emulator_server import EmulatorServer
from tests.support.gateway_server import gateway_settings, running_gateway

Mint = Callable[..., str]
HAIKU = "anthropic.claude-3-5-haiku-20241022-v1:0"
NOVA = "amazon.nova-lite-v1:0"
PRO = "amazon.nova-pro-v1:0"


def registry(**tenant: Any) -> TenantRegistry:
    base = Tenant(id="fb", name="fb", enabled=True, models=(HAIKU, NOVA, PRO), default_model=HAIKU)
    return TenantRegistry({"fb": Tenant(**{**_fields(base), **tenant})})


def _fields(tenant: Tenant) -> dict[str, Any]:
    return {name: getattr(tenant, name) for name in tenant.__dataclass_fields__}


def test_full_jitter_stays_within_the_cap() -> None:
    policy = RetryPolicy(attempts=5, base=0.1, cap=0.5)
    for attempt in range(8):
        for _ in range(50):
            assert 0.0 <= policy.delay(attempt) <= min(0.5, 0.1 * 2**attempt)


async def test_throttled_model_is_retried_then_the_fallback_serves(
    emulator: EmulatorServer, mint: Mint
) -> None:
    settings = gateway_settings(emulator.url, upstream_retry_attempts=3, upstream_retry_base_ms=10)
    async with running_gateway(settings, tenants=registry(fallbacks=(PRO, NOVA))) as server:
        client = await Client.open(ws_url(settings), mint("fb"))
        marker = f"fb{time.time_ns()}"
        frames = await client.chat(
            "f", f"{marker} [[emulator:fault=throttling]] [[emulator:fault_model={HAIKU}]]"
        )
        await client.close()
        scrape = server.hub_app.state.services.metrics.render().decode()
    assert frames[0]["type"] == "start" and frames[0]["model"] == PRO  # names the model that serves
    assert frames[-1]["type"] == "end"
    seen = [r["model_id"] for r in await emulator.requests_with(marker)]
    assert seen == [HAIKU, HAIKU, HAIKU, PRO]  # three attempts, then the first fallback
    assert f'hubgate_upstream_attempts_total{{model="{HAIKU}",outcome="upstream_throttled"}} 3.0' in scrape
    assert f'hubgate_upstream_attempts_total{{model="{PRO}",outcome="ok"}} 1.0' in scrape


async def test_every_model_throttled_ends_with_one_error(emulator: EmulatorServer, mint: Mint) -> None:
    settings = gateway_settings(emulator.url, upstream_retry_attempts=2, upstream_retry_base_ms=10)
    async with running_gateway(settings, tenants=registry(fallbacks=(NOVA,))):
        client = await Client.open(ws_url(settings), mint("fb"))
        marker = f"all{time.time_ns()}"
        frames = await client.chat("a", f"{marker} [[emulator:fault=throttling]]")
        await client.close()
    assert [f["type"] for f in frames] == ["error"] and frames[0]["code"] == "upstream_throttled"
    assert len(await emulator.requests_with(marker)) == 4


async def test_nothing_is_retried_after_the_first_token(emulator: EmulatorServer, mint: Mint) -> None:
    settings = gateway_settings(emulator.url, upstream_retry_base_ms=10)
    async with running_gateway(settings, tenants=registry(fallbacks=(NOVA,))) as server:
        client = await Client.open(ws_url(settings), mint("fb"))
        marker = f"mid{time.time_ns()}"
        frames = await client.chat("m", f"{marker} [[emulator:fault=stream_throttling]] [[emulator:after=4]]")
        await client.close()
        records = list(server.hub_app.state.services.meter.recent)
    assert (
        frames[-1]["code"] == "upstream_throttled" and len([f for f in frames if f["type"] == "delta"]) == 4
    )
    assert len(await emulator.requests_with(marker)) == 1
    record = next(r for r in records if r.request_id == "m")
    assert record.output_tokens == 4 and record.estimated  # partial usage is metered


async def test_validation_errors_are_not_retried(emulator: EmulatorServer, mint: Mint) -> None:
    settings = gateway_settings(emulator.url, upstream_retry_base_ms=10)
    async with running_gateway(settings, tenants=registry(fallbacks=(NOVA,))):
        client = await Client.open(ws_url(settings), mint("fb"))
        marker = f"val{time.time_ns()}"
        frames = await client.chat("v", f"{marker} [[emulator:fault=validation]]")
        await client.close()
    assert frames[-1]["code"] == "upstream_error"
    assert len(await emulator.requests_with(marker)) == 1


async def test_guardrail_is_sent_and_its_intervention_reported(emulator: EmulatorServer, mint: Mint) -> None:
    settings = gateway_settings(emulator.url)
    guardrail = Guardrail(id="gr-123", version="2", stream_mode="sync")
    async with running_gateway(settings, tenants=registry(guardrail=guardrail)) as server:
        client = await Client.open(ws_url(settings), mint("fb"))
        marker = f"gr{time.time_ns()}"
        frames = await client.chat("g", f"{marker} [[emulator:guardrail=intervene]] [[emulator:after=2]]")
        await client.close()
        scrape = server.hub_app.state.services.metrics.render().decode()
    sent = (await emulator.requests_with(marker))[-1]["body"]
    assert sent["guardrailConfig"] == {
        "guardrailIdentifier": "gr-123",
        "guardrailVersion": "2",
        "streamProcessingMode": "sync",
    }
    assert frames[-1]["type"] == "end" and frames[-1]["stop_reason"] == "guardrail_intervened"
    assert len(text_of(frames).split()) == 2
    assert 'outcome="guardrail_intervened"' in scrape
