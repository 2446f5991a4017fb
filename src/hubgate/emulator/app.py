"""The emulator's ASGI app: Bedrock runtime streaming routes, observation routes, and ``serve``.

The routes only pump: ``script.build_script`` decides what to say and the renderers in
``eventstream`` turn it into bytes. Each streamed reply runs as two tasks, one writing events
and one waiting for ``http.disconnect``; whichever finishes first decides how the stream is
counted, and both are awaited before the request ends, so no task outlives its client.
"""

from __future__ import annotations

import asyncio
import logging
import math
import re
import time
import uuid
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import Final, assert_never

import orjson
import uvicorn
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import Message, Receive, Scope, Send

from hubgate.emulator.eventstream import (
    AnthropicStreamRenderer,
    ConverseStreamRenderer,
    StreamRenderer,
    StreamSummary,
    exception_message,
)
from hubgate.emulator.script import (
    Fault,
    InvalidRequest,
    Operation,
    Script,
    build_script,
    stream_exception_message,
)

logger = logging.getLogger(__name__)

EVENTSTREAM_CONTENT_TYPE: Final = "application/vnd.amazon.eventstream"
REQUEST_HISTORY: Final = 1000
# uvicorn otherwise waits forever on shutdown for a stream held open by fault=stall.
GRACEFUL_SHUTDOWN_SECONDS: Final = 1

BodyWriter = Callable[[bytes], Awaitable[None]]

_CREDENTIAL: Final = re.compile(r"Credential=([^/,\s]+)/")


@dataclass(frozen=True, slots=True)
class EmulatorConfig:
    """Server-wide pacing; the ``ttft_ms`` and ``token_delay_ms`` directives override it per request.

    ``ttft_ms`` is the pause between ``messageStart`` and the first delta; ``token_delay_ms`` the
    pause before every later delta.
    """

    ttft_ms: float = 0.0
    token_delay_ms: float = 0.0

    def __post_init__(self) -> None:
        for name in ("ttft_ms", "token_delay_ms"):
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"{name} must be a finite number of milliseconds, at least 0")


class StreamOutcome(StrEnum):
    COMPLETED = "completed"
    CLIENT_DISCONNECTED = "client_disconnected"
    FAULTED = "faulted"


@dataclass(frozen=True, slots=True)
class RequestRecord:
    """One request to a model operation, as ``GET /_emulator/requests`` reports it."""

    id: str
    operation: Operation
    model_id: str
    body: object
    access_key_id: str | None
    security_token_present: bool
    received_at: float

    def as_json(self) -> dict[str, object]:
        return {
            "id": self.id,
            "operation": self.operation.value,
            "model_id": self.model_id,
            "body": self.body,
            "access_key_id": self.access_key_id,
            "security_token_present": self.security_token_present,
            "received_at": self.received_at,
        }


class Recorder:
    """What tests observe: the last requests and how streams ended. Lives on one app instance."""

    def __init__(self, capacity: int = REQUEST_HISTORY) -> None:
        self._requests: deque[RequestRecord] = deque(maxlen=capacity)
        self._active = 0
        self._ended = dict.fromkeys(StreamOutcome, 0)

    def record(self, record: RequestRecord) -> None:
        self._requests.append(record)

    def requests(self) -> list[dict[str, object]]:
        return [record.as_json() for record in self._requests]

    def stream_started(self) -> None:
        self._active += 1

    def stream_ended(self, outcome: StreamOutcome | None) -> None:
        """Count an ended stream; None (the server cancelled it on shutdown) only leaves ``active``."""
        self._active -= 1
        if outcome is not None:
            self._ended[outcome] += 1

    def streams(self) -> dict[str, int]:
        return {"active": self._active, **{outcome.value: count for outcome, count in self._ended.items()}}

    def reset(self) -> None:
        """Forget requests and ended streams; streams still running stay counted as active."""
        self._requests.clear()
        self._ended = dict.fromkeys(StreamOutcome, 0)


def access_key_id(authorization: str | None) -> str | None:
    """The access key id of a SigV4 ``Authorization`` header (``Credential=AKID/date/region/...``)."""
    if authorization is None:
        return None
    match = _CREDENTIAL.search(authorization)
    return match.group(1) if match else None


def error_response(status: int, error_type: str, message: str, request_id: str | None = None) -> Response:
    """An error as botocore's rest-json parser reads it: ``x-amzn-ErrorType`` and a JSON ``message``."""
    headers = {"x-amzn-ErrorType": error_type, "x-amzn-requestid": request_id or str(uuid.uuid4())}
    return Response(orjson.dumps({"message": message}), status, headers, "application/json")


