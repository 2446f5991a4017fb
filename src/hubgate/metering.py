"""Metering: one usage record per request that reached the model, priced, and sent to the sinks.

Sinks: CloudWatch Embedded Metric Format lines on stdout (``hubgate.emf`` logger), Prometheus
(``hubgate.metrics``), and per-tenant aggregates per day and month (Redis, or memory) that feed
the usage API and monthly budgets. ``Metering.record`` never blocks the stream that finished:
the aggregate write happens on a background task, one pipelined round trip per record.
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import io
import json
import logging
from collections import defaultdict, deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, replace
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any, Literal, Protocol

import yaml
from redis.asyncio import Redis
from redis.exceptions import RedisError

from hubgate.keys import tenant_tag
from hubgate.metrics import Metrics
from hubgate.scripts import Script, ScriptRunner

log = logging.getLogger("hubgate.metering")
emf_log = logging.getLogger("hubgate.emf")

# Aggregates are kept a little over a year, so month-over-month reports always work.
AGGREGATE_TTL_SECONDS = 400 * 86400
GroupBy = Literal["model", "day", "user"]


# ---------------------------------------------------------------------------- prices


@dataclass(frozen=True, slots=True)
class Price:
    """USD per 1,000 tokens."""

    input_per_1k: float
    output_per_1k: float


# On-demand list prices in us-east-1 for the demo models (USD per 1k tokens). Override or extend
# them with HUBGATE_PRICES_FILE; a model without a price is metered at 0 USD and logged once.
DEFAULT_PRICES: Mapping[str, Price] = {
    "anthropic.claude-3-5-haiku-20241022-v1:0": Price(0.0008, 0.004),
    "amazon.nova-lite-v1:0": Price(0.00006, 0.00024),
    "amazon.nova-pro-v1:0": Price(0.0008, 0.0032),
    "amazon.nova-micro-v1:0": Price(0.000035, 0.00014),
    "meta.llama3-1-8b-instruct-v1:0": Price(0.00022, 0.00022),
}


class PriceConfigError(ValueError):
    """The prices file is malformed."""


def parse_prices(document: Any) -> dict[str, Price]:
    """``{model_id: {input_per_1k: float, output_per_1k: float}}`` (YAML or JSON), validated."""
    if not isinstance(document, Mapping):
        raise PriceConfigError("the prices file must be a mapping of model id to prices")
    prices: dict[str, Price] = {}
    for model, raw in document.items():
        if not isinstance(raw, Mapping) or set(raw) != {"input_per_1k", "output_per_1k"}:
            raise PriceConfigError(f"{model!r}: give exactly input_per_1k and output_per_1k")
        values = [raw["input_per_1k"], raw["output_per_1k"]]
        if not all(isinstance(v, int | float) and not isinstance(v, bool) and v >= 0 for v in values):
            raise PriceConfigError(f"{model!r}: prices must be non-negative numbers")
        prices[str(model)] = Price(float(values[0]), float(values[1]))
    return prices


def load_prices(path: str | None) -> dict[str, Price]:
    prices = dict(DEFAULT_PRICES)
    if path is not None:
        try:
            text = Path(path).read_text("utf-8")
            document = json.loads(text) if path.endswith(".json") else yaml.safe_load(text)
        except (OSError, ValueError, yaml.YAMLError) as exc:
            raise PriceConfigError(f"cannot read the prices file {path}: {exc}") from exc
        prices.update(parse_prices(document))
    return prices


def price_for(prices: Mapping[str, Price], model: str) -> Price | None:
    """The price of a model id, an inference profile id (``us.<model>``) or an ARN ending in one."""
    if model in prices:
        return prices[model]
    tail = model.rsplit("/", 1)[-1]
    for candidate in (tail, tail.split(".", 1)[-1]):
        if candidate in prices:
            return prices[candidate]
    return None


def cost_usd(price: Price | None, input_tokens: int, output_tokens: int) -> float:
    if price is None:
        return 0.0
    return round(input_tokens / 1000 * price.input_per_1k + output_tokens / 1000 * price.output_per_1k, 10)


# ---------------------------------------------------------------------------- records


@dataclass(frozen=True, slots=True)
class UsageRecord:
    request_id: str
    connection_id: str
    tenant: str
    user: str
    model: str
    input_tokens: int
    output_tokens: int
    estimated: bool  # True when Bedrock's own usage figures never arrived (cancelled, broken off)
    ttft_ms: float | None
    duration_ms: float
    stop_reason: str | None
    error_code: str | None
    timestamp: float
    cost_usd: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def outcome(self) -> str:
        return self.stop_reason or self.error_code or "unknown"


def emf_document(record: UsageRecord, namespace: str) -> dict[str, Any]:
    """One CloudWatch Embedded Metric Format document for a record (pure).

    Dimension sets [Tenant] and [Tenant, Model]; the request and user ids are plain properties
    (searchable in Logs Insights), never dimensions.
    """
    metrics = [
        {"Name": "InputTokens", "Unit": "Count"},
        {"Name": "OutputTokens", "Unit": "Count"},
        {"Name": "CostUSD", "Unit": "None"},
        {"Name": "Duration", "Unit": "Milliseconds"},
    ]
    document: dict[str, Any] = {
        "_aws": {
            "Timestamp": int(record.timestamp * 1000),
            "CloudWatchMetrics": [
                {"Namespace": namespace, "Dimensions": [["Tenant"], ["Tenant", "Model"]], "Metrics": metrics}
            ],
        },
        "Tenant": record.tenant,
        "Model": record.model,
        "InputTokens": record.input_tokens,
        "OutputTokens": record.output_tokens,
        "CostUSD": record.cost_usd,
        "Duration": round(record.duration_ms, 3),
        "request_id": record.request_id,
        "connection_id": record.connection_id,
        "user": record.user,
        "outcome": record.outcome,
        "estimated": record.estimated,
    }
    if record.ttft_ms is not None:
        metrics.insert(3, {"Name": "TTFT", "Unit": "Milliseconds"})
        document["TTFT"] = round(record.ttft_ms, 3)
    return document


# ---------------------------------------------------------------------------- aggregates


@dataclass(frozen=True, slots=True)
class Spend:
    tokens: int = 0
    cost_usd: float = 0.0


@dataclass(frozen=True, slots=True)
class UsageRow:
    day: str
    model: str
    user: str
    requests: int
    input_tokens: int
    output_tokens: int
    cost_usd: float
    errors: int


def day_of(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, UTC).strftime("%Y-%m-%d")


def month_of(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, UTC).strftime("%Y-%m")


def days_between(first: date, last: date) -> list[str]:
    if last < first:
        return []
    return [(first + timedelta(days=n)).isoformat() for n in range((last - first).days + 1)]


_FIELDS = ("requests", "input_tokens", "output_tokens", "cost_usd", "errors")
_SEP = "\x1f"  # unit separator: cannot appear in model ids or user ids from tokens


def record_increments(record: UsageRecord) -> dict[str, float]:
    """The per-(model, user) counters one record adds to its day (pure)."""
    prefix = f"{record.model}{_SEP}{record.user}{_SEP}"
    return {
        prefix + "requests": 1,
        prefix + "input_tokens": record.input_tokens,
        prefix + "output_tokens": record.output_tokens,
        prefix + "cost_usd": record.cost_usd,
        prefix + "errors": 1 if record.error_code else 0,
    }


def rows_from_day(day: str, fields: Mapping[str, float]) -> list[UsageRow]:
    per: defaultdict[tuple[str, str], dict[str, float]] = defaultdict(dict)
    for name, value in fields.items():
        parts = name.split(_SEP)
        if len(parts) != 3 or parts[2] not in _FIELDS:
            continue
        per[(parts[0], parts[1])][parts[2]] = value
    return [
        UsageRow(
            day=day,
            model=model,
            user=user,
            requests=int(v.get("requests", 0)),
            input_tokens=int(v.get("input_tokens", 0)),
            output_tokens=int(v.get("output_tokens", 0)),
            cost_usd=round(float(v.get("cost_usd", 0.0)), 10),
            errors=int(v.get("errors", 0)),
        )
        for (model, user), v in sorted(per.items())
    ]


def group_rows(rows: Iterable[UsageRow], group_by: GroupBy) -> list[dict[str, Any]]:
    """Sum rows by model, day or user (pure)."""
    totals: dict[str, dict[str, Any]] = {}
    for row in rows:
        key = getattr(row, group_by)
        entry = totals.setdefault(
            key,
            {
                group_by: key,
                "requests": 0,
                "input_tokens": 0,
                "output_tokens": 0,
                "cost_usd": 0.0,
                "errors": 0,
            },
        )
        entry["requests"] += row.requests
        entry["input_tokens"] += row.input_tokens
        entry["output_tokens"] += row.output_tokens
        entry["cost_usd"] = round(entry["cost_usd"] + row.cost_usd, 10)
        entry["errors"] += row.errors
    return [totals[k] for k in sorted(totals)]


def rows_to_csv(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return ""
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()


class UsageStore(Protocol):
    async def add(self, record: UsageRecord) -> None:
        """Add one record to its tenant's day and month totals (one round trip)."""
        ...

    async def month_spend(self, tenant: str, month: str) -> Spend: ...

    async def rows(self, tenant: str, days: list[str]) -> list[UsageRow]: ...


