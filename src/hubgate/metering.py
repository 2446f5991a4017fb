"""Usage records: one per request that reached the model, whatever way it ended."""

from __future__ import annotations

from collections import deque
from dataclasses import asdict, dataclass
from typing import Any, Protocol


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

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class Meter(Protocol):
    def record(self, usage: UsageRecord) -> None:
        """Account one finished request. Must not block: sinks that do I/O queue the record."""
        ...


class RecentUsage:
    """Keeps the most recent records in memory (for the admin view and tests)."""

    def __init__(self, limit: int = 10_000) -> None:
        self.records: deque[UsageRecord] = deque(maxlen=limit)

    def record(self, usage: UsageRecord) -> None:
        self.records.append(usage)