def json_response(content: object) -> Response:
    return Response(orjson.dumps(content), 200, media_type="application/json")


async def _wait_for_disconnect(receive: Receive) -> None:
    # The body is already read, so the next message the server delivers is http.disconnect;
    # uvicorn also delivers it once the response is complete, which the caller tells apart.
    while True:
        message: Message = await receive()
        if message["type"] == "http.disconnect":
            return


class EventStreamResponse(Response):
    """A 200 ``application/vnd.amazon.eventstream`` reply played from a script."""

    media_type = EVENTSTREAM_CONTENT_TYPE

    def __init__(
        self,
        script: Script,
        renderer: StreamRenderer,
        config: EmulatorConfig,
        recorder: Recorder,
        received_at: float,
        headers: dict[str, str],
    ) -> None:
        self.status_code = 200
        self.background = None
        self.init_headers(headers)
        self.script = script
        self.renderer = renderer
        ttft_ms = config.ttft_ms if script.ttft_ms is None else script.ttft_ms
        token_delay_ms = config.token_delay_ms if script.token_delay_ms is None else script.token_delay_ms
        self.ttft_s = ttft_ms / 1000
        self.token_delay_s = token_delay_ms / 1000
        self.recorder = recorder
        self.received_at = received_at
        self._finishing = False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        self.recorder.stream_started()
        outcome: StreamOutcome | None = None
        writer = asyncio.create_task(self._write(send))
        watcher = asyncio.create_task(_wait_for_disconnect(receive))
        try:
            await asyncio.wait((writer, watcher), return_when=asyncio.FIRST_COMPLETED)
            # uvicorn reports http.disconnect once the last body message is sent too; a stream
            # that got that far finished on its own, whichever task the loop woke first.
            if writer.done() or self._finishing:
                outcome = await writer
            else:
                outcome = StreamOutcome.CLIENT_DISCONNECTED
        finally:
            writer.cancel()
            watcher.cancel()
            await asyncio.gather(writer, watcher, return_exceptions=True)
            self.recorder.stream_ended(outcome)

    def _elapsed_ms(self) -> int:
        return round((time.monotonic() - self.received_at) * 1000)

    async def _write(self, send: Send) -> StreamOutcome:
        try:
            return await self._play(send)
        except Exception:
            # Headers are out, so the only honest signal left is an unfinished stream; the
            # details stay in the server log.
            logger.exception("emulator stream failed")
            return StreamOutcome.FAULTED

    async def _play(self, send: Send) -> StreamOutcome:
        script, renderer = self.script, self.renderer

        async def body(chunk: bytes) -> None:
            await send({"type": "http.response.body", "body": chunk, "more_body": True})

        await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
        await body(renderer.start())
        first_byte_ms: int | None = None
        for index, token in enumerate(script.tokens):
            delay = self.ttft_s if index == 0 else self.token_delay_s
            if delay > 0:
                await asyncio.sleep(delay)
            await body(renderer.delta(token))
            if first_byte_ms is None:
                first_byte_ms = self._elapsed_ms()

        outcome = await self._close(body, first_byte_ms)
        self._finishing = True
        await send({"type": "http.response.body", "body": b"", "more_body": False})
        return outcome

    async def _close(self, body: BodyWriter, first_byte_ms: int | None) -> StreamOutcome:
        script = self.script
        fault = script.fault
        if fault is None:
            if script.stop_reason is None:
                raise RuntimeError("a script without a fault must have a stop reason")
            latency_ms = self._elapsed_ms()
            summary = StreamSummary(
                stop_reason=script.stop_reason.value,
                stop_sequence=script.stop_sequence,
                input_tokens=script.input_tokens,
                output_tokens=script.output_tokens,
                latency_ms=latency_ms,
                first_byte_latency_ms=latency_ms if first_byte_ms is None else first_byte_ms,
                guardrail_trace=script.guardrail_trace,
            )
            await body(self.renderer.finish(summary))
            return StreamOutcome.COMPLETED
        match fault:
            case Fault.STALL:
                # Hold the stream open, sending nothing, until the client leaves (or shutdown).
                await asyncio.get_running_loop().create_future()
                raise RuntimeError("a stalled stream cannot resume")
            case Fault.CUT:
                return StreamOutcome.FAULTED
            case (
                Fault.STREAM_THROTTLING
                | Fault.STREAM_MODEL_ERROR
                | Fault.STREAM_VALIDATION
                | Fault.STREAM_UNAVAILABLE
            ):
                exception_type = fault.stream_exception
                if exception_type is None:
                    raise RuntimeError(f"fault {fault} has no stream exception")
                await body(exception_message(exception_type, stream_exception_message(exception_type)))
                return StreamOutcome.FAULTED
            case (
                Fault.THROTTLING
                | Fault.VALIDATION
                | Fault.ACCESS_DENIED
                | Fault.UNAVAILABLE
                | Fault.INTERNAL
                | Fault.NOT_FOUND
            ):
                raise RuntimeError(f"fault {fault} is answered before the stream starts")
            case _:
                assert_never(fault)