class MemoryUsageStore:
    def __init__(self) -> None:
        self._days: defaultdict[tuple[str, str], defaultdict[str, float]] = defaultdict(
            lambda: defaultdict(float)
        )
        self._months: defaultdict[tuple[str, str], list[float]] = defaultdict(lambda: [0, 0.0])

    async def add(self, record: UsageRecord) -> None:
        day = self._days[(record.tenant, day_of(record.timestamp))]
        for name, value in record_increments(record).items():
            day[name] += value
        month = self._months[(record.tenant, month_of(record.timestamp))]
        month[0] += record.input_tokens + record.output_tokens
        month[1] += record.cost_usd

    async def month_spend(self, tenant: str, month: str) -> Spend:
        tokens, cost = self._months.get((tenant, month), [0, 0.0])
        return Spend(int(tokens), round(cost, 10))

    async def rows(self, tenant: str, days: list[str]) -> list[UsageRow]:
        out: list[UsageRow] = []
        for day in days:
            out += rows_from_day(day, self._days.get((tenant, day), {}))
        return out


# Adds one record to its day and month hashes, once: the request id is remembered for a day, so a
# retried write (after a timeout whose outcome is unknown) never counts a request twice.
_ADD_SCRIPT = Script.of("""
if not redis.call('SET', KEYS[3], '1', 'NX', 'EX', 86400) then
  return 0
end
local n = (#ARGV - 3) / 2
for i = 1, n do
  local field, value = ARGV[2 * i - 1], ARGV[2 * i]
  if string.sub(field, -8) == 'cost_usd' then
    redis.call('HINCRBYFLOAT', KEYS[1], field, value)
  else
    redis.call('HINCRBY', KEYS[1], field, value)
  end
end
redis.call('EXPIRE', KEYS[1], ARGV[#ARGV])
redis.call('HINCRBY', KEYS[2], 'tokens', ARGV[#ARGV - 2])
redis.call('HINCRBYFLOAT', KEYS[2], 'cost_usd', ARGV[#ARGV - 1])
redis.call('EXPIRE', KEYS[2], ARGV[#ARGV])
return 1
""")


