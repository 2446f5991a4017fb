"""Locust users that hold a hubgate WebSocket and run multi-turn chats in server sessions.

    HUBGATE_URL=ws://127.0.0.1:8080/v1/stream HUBGATE_TOKENS=<jwt>,<jwt>,... \\
        .venv/bin/locust -f loadtests/locustfile.py --headless -u 50 -r 10 -t 1m

``loadtests/run_locust.py`` starts a whole local stack and runs this file for you.

Each user picks a token (tokens of several tenants make a multi-tenant load), connects, and then
runs conversations: ``session.create``, then a few ``chat`` turns naming the session, with a
pause between turns. It uses websocket-client, which gevent (and so locust) can switch between.

Reported entries (request type ``WS``):

| name | response time | counts as |
| --- | --- | --- |
| ``connect`` | WebSocket handshake until the ``ready`` frame | success |
| ``session.create`` | message until its ``session`` frame | success |
| ``ttft`` | ``chat`` sent until the first ``delta`` | success |
| ``inter_token`` | mean gap between two ``delta`` frames of one reply | success |
| ``inter_token_p95`` | 95th percentile gap within one reply | success |
| ``stream`` | ``chat`` sent until ``end``; response length = tokens | success |
| ``refused:<code>`` | time until the refusal | failure (an explicit refusal, see below) |
| ``error:<code>`` | time until the error | failure: anything else (``upstream_*``, closes) |

Refusal codes: ``rate_limited``, ``token_rate_limited``, ``too_many_streams``,
``too_many_connections`` (HTTP 429 at the handshake) and ``limiter_unavailable``.

Optional settings: ``HUBGATE_REPLY_TOKENS`` (reply length; default: the emulator's own 16 to 48),
``HUBGATE_TURNS`` (turns per conversation, default ``2-5``), ``HUBGATE_THINK_SECONDS`` (pause
between turns, default ``0.5-2``).
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import time
import uuid
from typing import Any

import websocket
from locust import User, between, task
from locust.exception import StopUser

SUBPROTOCOL = "hubgate.v1"
REFUSALS = frozenset(
    {"rate_limited", "token_rate_limited", "too_many_streams", "too_many_connections", "limiter_unavailable"}
)
WORDS = ("lemon", "harbour", "granite", "violet", "compass", "meadow", "ember", "quartz", "willow", "signal")


def _range(text: str, default: tuple[float, float]) -> tuple[float, float]:
    if not text.strip():
        return default
    low, _, high = text.partition("-")
    return float(low), float(high or low)


class Refused(Exception):
    """The gateway refused explicitly (a rate limit or a cap); counted apart from real errors."""


class StreamFailed(Exception):
    """A reply ended with an error frame or the connection dropped."""


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


class ChatUser(User):
    """One person in a chat app: one connection, conversations of a few turns."""

    wait_time = between(1.0, 3.0)  # between conversations

    def __init__(self, environment: Any) -> None:
        super().__init__(environment)
        self.url = os.environ.get("HUBGATE_URL", "ws://127.0.0.1:8080/v1/stream")
        self.tokens = [t.strip() for t in os.environ.get("HUBGATE_TOKENS", "").split(",") if t.strip()]
        if not self.tokens:
            raise StopUser("HUBGATE_TOKENS is empty")
        reply = os.environ.get("HUBGATE_REPLY_TOKENS", "").strip()
        self.directive = f" [[emulator:tokens={int(reply)}]]" if reply else ""
        low, high = _range(os.environ.get("HUBGATE_TURNS", ""), (2, 5))
        self.turns = (int(low), int(high))
        self.think = _range(os.environ.get("HUBGATE_THINK_SECONDS", ""), (0.5, 2.0))
        self.token = random.choice(self.tokens)
        self.ws: websocket.WebSocket | None = None

    # ------------------------------------------------------------------ reporting

    def _fire(self, name: str, started: float, length: int = 0, exception: Exception | None = None) -> None:
        self._report(name, (time.perf_counter() - started) * 1000, length, exception)

    def _report(self, name: str, millis: float, length: int = 0, exception: Exception | None = None) -> None:
        self.environment.events.request.fire(
            request_type="WS",
            name=name,
            response_time=millis,
            response_length=length,
            exception=exception,
            context={},
        )

    def _refused(self, code: str, started: float, message: str = "") -> None:
        name = f"refused:{code}" if code in REFUSALS else f"error:{code}"
        error: Exception = (
            Refused(f"{code}: {message}") if code in REFUSALS else StreamFailed(f"{code}: {message}")
        )
        self._fire(name, started, exception=error)

    # ------------------------------------------------------------------ connection

    def on_start(self) -> None:
        self._connect()

    def on_stop(self) -> None:
        self._drop()

    def _drop(self) -> None:
        if self.ws is not None:
            with contextlib.suppress(OSError, websocket.WebSocketException):
                self.ws.close()
            self.ws = None

    def _connect(self) -> bool:
        started = time.perf_counter()
        try:
            ws = websocket.create_connection(
                self.url,
                timeout=60,
                subprotocols=[SUBPROTOCOL],
                header=[f"Authorization: Bearer {self.token}"],
                enable_multithread=False,
            )
            ready = json.loads(ws.recv())
        except websocket.WebSocketBadStatusException as exc:
            code = "refused"
            with contextlib.suppress(ValueError, KeyError, TypeError):
                code = json.loads(exc.resp_body or b"{}")["error"]["code"]
            self._refused(code if exc.status_code == 429 else f"http_{exc.status_code}_{code}", started)
            return False
        except (OSError, websocket.WebSocketException) as exc:
            self._fire("error:connect", started, exception=StreamFailed(str(exc)))
            return False
        if ready.get("type") != "ready":
            ws.close()
            self._fire("error:connect", started, exception=StreamFailed(f"first frame {ready.get('type')}"))
            return False
        self.ws = ws
        self._fire("connect", started)
        return True

    def _send(self, message: dict[str, Any]) -> None:
        assert self.ws is not None
        self.ws.send(json.dumps(message))

    def _recv(self) -> dict[str, Any]:
        assert self.ws is not None
        frame: dict[str, Any] = json.loads(self.ws.recv())
        return frame

    # ------------------------------------------------------------------ the conversation

    @task
    def conversation(self) -> None:
        if self.ws is None and not self._connect():
            return
        try:
            session = self._create_session()
            if session is None:
                return
            for turn in range(random.randint(*self.turns)):
                if turn:
                    time.sleep(random.uniform(*self.think))
                if not self._chat(session, turn):
                    return
        except (OSError, websocket.WebSocketException, ValueError) as exc:
            # The connection dropped (a restart closes with 1012): reconnect on the next task.
            self._report("error:connection_lost", 0, exception=StreamFailed(str(exc)))
            self._drop()

    def _create_session(self) -> str | None:
        request_id = uuid.uuid4().hex
        started = time.perf_counter()
        self._send({"type": "session.create", "id": request_id, "system": "Answer briefly."})
        while True:
            frame = self._recv()
            if frame.get("id") != request_id:
                continue
            if frame.get("type") == "session":
                self._fire("session.create", started)
                return str(frame["session"])
            self._refused(str(frame.get("code", "error")), started, str(frame.get("message", "")))
            return None

    def _chat(self, session: str, turn: int) -> bool:
        request_id = uuid.uuid4().hex
        text = " ".join(random.choices(WORDS, k=6)) + f" (turn {turn + 1})" + self.directive
        started = time.perf_counter()
        self._send(
            {
                "type": "chat",
                "id": request_id,
                "session": session,
                "messages": [{"role": "user", "content": text}],
            }
        )
        gaps: list[float] = []
        last: float | None = None
        tokens = 0
        while True:
            frame = self._recv()
            if frame.get("id") != request_id:
                continue  # pong, auth.expiring, frames of nothing we asked for
            kind = frame.get("type")
            if kind == "delta":
                now = time.perf_counter()
                if last is None:
                    self._report("ttft", (now - started) * 1000)
                else:
                    gaps.append((now - last) * 1000)
                last = now
                tokens += 1
            elif kind == "end":
                self._fire("stream", started, length=tokens)
                if gaps:
                    # One aggregate per reply, not one entry per token.
                    self._report("inter_token", sum(gaps) / len(gaps))
                    self._report("inter_token_p95", _percentile(gaps, 0.95))
                return True
            elif kind == "error":
                # With or without seq, an error naming this id is the request's last frame.
                self._refused(str(frame.get("code", "error")), started, str(frame.get("message", "")))
                return False