class Emulator:
    """Route handlers bound to one configuration and one recorder."""

    def __init__(self, config: EmulatorConfig) -> None:
        self.config = config
        self.recorder = Recorder()

    async def converse_stream(self, request: Request) -> Response:
        return await self._invoke(request, Operation.CONVERSE_STREAM)

    async def invoke_with_response_stream(self, request: Request) -> Response:
        return await self._invoke(request, Operation.INVOKE_WITH_RESPONSE_STREAM)

    async def _invoke(self, request: Request, operation: Operation) -> Response:
        received_at = time.monotonic()
        request_id = str(uuid.uuid4())
        model_id = str(request.path_params["model_id"])
        raw = await request.body()
        try:
            body: object = orjson.loads(raw)
        except orjson.JSONDecodeError:
            body = None
        self.recorder.record(
            RequestRecord(
                id=request_id,
                operation=operation,
                model_id=model_id,
                body=body,
                access_key_id=access_key_id(request.headers.get("authorization")),
                security_token_present="x-amz-security-token" in request.headers,
                received_at=time.time(),
            )
        )
        if body is None:
            return error_response(400, "ValidationException", "The request body is not JSON.", request_id)
        try:
            script = build_script(operation, model_id, body)
        except InvalidRequest as exc:
            return error_response(400, "ValidationException", exc.message, request_id)
        if script.fault is not None and (http_error := script.fault.http_error) is not None:
            return error_response(http_error.status, http_error.error_type, http_error.message, request_id)

        headers = {"x-amzn-requestid": request_id}
        renderer: StreamRenderer
        match operation:
            case Operation.CONVERSE_STREAM:
                renderer = ConverseStreamRenderer()
            case Operation.INVOKE_WITH_RESPONSE_STREAM:
                message_id = f"msg_bdrk_{uuid.uuid4().hex}"
                renderer = AnthropicStreamRenderer(message_id, model_id, script.input_tokens)
                # InvokeModelWithResponseStreamResponse.contentType is required and read from this header.
                headers["x-amzn-bedrock-content-type"] = "application/json"
            case _:
                assert_never(operation)
        return EventStreamResponse(script, renderer, self.config, self.recorder, received_at, headers)

    async def health(self, request: Request) -> Response:
        return json_response({"status": "ok"})

    async def requests(self, request: Request) -> Response:
        return json_response(self.recorder.requests())

    async def streams(self, request: Request) -> Response:
        return json_response(self.recorder.streams())

    async def reset(self, request: Request) -> Response:
        self.recorder.reset()
        return json_response({"reset": True})


async def _unknown_operation(request: Request, exc: Exception) -> Response:
    return error_response(404, "UnknownOperationException", "Unknown operation.")


async def _internal_error(request: Request, exc: Exception) -> Response:
    # Starlette logs the traceback; the client only learns that something failed.
    return error_response(500, "InternalServerException", "The emulator failed to handle the request.")


def create_app(config: EmulatorConfig | None = None) -> Starlette:
    """A new emulator app with its own recorder (``app.state.emulator`` holds the handlers)."""
    emulator = Emulator(config or EmulatorConfig())
    routes = [
        # The ASGI path is already percent-decoded, so an ARN model id arrives here with its
        # ':' and '/' restored; the path converter lets it span '/'.
        Route("/model/{model_id:path}/converse-stream", emulator.converse_stream, methods=["POST"]),
        Route(
            "/model/{model_id:path}/invoke-with-response-stream",
            emulator.invoke_with_response_stream,
            methods=["POST"],
        ),
        Route("/_emulator/health", emulator.health, methods=["GET"]),
        Route("/_emulator/requests", emulator.requests, methods=["GET"]),
        Route("/_emulator/streams", emulator.streams, methods=["GET"]),
        Route("/_emulator/reset", emulator.reset, methods=["POST"]),
    ]
    app = Starlette(
        routes=routes,
        exception_handlers={HTTPException: _unknown_operation, Exception: _internal_error},
    )
    app.state.emulator = emulator
    return app


def serve(host: str, port: int, config: EmulatorConfig | None = None, *, log_level: str = "info") -> None:
    """Run the emulator with uvicorn until interrupted."""
    uvicorn.run(
        create_app(config),
        host=host,
        port=port,
        log_level=log_level,
        timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_SECONDS,
    )
