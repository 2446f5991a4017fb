"""Amazon Bedrock ConverseStream through aioboto3.

One long-lived client per route, created at start-up (never per request). botocore and
aiohttp exception types stop here: everything that leaves this module is a
``hubgate.errors.UpstreamError``.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncGenerator
from typing import Any

import aioboto3
import aiohttp
import orjson
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    ConnectTimeoutError,
    ReadTimeoutError,
)

from hubgate.errors import UpstreamError, UpstreamThrottled, UpstreamTimeout
from hubgate.providers.base import Completion, ProviderRequest
from hubgate.providers.eventstream import EventStreamError, Message, MessageDecoder

log = logging.getLogger("hubgate.bedrock")

# Error codes Bedrock uses for capacity and quota refusals, before the stream and inside it
# (exception frames use lower camel case). See the ConverseStream API reference, "Errors".
_THROTTLE_CODES = frozenset(
    {
        "ThrottlingException",
        "throttlingException",
        "ServiceQuotaExceededException",
        "serviceQuotaExceededException",
        "TooManyRequestsException",
        "ServiceUnavailableException",
        "serviceUnavailableException",
    }
)
_TIMEOUT_CODES = frozenset({"ModelTimeoutException", "modelTimeoutException"})
_SERVER_CODES = frozenset(
    {
        "InternalServerException",
        "internalServerException",
        "ModelNotReadyException",
        "modelStreamErrorException",
    }
)


def map_error_code(code: str, status: int | None = None) -> UpstreamError:
    """Translate a Bedrock error code (HTTP or event-stream exception) into the gateway's error.

    Bedrock's own message is not passed on: it can name accounts, ARNs and quotas.
    """
    if code in _THROTTLE_CODES or status == 429:
        return UpstreamThrottled(f"Bedrock is throttling requests ({code})")
    if code in _TIMEOUT_CODES:
        return UpstreamTimeout(f"the model timed out ({code})", retryable=True)
    server_side = code in _SERVER_CODES or (status is not None and status >= 500)
    return UpstreamError(
        f"Bedrock refused the request ({code or status or 'unknown error'})", retryable=server_side
    )


def converse_arguments(request: ProviderRequest) -> dict[str, Any]:
    """The ConverseStream keyword arguments for a request (pure)."""
    inference: dict[str, Any] = {"maxTokens": request.max_tokens}
    if request.temperature is not None:
        inference["temperature"] = request.temperature
    if request.top_p is not None:
        inference["topP"] = request.top_p
    if request.stop:
        inference["stopSequences"] = list(request.stop)
    kwargs: dict[str, Any] = {
        "modelId": request.model,
        "messages": [{"role": turn.role, "content": [{"text": turn.content}]} for turn in request.messages],
        "inferenceConfig": inference,
    }
    if request.system:
        kwargs["system"] = [{"text": request.system}]
    if request.guardrail is not None:
        kwargs["guardrailConfig"] = {
            "guardrailIdentifier": request.guardrail.id,
            "guardrailVersion": request.guardrail.version,
            "streamProcessingMode": request.guardrail.stream_mode,
        }
    return kwargs


def event_of(message: Message) -> tuple[str, dict[str, Any]]:
    """(event type, payload) of one ConverseStream message; exception and error messages raise
    the gateway's error for their code.

    botocore's EventStream runs its shape parser on every event, which costs more CPU than
    everything else the gateway does per token: messages are framed and checksummed by
    ``MessageDecoder`` instead, and each JSON payload is decoded once with orjson.
    """
    headers = message.headers
    kind = headers.get(":message-type")
    if kind == "event":
        return str(headers.get(":event-type", "")), orjson.loads(message.payload or b"{}")
    if kind == "exception":
        raise map_error_code(str(headers.get(":exception-type", "")))
    raise map_error_code(str(headers.get(":error-code", "")))


class BedrockProvider:
    """A provider that streams from Bedrock runtime (or anything that speaks its wire format)."""

    def __init__(
        self,
        *,
        region: str,
        endpoint_url: str | None,
        connect_timeout: float,
        read_timeout: float,
        max_attempts: int,
        max_pool_connections: int = 1024,
        credentials: tuple[str, str] | None = None,
        session: aioboto3.Session | None = None,
    ) -> None:
        self._region = region
        self._endpoint_url = endpoint_url
        # botocore's default retry mode retries a 429 several times with its own backoff, hiding
        # throttling from the limiter and stretching time to first token; attempts are explicit.
        self._config = Config(
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
            # total_max_attempts counts the first request too (max_attempts would count retries).
            retries={"total_max_attempts": max_attempts, "mode": "standard"},
            max_pool_connections=max_pool_connections,
            tcp_keepalive=True,
        )
        self._credentials = credentials
        self._session = session
        self._stack = contextlib.AsyncExitStack()
        self._client: Any = None

    async def start(self) -> None:
        """Create the long-lived client (and its connection pool)."""
        if self._session is not None:
            session = self._session
        elif self._credentials is not None:
            session = aioboto3.Session(
                aws_access_key_id=self._credentials[0], aws_secret_access_key=self._credentials[1]
            )
        else:
            session = aioboto3.Session()
        self._client = await self._stack.enter_async_context(
            session.client(
                "bedrock-runtime",
                region_name=self._region,
                endpoint_url=self._endpoint_url,
                config=self._config,
            )
        )

    async def aclose(self) -> None:
        await self._stack.aclose()
        self._client = None

    async def stream(self, request: ProviderRequest) -> AsyncGenerator[str | Completion, None]:
        if self._client is None:
            raise UpstreamError("the Bedrock client is not started")
        try:
            response = await self._client.converse_stream(**converse_arguments(request))
        except ClientError as exc:
            error = exc.response.get("Error", {})
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            raise map_error_code(str(error.get("Code", "")), status) from exc
        except (TimeoutError, ReadTimeoutError, ConnectTimeoutError) as exc:
            raise UpstreamTimeout("Bedrock did not answer in time", retryable=True) from exc
        except (BotoCoreError, aiohttp.ClientError) as exc:
            raise UpstreamError("cannot reach Bedrock", retryable=True) from exc

        events = response["stream"]
        stop_reason: str | None = None
        decoder = MessageDecoder()
        try:
            # The aiohttp response under botocore's EventStream, read chunk by chunk.
            async for chunk, _ in events._raw_stream.content.iter_chunks():
                for message in decoder.feed(chunk):
                    event_type, event = event_of(message)
                    if event_type == "contentBlockDelta":
                        text = event.get("delta", {}).get("text")
                        if text:
                            yield text
                        continue
                    if event_type == "messageStop":
                        stop_reason = event.get("stopReason", "end_turn")
                        continue
                    if event_type == "metadata":
                        if stop_reason is None:
                            raise UpstreamError("the model stream ended before it was complete")
                        usage = event.get("usage", {})
                        yield Completion(
                            stop_reason=stop_reason,
                            input_tokens=int(usage.get("inputTokens", 0)),
                            output_tokens=int(usage.get("outputTokens", 0)),
                        )
                        return
            # Bedrock always ends a good stream with messageStop then metadata; anything less
            # is a connection that broke, not a normal end.
            raise UpstreamError("the model stream ended before it was complete")
        except (EventStreamError, orjson.JSONDecodeError) as exc:
            raise UpstreamError("the model stream was corrupted", retryable=False) from exc
        # Retryable: the gateway retries only before the first token (hubgate.streams), and a
        # stall or a dropped connection there is as transient as one before the HTTP answer.
        except (TimeoutError, ReadTimeoutError) as exc:
            raise UpstreamTimeout("the model stream stalled", retryable=True) from exc
        except (BotoCoreError, aiohttp.ClientError) as exc:
            raise UpstreamError("the model stream broke off", retryable=True) from exc
        finally:
            # Closing the aiohttp response drops the upstream connection at once, so a cancelled
            # gateway stream stops consuming (and paying for) tokens.
            events.close()
