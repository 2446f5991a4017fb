"""The provider interface: the gateway core streams through it without knowing the backend."""

from __future__ import annotations

from collections.abc import AsyncGenerator
from dataclasses import dataclass
from typing import Literal, Protocol


@dataclass(frozen=True, slots=True)
class Turn:
    role: Literal["user", "assistant"]
    content: str


@dataclass(frozen=True, slots=True)
class Route:
    """Where a tenant's requests go: its own (spoke) account, region or VPC endpoint."""

    region: str | None = None  # None: the hub's region
    role_arn: str | None = None  # assumed with STS; None: the hub's own credentials
    external_id: str | None = None
    endpoint_url: str | None = None  # e.g. a VPC endpoint DNS name; None: the hub's setting


@dataclass(frozen=True, slots=True)
class Guardrail:
    """A Bedrock guardrail applied to every request it is attached to."""

    id: str
    version: str
    stream_mode: Literal["sync", "async"] = "async"


@dataclass(frozen=True, slots=True)
class ProviderRequest:
    model: str
    messages: tuple[Turn, ...]
    max_tokens: int
    system: str | None = None
    temperature: float | None = None
    top_p: float | None = None
    stop: tuple[str, ...] = ()
    guardrail: Guardrail | None = None


@dataclass(frozen=True, slots=True)
class Completion:
    """The last item of a stream: why it stopped and the provider's own usage figures."""

    stop_reason: str
    input_tokens: int
    output_tokens: int


class Provider(Protocol):
    def stream(self, request: ProviderRequest) -> AsyncGenerator[str | Completion, None]:
        """Yield text deltas as they arrive, then exactly one Completion.

        Raises hubgate.errors.UpstreamError (or a subclass) on any upstream failure, including
        a stream that ends without its final events. Closing the iterator (or cancelling the
        task consuming it) closes the upstream HTTP stream at once.
        """
        ...

    async def aclose(self) -> None: ...


class ProviderResolver(Protocol):
    """Picks the provider (client) for a tenant's route."""

    async def provider_for(self, tenant_id: str, route: Route | None) -> Provider: ...

    async def aclose(self) -> None: ...


class SingleProvider:
    """Every tenant through one provider (no per-tenant routes)."""

    def __init__(self, provider: Provider) -> None:
        self.provider = provider

    async def provider_for(self, tenant_id: str, route: Route | None) -> Provider:
        return self.provider

    async def aclose(self) -> None:
        await self.provider.aclose()
