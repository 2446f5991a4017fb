"""Metering, cost, budgets, /metrics, the usage API and what the logs may contain."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from hubgate.gateway import Services
from hubgate.metering import (
    DEFAULT_PRICES,
    Budget,
    Price,
    PriceConfigError,
    Spend,
    UsageRecord,
    UsageRow,
    budget_fraction,
    cost_usd,
    crossed_threshold,
    emf_document,
    group_rows,
    parse_prices,
    price_for,
)
from hubgate.server import EmbeddedServer
from tests.conftest import ws_url
from tests.support.client import Client
from tests.support.emulator_server import EmulatorServer
from tests.support.gateway_server import GatewayProcess, free_port, gateway_settings, running_gateway
from tests.support.redis_server import RedisServer

Mint = Callable[..., str]
HAIKU = "anthropic.claude-3-5-haiku-20241022-v1:0"


def record(**changes: Any) -> UsageRecord:
    base = UsageRecord(
        request_id="r",
        connection_id="c",
        tenant="acme",
        user="u",
        model=HAIKU,
        input_tokens=100,
        output_tokens=50,
        estimated=False,
        ttft_ms=12.5,
        duration_ms=80.0,
        stop_reason="end_turn",
        error_code=None,
        timestamp=1_795_000_000.0,
        cost_usd=0.00028,
    )
    return UsageRecord(**{**base.as_dict(), **changes})


def services_of(server: EmbeddedServer) -> Services:
    services: Services = server.hub_app.state.services
    return services


# ---------------------------------------------------------------------------- pure


def test_emf_document_is_valid_embedded_metric_format() -> None:
    document = emf_document(record(), "hubgate")
    directive = document["_aws"]["CloudWatchMetrics"][0]
    assert isinstance(document["_aws"]["Timestamp"], int)
    assert directive["Namespace"] == "hubgate"
    assert directive["Dimensions"] == [["Tenant"], ["Tenant", "Model"]]
    for dimension_set in directive["Dimensions"]:
        for name in dimension_set:
            assert isinstance(document[name], str)
    names = {m["Name"] for m in directive["Metrics"]}
    assert names == {"InputTokens", "OutputTokens", "CostUSD", "TTFT", "Duration"}
    for metric in directive["Metrics"]:
        assert isinstance(document[metric["Name"]], int | float)
    assert "request_id" in document
    assert "request_id" not in {name for names in directive["Dimensions"] for name in names}
    no_ttft = emf_document(record(ttft_ms=None), "hubgate")
    assert "TTFT" not in no_ttft and all(
        m["Name"] != "TTFT" for m in no_ttft["_aws"]["CloudWatchMetrics"][0]["Metrics"]
    )


def test_prices() -> None:
    haiku = DEFAULT_PRICES[HAIKU]
    assert cost_usd(haiku, 1000, 1000) == pytest.approx(haiku.input_per_1k + haiku.output_per_1k)
    assert price_for(DEFAULT_PRICES, f"us.{HAIKU}") == haiku
    assert price_for(DEFAULT_PRICES, f"arn:aws:bedrock:us-east-1:1:inference-profile/us.{HAIKU}") == haiku
    assert price_for(DEFAULT_PRICES, "unknown.model") is None and cost_usd(None, 10, 10) == 0.0
    assert parse_prices({"m": {"input_per_1k": 1, "output_per_1k": 2.5}}) == {"m": Price(1.0, 2.5)}
    for bad in ({"m": {"input_per_1k": -1, "output_per_1k": 1}}, {"m": {"input_per_1k": 1}}, ["m"]):
        with pytest.raises(PriceConfigError):
            parse_prices(bad)


def test_budget_arithmetic() -> None:
    budget = Budget(usd=10.0, tokens=1000)
    assert budget_fraction(budget, Spend(tokens=500, cost_usd=9.0)) == pytest.approx(0.9)
    assert budget_fraction(Budget(tokens=0), Spend()) == float("inf")
    assert crossed_threshold(0.5, 0.85) == 0.8
    assert crossed_threshold(0.5, 0.97) == 0.95
    assert crossed_threshold(0.81, 0.9) is None


def test_group_rows() -> None:
    rows = [
        UsageRow("2026-11-01", "a", "u1", 1, 10, 5, 0.5, 0),
        UsageRow("2026-11-02", "a", "u2", 2, 20, 10, 1.0, 1),
        UsageRow("2026-11-02", "b", "u1", 1, 1, 1, 0.25, 0),
    ]
    by_model = group_rows(rows, "model")
    assert [(r["model"], r["requests"], r["input_tokens"], r["errors"]) for r in by_model] == [
        ("a", 3, 30, 1),
        ("b", 1, 1, 0),
    ]
    assert [r["user"] for r in group_rows(rows, "user")] == ["u1", "u2"]
    assert sum(r["cost_usd"] for r in group_rows(rows, "day")) == pytest.approx(1.75)


# ---------------------------------------------------------------------------- records through the gateway


def slow(request_id: str, words: int, **fields: Any) -> dict[str, Any]:
    text = " ".join(f"m{i}" for i in range(words))
    content = f"[[emulator:reply={text}]] [[emulator:token_delay_ms=20]]"
    return {"type": "chat", "id": request_id, "messages": [{"role": "user", "content": content}], **fields}


async def test_one_record_per_request_whatever_the_ending(emulator: EmulatorServer, mint: Mint) -> None:
    settings = gateway_settings(emulator.url)
    async with running_gateway(settings) as server:
        meter = services_of(server).meter
        client = await Client.open(ws_url(settings), mint())
        done = await client.chat("done", "[[emulator:tokens=7]]")
        failed = await client.chat("failed", "[[emulator:fault=stream_throttling]] [[emulator:after=2]]")
        await client.send(slow("cancelled", 200))
        while len([f for f in client.by_id["cancelled"] if f["type"] == "delta"]) < 3:
            await client.next_frame()
        await client.send({"type": "cancel", "id": "cancelled"})
        cancelled = await client.until_terminal("cancelled")
        refused = await client.chat("refused", "hi", model="not-allowed")
        await client.close()

        records = {r.request_id: r for r in meter.recent}
        assert sorted(records) == ["cancelled", "done", "failed"]  # refused never reached the model
        assert [r.request_id for r in meter.recent].count("done") == 1
        end = done[-1]
        ok = records["done"]
        assert (ok.input_tokens, ok.output_tokens) == (
            end["usage"]["input_tokens"],
            end["usage"]["output_tokens"],
        )
        assert ok.output_tokens == 7 and not ok.estimated and ok.stop_reason == "end_turn"
        assert ok.cost_usd == pytest.approx(cost_usd(DEFAULT_PRICES[HAIKU], ok.input_tokens, 7))
        assert ok.tenant == "acme" and ok.user == "alice" and ok.ttft_ms is not None
        bad = records["failed"]
        assert bad.error_code == "upstream_throttled" and bad.output_tokens == 2 and bad.estimated
        gone = records["cancelled"]
        deltas = len([f for f in cancelled if f["type"] == "delta"])
        assert gone.stop_reason == "cancelled" and gone.output_tokens == deltas and gone.estimated
        assert refused[-1]["code"] == "model_not_allowed"
        del failed


async def test_a_resumed_stream_is_metered_once_by_the_instance_that_ran_it(
    emulator: EmulatorServer, mint: Mint, redis_server: RedisServer
) -> None:
    one = gateway_settings(emulator.url, redis_url=redis_server.url, instance_id="m1")
    two = gateway_settings(emulator.url, redis_url=redis_server.url, instance_id="m2")
    async with running_gateway(one) as first_server, running_gateway(two) as second_server:
        request_id = f"meter-{time.time_ns()}"
        first = await Client.open(ws_url(one), mint())
        await first.send(slow(request_id, 40))
        while len(first.by_id[request_id]) < 4:
            await first.next_frame()
        last = first.by_id[request_id][-1]["seq"]
        await first.close()
        second = await Client.open(ws_url(two), mint())
        await second.send({"type": "resume", "id": request_id, "after": last})
        frames = await second.until_terminal(request_id)
        await second.close()
        async with asyncio.timeout(10):
            while not any(r.request_id == request_id for r in services_of(first_server).meter.recent):
                await asyncio.sleep(0.02)
        mine = [r for r in services_of(first_server).meter.recent if r.request_id == request_id]
        theirs = [r for r in services_of(second_server).meter.recent if r.request_id == request_id]
        assert len(mine) == 1 and theirs == []
        assert mine[0].output_tokens == 40 == frames[-1]["usage"]["output_tokens"]


# ---------------------------------------------------------------------------- /metrics


def scrape(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    values = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            values[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return values


async def test_prometheus_metrics_move_by_the_expected_amounts(emulator: EmulatorServer, mint: Mint) -> None:
    settings = gateway_settings(emulator.url)
    async with running_gateway(settings), httpx.AsyncClient() as http:
        url = f"http://127.0.0.1:{settings.port}/metrics"
        before = scrape((await http.get(url)).text)
        client = await Client.open(ws_url(settings), mint())
        open_now = scrape((await http.get(url)).text)
        assert open_now[("hubgate_connections_open", ())] == 1
        await client.chat("a", "[[emulator:tokens=5]]")
        await client.chat("b", "[[emulator:fault=throttling]]")
        after = scrape((await http.get(url)).text)
        await client.close()

    def delta(name: str, **labels: str) -> float:
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0.0) - before.get(key, 0.0)

    model = {"tenant": "acme", "model": HAIKU}
    assert delta("hubgate_tokens_total", direction="output", **model) == 5
    assert delta("hubgate_requests_total", outcome="end_turn", **model) == 1
    assert delta("hubgate_requests_total", outcome="upstream_throttled", **model) == 1
    assert delta("hubgate_upstream_errors_total", code="upstream_throttled") == 1
    assert delta("hubgate_rate_limit_decisions_total", decision="admitted") == 2
    assert delta("hubgate_ttft_seconds_count", **model) == 1
    assert delta("hubgate_stream_duration_seconds_count", **model) == 2
    labels = {k for (_, pairs) in after for k, _ in pairs}
    assert "user" not in labels and "request_id" not in labels


# ---------------------------------------------------------------------------- budgets


async def test_budget_warnings_then_exhaustion(
    emulator: EmulatorServer, mint: Mint, tmp_path: Path, store: str | None
) -> None:
    tenant = f"b-{time.time_ns()}"
    path = tmp_path / "tenants.yaml"
    path.write_text(
        yaml.safe_dump({"tenants": {tenant: {"models": [HAIKU], "limits": {"monthly_budget_tokens": 100}}}})
    )
    settings = gateway_settings(emulator.url, tenants_file=str(path), redis_url=store)
    async with running_gateway(settings) as server:
        meter = services_of(server).meter
        client = await Client.open(ws_url(settings), mint(tenant))
        warnings: list[dict[str, Any]] = []
        outcomes: list[dict[str, Any]] = []
        for i in range(12):
            frames = await client.chat(f"r{i}", "[[emulator:tokens=9]]")  # 1 input + 9 output tokens each
            outcomes.append(frames[-1])
            # The budget frame (if any) follows the end frame; it has no id.
            await client.send({"type": "ping", "id": f"p{i}"})
            while not any(f.get("id") == f"p{i}" for f in client.other):
                await client.next_frame()
            warnings += [f for f in client.other if f["type"] == "budget" and f not in warnings]
            # Aggregates are written off the stream's path; wait until this request is counted.
            async with asyncio.timeout(10):
                while (await meter.month_spend(tenant, time.time())).tokens < 10 * sum(
                    1 for o in outcomes if o["type"] == "end"
                ):
                    await asyncio.sleep(0.01)
        await client.close()
    assert [w["threshold"] for w in warnings] == [0.8, 0.95]
    assert warnings[0]["monthly_budget_tokens"] == 100
    ends = [o for o in outcomes if o["type"] == "end"]
    assert len(ends) == 10
    assert [o["code"] for o in outcomes[10:]] == ["budget_exhausted", "budget_exhausted"]


@pytest.fixture(params=["memory", "redis"])
def store(request: pytest.FixtureRequest, redis_server: RedisServer) -> str | None:
    return None if request.param == "memory" else redis_server.url


# ---------------------------------------------------------------------------- usage API


async def test_usage_api_totals_and_admin_auth(
    emulator: EmulatorServer, mint: Mint, redis_server: RedisServer
) -> None:
    settings = gateway_settings(emulator.url, redis_url=redis_server.url)
    async with running_gateway(settings) as server, httpx.AsyncClient() as http:
        meter = services_of(server).meter
        tenant = "globex"
        users = [f"api-{time.time_ns()}-{n}" for n in range(2)]
        for user in users:
            client = await Client.open(ws_url(settings), mint(tenant, user))
            for i in range(2):
                await client.chat(f"u{i}", f"[[emulator:tokens={3 + i}]]")
            await client.close()
        mine = [r for r in meter.recent if r.user in users]
        assert len(mine) == 4
        base = f"http://127.0.0.1:{settings.port}/admin/usage"
        admin = {"Authorization": f"Bearer {mint('acme', 'root', groups=['hubgate-admin'])}"}
        async with asyncio.timeout(10):
            while True:
                rows = (
                    await http.get(base, params={"tenant": tenant, "group_by": "user"}, headers=admin)
                ).json()
                by_user = {r["user"]: r for r in rows["rows"] if r["user"] in users}
                if sum(r["requests"] for r in by_user.values()) == 4:
                    break
                await asyncio.sleep(0.02)
        for user in users:
            expected = [r for r in mine if r.user == user]
            assert by_user[user]["output_tokens"] == sum(r.output_tokens for r in expected)
            assert by_user[user]["input_tokens"] == sum(r.input_tokens for r in expected)
            assert by_user[user]["cost_usd"] == pytest.approx(sum(r.cost_usd for r in expected))
        csv_text = (
            await http.get(
                base, params={"tenant": tenant, "group_by": "model", "format": "csv"}, headers=admin
            )
        ).text
        assert csv_text.splitlines()[0].startswith("tenant,model,requests")

        assert (await http.get(base)).status_code == 401
        tenant_token = {"Authorization": f"Bearer {mint(tenant, users[0])}"}
        assert (await http.get(base, headers=tenant_token)).status_code == 403
        bad = await http.get(base, params={"group_by": "planet"}, headers=admin)
        assert bad.status_code == 400


# ---------------------------------------------------------------------------- logs


@pytest.mark.slow
async def test_logs_are_json_and_never_hold_tokens_or_text(emulator: EmulatorServer, mint: Mint) -> None:
    settings = gateway_settings(emulator.url, port=free_port(), log_level="debug")
    gateway = GatewayProcess(settings)
    gateway.start()
    secret_words = "zanzibar quokka"
    try:
        token = mint()
        client = await Client.open(gateway.url, token)
        frames = await client.chat("logged", f"{secret_words} [[emulator:reply=platypus narwhal]]")
        assert frames[-1]["type"] == "end"
        await client.close()
        bad_token = mint(now=time.time() - 10_000)
        async with httpx.AsyncClient() as http:
            await http.get(f"{gateway.http}/v1/models", headers={"Authorization": f"Bearer {bad_token}"})
    finally:
        gateway.stop()
    output = gateway.output()
    lines = [line for line in output.splitlines() if line.strip()]
    parsed = [json.loads(line) for line in lines]  # every line is one JSON object
    assert any("_aws" in p and p["request_id"] == "logged" for p in parsed)
    for needle in (token, bad_token, token.split(".")[1], "zanzibar", "quokka", "platypus", "narwhal"):
        assert needle not in output


async def test_redis_aggregates_count_a_request_once_even_when_written_twice(
    redis_server: RedisServer,
) -> None:
    from redis.asyncio import Redis

    from hubgate.metering import RedisUsageStore, day_of

    client = Redis.from_url(redis_server.url)
    store = RedisUsageStore(client)
    tenant = f"agg-{time.time_ns()}"
    free = record(tenant=tenant, request_id="free", cost_usd=0.0, error_code="upstream_throttled")
    paid = record(tenant=tenant, request_id="paid")
    for item in (free, paid, paid, free):  # a retried write must not count again
        await store.add(item)
    rows = await store.rows(tenant, [day_of(paid.timestamp)])
    await client.aclose()
    assert len(rows) == 1
    row = rows[0]
    assert (row.requests, row.errors, row.input_tokens) == (2, 1, 200)
    assert row.cost_usd == pytest.approx(paid.cost_usd)


async def test_catalogue_prices_override_the_price_table(
    emulator: EmulatorServer, mint: Mint, tmp_path: Path
) -> None:
    path = tmp_path / "tenants.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "models": {
                    HAIKU: {
                        "name": "Haiku",
                        "provider": "anthropic",
                        "input_per_1k": 1.0,
                        "output_per_1k": 2.0,
                    }
                },
                "tenants": {"priced": {"models": [HAIKU]}},
            }
        )
    )
    settings = gateway_settings(emulator.url, tenants_file=str(path))
    async with running_gateway(settings) as server:
        client = await Client.open(ws_url(settings), mint("priced"))
        frames = await client.chat("p", "[[emulator:tokens=10]]")
        await client.close()
        priced = next(r for r in services_of(server).meter.recent if r.request_id == "p")
    usage = frames[-1]["usage"]
    assert priced.cost_usd == pytest.approx(usage["input_tokens"] / 1000 * 1.0 + 10 / 1000 * 2.0)


async def test_retired_models_are_not_offered(emulator: EmulatorServer, mint: Mint, tmp_path: Path) -> None:
    nova = "amazon.nova-lite-v1:0"
    path = tmp_path / "tenants.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "models": {
                    HAIKU: {"name": "Haiku", "provider": "anthropic", "enabled": False},
                    nova: {"name": "Nova Lite", "provider": "amazon"},
                },
                "tenants": {"t": {"models": [HAIKU, nova], "default_model": nova}},
            }
        )
    )
    settings = gateway_settings(emulator.url, tenants_file=str(path))
    async with running_gateway(settings), httpx.AsyncClient() as http:
        client = await Client.open(ws_url(settings), mint("t"))
        assert client.ready["models"] == [nova]
        refused = await client.chat("r", "hi", model=HAIKU)
        assert refused[-1]["code"] == "model_not_allowed" and "retired" in refused[-1]["message"]
        await client.close()
        listed = await http.get(
            f"http://127.0.0.1:{settings.port}/v1/models", headers={"Authorization": f"Bearer {mint('t')}"}
        )
        assert listed.json()["models"] == [{"id": nova}]
