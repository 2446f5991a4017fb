"""Running Lua scripts on Redis: calls made together leave together, in one round trip.

The limiter, the resume buffer and the usage aggregates each keep their state in Redis through
Lua scripts. When a request ends, it settles its reservation, writes its frames for resume and
adds its usage; those three calls are made at the same moment, and ``ScriptRunner`` sends them as
one pipeline. More generally, every ``run`` made before the event loop gets back to the runner's
sending task joins the same pipeline: under load, calls of many requests share round trips.

The runner uses EVALSHA and handles NOSCRIPT (Redis restarted, failed over to a replica without
the scripts, or was told SCRIPT FLUSH) by loading the script and running the call again.
Errors reach the caller as redis-py raised them (``RedisError``, ``OSError``); a call that
Redis answered with an error gets that error, the other calls of its pipeline their replies.

A call may give Redis a time to answer (``reply_within``), counted from when its pipeline leaves,
not from when the call was made: in a burst, calls wait for the event loop to get back to the
runner, and that wait says nothing about Redis. A call past its time fails with ``TimeoutError``
while the pipeline goes on (Redis may still run it; see ``RedisLimiter.admit``).
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import NoScriptError

Arg = str | bytes | int | float


@dataclass(frozen=True, slots=True)
class Script:
    """A Lua script and its SHA1, computed once; run with EVALSHA."""

    source: str
    sha: str

    @classmethod
    def of(cls, source: str) -> Script:
        return cls(source, hashlib.sha1(source.encode()).hexdigest())


@dataclass(slots=True)
class _Call:
    script: Script
    keys: Sequence[str]
    args: Sequence[Arg]
    reply: asyncio.Future[Any]
    reply_within: float | None = None
    late: Callable[[Any], None] | None = None  # gets the reply of a call its caller gave up on

    def words(self) -> tuple[Arg, ...]:
        return (self.script.sha, len(self.keys), *self.keys, *self.args)


class ScriptRunner:
    """EVALSHA calls on one Redis client, pipelined when several are made at once.

    ``batches`` and ``calls`` count what was sent (a batch is one round trip); ``script_loads``
    counts NOSCRIPT recoveries. The client belongs to the caller.
    """

    def __init__(self, client: Redis) -> None:
        self.client = client
        self._pending: list[_Call] = []
        self._sender: asyncio.Task[None] | None = None
        self.batches = 0
        self.calls = 0
        self.script_loads = 0
        self.last_batch: tuple[str, ...] = ()  # the SHA1s of the latest batch, in order

    def counter(self, name: str) -> Callable[[], float]:
        """A reader of one of the counts, for a metric collected at scrape time."""
        return lambda: float(getattr(self, name))

    async def run(
        self,
        script: Script,
        keys: Sequence[str],
        args: Sequence[Arg],
        *,
        reply_within: float | None = None,
        late: Callable[[Any], None] | None = None,
    ) -> Any:
        """Run one script; it leaves with every other call made before the loop moves on.

        ``reply_within``: seconds Redis has to answer once the call has left; TimeoutError after.
        ``late``: called with Redis's reply when the call left but its caller had given up on it
        (timed out or cancelled), so that what the script did can be undone.
        """
        reply: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending.append(_Call(script, keys, args, reply, reply_within, late))
        if self._sender is None:
            # A task's first step runs once the callbacks already scheduled have run: calls made
            # by them (the other parts of the same request's ending) join this batch.
            self._sender = asyncio.get_running_loop().create_task(self._send(), name="hubgate-redis-scripts")
        return await reply

    async def _send(self) -> None:
        batch, self._pending, self._sender = self._pending, [], None
        live = [call for call in batch if not call.reply.done()]  # a caller may have given up
        if not live:
            return
        self.batches += 1
        self.calls += len(live)
        self.last_batch = tuple(call.script.sha for call in live)
        loop = asyncio.get_running_loop()
        timers = [
            loop.call_later(call.reply_within, _time_out, call.reply)
            for call in live
            if call.reply_within is not None
        ]
        try:
            replies = await self._execute(live)
            missing = [
                call for call, reply in zip(live, replies, strict=True) if isinstance(reply, NoScriptError)
            ]
            if missing:
                for script in {call.script.sha: call.script for call in missing}.values():
                    await self.client.script_load(script.source)
                    self.script_loads += 1
                again = iter(await self._execute(missing))
                replies = [next(again) if isinstance(reply, NoScriptError) else reply for reply in replies]
        except BaseException as exc:  # the connection failed (or we were cancelled): every call fails
            for call in live:
                if not call.reply.done():
                    call.reply.set_exception(exc if isinstance(exc, Exception) else ConnectionError(str(exc)))
            if not isinstance(exc, Exception):
                raise
            return
        finally:
            for timer in timers:
                timer.cancel()
        for call, reply in zip(live, replies, strict=True):
            if call.reply.done():
                if call.late is not None and not isinstance(reply, Exception):
                    call.late(reply)
                continue
            if isinstance(reply, Exception):
                call.reply.set_exception(reply)
            else:
                call.reply.set_result(reply)

    async def _execute(self, calls: list[_Call]) -> list[Any]:
        """The replies in order; an error reply is returned in its place, not raised."""
        if len(calls) == 1:
            try:
                return [await self.client.evalsha(*calls[0].words())]  # type: ignore[arg-type]
            except NoScriptError as exc:
                return [exc]
        async with self.client.pipeline(transaction=False) as pipe:
            for call in calls:
                pipe.evalsha(*call.words())  # type: ignore[arg-type]
            replies: list[Any] = await pipe.execute(raise_on_error=False)
        return replies


def _time_out(reply: asyncio.Future[Any]) -> None:
    if not reply.done():
        reply.set_exception(TimeoutError("redis did not answer in time"))
