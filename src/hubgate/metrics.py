"""Prometheus metrics, in a registry of their own (no process-wide globals).

Labels are bounded: tenant (from the registry) and model (from its allowlist), direction,
outcome, decision and error code. Never user ids or request ids.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from hubgate.metering import UsageRecord

# Seconds; chat TTFT is typically 0.2-2 s, streams last seconds to minutes.
TTFT_BUCKETS = (0.05, 0.1, 0.25, 0.5, 0.75, 1, 1.5, 2, 3, 5, 10, 30)
DURATION_BUCKETS = (0.25, 0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600)


class _CallbackCounters(Collector):
    """Counters whose values live elsewhere (the limiter's stats), read at scrape time."""

    def __init__(self) -> None:
        self.sources: list[tuple[str, str, Callable[[], float]]] = []

    def collect(self) -> Iterator[Metric]:
        for name, documentation, read in self.sources:
            family = CounterMetricFamily(name, documentation)
            family.add_metric([], read())
            yield family


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.connections = Gauge("hubgate_connections_open", "Open WebSocket connections", registry=r)
        self.streams = Gauge("hubgate_streams_in_flight", "Requests streaming on this instance", registry=r)
        self.queued = Gauge(
            "hubgate_streams_queued",
            "Requests waiting on this instance for a slot under their tenant's stream cap",
            registry=r,
        )
        self.ttft = Histogram(
            "hubgate_ttft_seconds",
            "Time to first token",
            ["tenant", "model"],
            buckets=TTFT_BUCKETS,
            registry=r,
        )
        self.duration = Histogram(
            "hubgate_stream_duration_seconds",
            "Request duration, received to terminal frame",
            ["tenant", "model"],
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        self.tokens = Counter(
            "hubgate_tokens", "Tokens metered", ["tenant", "model", "direction"], registry=r
        )
        self.requests = Counter(
            "hubgate_requests",
            "Requests that reached the model, by outcome",
            ["tenant", "model", "outcome"],
            registry=r,
        )
        self.decisions = Counter(
            "hubgate_rate_limit_decisions", "Admission decisions", ["decision"], registry=r
        )
        self.upstream_errors = Counter("hubgate_upstream_errors", "Upstream failures", ["code"], registry=r)
        self.attempts = Counter(
            "hubgate_upstream_attempts",
            "Upstream attempts before the first token, by model and outcome",
            ["model", "outcome"],
            registry=r,
        )
        self.cost = Counter("hubgate_cost_usd", "Metered cost in USD", ["tenant", "model"], registry=r)
        self._callbacks = _CallbackCounters()
        r.register(self._callbacks)

    def bind(
        self,
        *,
        connections: Callable[[], float],
        streams: Callable[[], float],
        queued: Callable[[], float] | None = None,
        limiter_fallbacks: Callable[[], float] | None = None,
        redis_scripts: tuple[Callable[[], float], Callable[[], float]] | None = None,
    ) -> None:
        """Gauges read live state at scrape time: nothing is counted on the hot path.

        ``redis_scripts``: the script calls made and the round trips (pipelines) they took.
        """
        self.connections.set_function(connections)
        self.streams.set_function(streams)
        if queued is not None:
            self.queued.set_function(queued)
        if limiter_fallbacks is not None:
            self._callbacks.sources.append(
                ("hubgate_limiter_fallbacks", "Limiter decisions made without Redis", limiter_fallbacks)
            )
        if redis_scripts is not None:
            calls, batches = redis_scripts
            self._callbacks.sources += [
                ("hubgate_redis_script_calls", "Lua script calls sent to Redis", calls),
                ("hubgate_redis_round_trips", "Pipelines those calls left in", batches),
            ]

    def observe_request(self, record: UsageRecord) -> None:
        tenant, model = record.tenant, record.model
        self.tokens.labels(tenant, model, "input").inc(record.input_tokens)
        self.tokens.labels(tenant, model, "output").inc(record.output_tokens)
        self.requests.labels(tenant, model, record.outcome).inc()
        self.cost.labels(tenant, model).inc(record.cost_usd)
        if record.ttft_ms is not None:
            self.ttft.labels(tenant, model).observe(record.ttft_ms / 1000)
        self.duration.labels(tenant, model).observe(record.duration_ms / 1000)
        if record.error_code is not None and record.error_code.startswith("upstream_"):
            self.upstream_errors.labels(record.error_code).inc()

    def attempt(self, model: str, outcome: str) -> None:
        self.attempts.labels(model, outcome).inc()

    def decision(self, name: str) -> None:
        self.decisions.labels(name).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
