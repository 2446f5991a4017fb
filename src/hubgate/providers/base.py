"""The provider interface: the gateway core streams through it without knowing the backend."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Literal, Protocol


@dataclass(frozen=True, slots=True)
class Turn:
    role: Literal["user", "assistant"]
    content: str


@dataclass(frozen=True, slots=True)
class ProviderRequest:
    model: str
    messages: tuple[Turn, ...]
    max_tokens: int
    system: str | None = None
    temperature: float | None = None
    top_p: float | None = None
    stop: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Completion:
    """The last item of a stream: why it stopped and the provider's own usage figures."""

    stop_reason: str
    input_tokens: int
    output_tokens: int


class Provider(Protocol):
    def stream(self, request: ProviderRequest) -> AsyncIterator[str | Completion]:
        """Yield text deltas as they arrive, then exactly one Completion.

        Raises hubgate.errors.UpstreamError (or a subclass) on any upstream failure, including
        a stream that ends without its final events. Closing the iterator (or cancelling the
        task consuming it) closes the upstream HTTP stream at once.
        """
        ...

    async def aclose(self) -> None: ...