class RedisUsageStore:
    """``{t:<tenant>}:usage:<day>`` hashes of (model, user, counter), ``{t:<tenant>}:spend:<month>``."""

    def __init__(self, client: Redis, *, runner: ScriptRunner | None = None) -> None:
        self._client = client
        # Shared with the limiter when given: a request's aggregate write joins its settlement.
        self._runner = ScriptRunner(client) if runner is None else runner

    @staticmethod
    def _day_key(tenant: str, day: str) -> str:
        return f"{tenant_tag(tenant)}:usage:{day}"

    @staticmethod
    def _month_key(tenant: str, month: str) -> str:
        return f"{tenant_tag(tenant)}:spend:{month}"

    async def add(self, record: UsageRecord) -> None:
        tag = tenant_tag(record.tenant)
        keys = [
            self._day_key(record.tenant, day_of(record.timestamp)),
            self._month_key(record.tenant, month_of(record.timestamp)),
            f"{tag}:metered:{record.request_id}:{record.connection_id}",
        ]
        args: list[str | int | float] = []
        for name, value in record_increments(record).items():
            args += [name, repr(float(value)) if name.endswith("cost_usd") else int(value)]
        args += [record.input_tokens + record.output_tokens, repr(record.cost_usd), AGGREGATE_TTL_SECONDS]
        await self._runner.run(_ADD_SCRIPT, keys, args)

    async def month_spend(self, tenant: str, month: str) -> Spend:
        tokens, cost = await self._client.hmget(self._month_key(tenant, month), ["tokens", "cost_usd"])
        return Spend(int(tokens or 0), round(float(cost or 0.0), 10))

    async def rows(self, tenant: str, days: list[str]) -> list[UsageRow]:
        async with self._client.pipeline(transaction=False) as pipe:
            for day in days:
                pipe.hgetall(self._day_key(tenant, day))
            results = await pipe.execute()
        out: list[UsageRow] = []
        for day, raw in zip(days, results, strict=True):
            fields = {(k.decode() if isinstance(k, bytes) else k): float(v) for k, v in raw.items()}
            out += rows_from_day(day, fields)
        return out


