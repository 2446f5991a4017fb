"""Optional OpenTelemetry spans per request, following the GenAI semantic conventions.

Enabled by ``HUBGATE_OTEL_ENABLED=true`` with the ``otel`` extra installed (``pip install
'hubgate[otel]'``) and a tracer provider configured the usual way (e.g. ``opentelemetry-instrument``
or the OTEL_* environment). When disabled nothing is imported and nothing runs per request.
"""

from __future__ import annotations

import logging
from typing import Any, Protocol

from hubgate.metering import UsageRecord

log = logging.getLogger("hubgate.telemetry")


class SpanRecorder(Protocol):
    def record(self, usage: UsageRecord, *, start_ns: int, end_ns: int) -> None: ...


class OtelRecorder:
    """Writes one finished span per request (after the fact, with its real start and end times)."""

    def __init__(self, tracer: Any, status: Any, kind: Any) -> None:
        self._tracer = tracer
        self._status = status
        self._kind = kind

    def record(self, usage: UsageRecord, *, start_ns: int, end_ns: int) -> None:
        attributes: dict[str, Any] = {
            "gen_ai.operation.name": "chat",
            "gen_ai.provider.name": "aws.bedrock",
            "gen_ai.request.model": usage.model,
            "gen_ai.usage.input_tokens": usage.input_tokens,
            "gen_ai.usage.output_tokens": usage.output_tokens,
            "hubgate.tenant": usage.tenant,
            "hubgate.request_id": usage.request_id,
            "hubgate.cost_usd": usage.cost_usd,
            "hubgate.usage.estimated": usage.estimated,
        }
        if usage.stop_reason is not None:
            attributes["gen_ai.response.finish_reasons"] = [usage.stop_reason]
        if usage.ttft_ms is not None:
            attributes["gen_ai.server.time_to_first_token"] = usage.ttft_ms / 1000
        span = self._tracer.start_span(
            f"chat {usage.model}", kind=self._kind.CLIENT, start_time=start_ns, attributes=attributes
        )
        if usage.ttft_ms is not None:
            span.add_event("gen_ai.first_chunk", timestamp=start_ns + int(usage.ttft_ms * 1_000_000))
        if usage.error_code is not None:
            span.set_attribute("error.type", usage.error_code)
            span.set_status(self._status(self._status_code_error(), usage.error_code))
        span.end(end_time=end_ns)

    @staticmethod
    def _status_code_error() -> Any:
        from opentelemetry.trace import StatusCode

        return StatusCode.ERROR


def build_recorder(enabled: bool) -> SpanRecorder | None:
    """An OpenTelemetry recorder, or None (disabled, or the extra is not installed)."""
    if not enabled:
        return None
    try:
        from opentelemetry import trace
        from opentelemetry.trace import SpanKind, Status
    except ImportError:
        log.warning("HUBGATE_OTEL_ENABLED is set but opentelemetry is not installed; no spans")
        return None
    return OtelRecorder(trace.get_tracer("hubgate"), Status, SpanKind)