# ---------------------------------------------------------------------------- budgets


BUDGET_THRESHOLDS = (0.8, 0.95)


@dataclass(frozen=True, slots=True)
class Budget:
    usd: float | None = None
    tokens: int | None = None

    @property
    def active(self) -> bool:
        return self.usd is not None or self.tokens is not None


def budget_fraction(budget: Budget, spend: Spend) -> float:
    """How much of the monthly budget is spent (the larger of the USD and token fractions)."""
    fractions = [0.0]
    if budget.usd is not None:
        fractions.append(spend.cost_usd / budget.usd if budget.usd > 0 else float("inf"))
    if budget.tokens is not None:
        fractions.append(spend.tokens / budget.tokens if budget.tokens > 0 else float("inf"))
    return max(fractions)


def crossed_threshold(before: float, after: float) -> float | None:
    """The highest warning threshold crossed going from ``before`` to ``after`` (pure)."""
    crossed = [t for t in BUDGET_THRESHOLDS if before < t <= after]
    return crossed[-1] if crossed else None


# ---------------------------------------------------------------------------- the meter


class Meter(Protocol):
    def record(self, usage: UsageRecord) -> UsageRecord:
        """Price and account one finished request; returns the priced record. Never blocks."""
        ...


_WRITE_BATCH = 256  # aggregate writes in flight at once


class Metering:
    """Prices records and fans them out to EMF, Prometheus, the recent list and the aggregates."""

    def __init__(
        self,
        *,
        prices: Mapping[str, Price],
        store: UsageStore,
        metrics: Metrics,
        namespace: str,
        emf: bool,
        recent: int = 10_000,
        catalogue: Callable[[str], Price | None] | None = None,
    ) -> None:
        self._prices = prices
        self._catalogue = catalogue
        self.store = store
        self._metrics = metrics
        self._namespace = namespace
        self._emf = emf
        self.recent: deque[UsageRecord] = deque(maxlen=recent)
        self._queue: asyncio.Queue[UsageRecord] = asyncio.Queue(maxsize=100_000)
        self._task: asyncio.Task[None] | None = None
        self._unpriced: set[str] = set()

    def start(self) -> None:
        self._task = asyncio.create_task(self._write_aggregates(), name="hubgate-metering")

    async def aclose(self) -> None:
        """Write what is queued (bounded by a few seconds), then stop."""
        if self._task is None:
            return
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(5):
                await self._queue.join()
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        self._task = None

    def price(self, model: str) -> Price | None:
        """The model catalogue's price when it has one, else the price table's."""
        price = self._catalogue(model) if self._catalogue is not None else None
        if price is None:
            price = price_for(self._prices, model)
        if price is None and model not in self._unpriced:
            self._unpriced.add(model)
            log.warning("no price for model %s; it is metered at 0 USD", model, extra={"model": model})
        return price

    def record(self, usage: UsageRecord) -> UsageRecord:
        priced = replace(
            usage, cost_usd=cost_usd(self.price(usage.model), usage.input_tokens, usage.output_tokens)
        )
        self.recent.append(priced)
        self._metrics.observe_request(priced)
        if self._emf:
            emf_log.info(json.dumps(emf_document(priced, self._namespace), separators=(",", ":")))
        try:
            self._queue.put_nowait(priced)
        except asyncio.QueueFull:
            log.error("usage aggregate queue full; dropping request %s from aggregates", priced.request_id)
        return priced

    async def _write_aggregates(self) -> None:
        """Write what is queued, all of it at once (one pipeline when the store shares Redis)."""
        while True:
            records = [await self._queue.get()]
            while len(records) < _WRITE_BATCH and not self._queue.empty():
                records.append(self._queue.get_nowait())
            try:
                if len(records) == 1:  # from this task: joins the calls its request makes now
                    await self._add_with_retry(records[0])
                else:
                    await asyncio.gather(*(self._add_with_retry(record) for record in records))
            finally:
                for _ in records:
                    self._queue.task_done()

    async def _add_with_retry(self, record: UsageRecord) -> None:
        for attempt in range(3):
            try:
                await self.store.add(record)
                return
            except (RedisError, OSError):
                await asyncio.sleep(0.2 * (attempt + 1))
        log.error("could not write usage aggregates for request %s", record.request_id)

    async def month_spend(self, tenant: str, now: float) -> Spend:
        return await self.store.month_spend(tenant, month_of(now))
