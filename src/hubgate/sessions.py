"""Server-side multi-turn conversations: a pure history policy and two stores behind one interface.

``trim_history`` decides what a conversation keeps; ``MemorySessionStore`` (one process, tests,
``hubgate dev``) and ``RedisSessionStore`` (shared by every gateway process) only keep it. Neither
knows about WebSockets: the gateway passes the authenticated tenant and user into every call, and
both are part of the storage key, so a session can only be addressed by its owner. Every way of
missing a session (unknown id, malformed id, expired, another tenant's or user's) raises the same
``SessionNotFound`` with the same message, so a client cannot probe for other people's ids.
"""

from __future__ import annotations

import contextlib
import re
import secrets
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal, Protocol
from urllib.parse import quote

import orjson
from redis.asyncio import Redis
from redis.exceptions import RedisError, WatchError

from hubgate.errors import InternalError, InvalidMessage, SessionNotFound
from hubgate.settings import Settings

Role = Literal["user", "assistant"]

# secrets.token_urlsafe(24): 24 random bytes (192 bits) as 32 unpadded base64url characters.
_ID_BYTES = 24
_ID_RE = re.compile(r"[A-Za-z0-9_-]{32}")
_NOT_FOUND = "session not found"
# Optimistic transactions on one session only conflict with the same user's own concurrent
# turns, so a handful of retries is plenty; the bound keeps a pathological loop finite.
_MAX_WATCH_RETRIES = 32
_BLOB_VERSION = 1


@dataclass(frozen=True, slots=True)
class Message:
    """One message of a conversation."""

    role: Role
    content: str


@dataclass(frozen=True, slots=True)
class Session:
    """A stored conversation; ``messages`` never contains the system prompt."""

    id: str
    tenant: str
    user: str
    system: str | None
    messages: tuple[Message, ...]
    created_at: float
    updated_at: float


@dataclass(frozen=True, slots=True)
class HistoryPolicy:
    """How much history a session keeps and how long it lives idle."""

    max_turns: int
    max_tokens: int
    ttl_seconds: float

    def __post_init__(self) -> None:
        if self.max_turns < 1 or self.max_tokens < 1 or self.ttl_seconds <= 0:
            raise ValueError("HistoryPolicy needs max_turns >= 1, max_tokens >= 1 and ttl_seconds > 0")

    @classmethod
    def from_settings(cls, settings: Settings) -> HistoryPolicy:
        return cls(
            max_turns=settings.session_max_turns,
            max_tokens=settings.session_max_tokens,
            ttl_seconds=settings.session_ttl_seconds,
        )


# --- pure history logic ---------------------------------------------------------------------


def estimate_tokens(text: str) -> int:
    """Approximate token count: ``ceil(len(text) / 4)``.

    Four characters per token is the usual rule of thumb for English with the Claude and Llama
    tokenizers; it only has to bound the history roughly, not match a model's own count.
    """
    return (len(text) + 3) // 4


def split_turns(messages: Sequence[Message]) -> list[tuple[Message, ...]]:
    """Group messages into turns: the user message(s) and the assistant reply that follows them.

    A new turn starts at each user message that follows an assistant message.
    """
    turns: list[tuple[Message, ...]] = []
    current: list[Message] = []
    for message in messages:
        if message.role == "user" and current and current[-1].role == "assistant":
            turns.append(tuple(current))
            current = []
        current.append(message)
    if current:
        turns.append(tuple(current))
    return turns


def trim_history(
    messages: Sequence[Message], system: str | None, policy: HistoryPolicy
) -> tuple[Message, ...]:
    """Drop the oldest turns until at most ``max_turns`` remain and system + messages fit ``max_tokens``.

    The system prompt is never dropped, and the newest turn is always kept even when it alone is
    over the budget (the model, not the store, is the judge of a prompt that is too long).
    """
    turns = split_turns(messages)
    budget = policy.max_tokens - (estimate_tokens(system) if system else 0)
    kept = 0
    used = 0
    for turn in reversed(turns):
        cost = sum(estimate_tokens(m.content) for m in turn)
        if kept >= 1 and (kept >= policy.max_turns or used + cost > budget):
            break
        kept += 1
        used += cost
    return tuple(m for turn in turns[len(turns) - kept :] for m in turn)


def apply_turn(
    session: Session, user_messages: Sequence[Message], reply: Message, policy: HistoryPolicy, now: float
) -> Session:
    """The session after one completed turn, trimmed by ``policy``."""
    messages = trim_history((*session.messages, *user_messages, reply), session.system, policy)
    return replace(session, messages=messages, updated_at=now)


def check_turn(user_messages: Sequence[Message], reply: Message) -> None:
    """Raise InvalidMessage unless this is one or more user messages and one assistant reply."""
    if not user_messages:
        raise InvalidMessage("a turn needs at least one user message")
    if any(m.role != "user" for m in user_messages):
        raise InvalidMessage("the messages of a turn before the reply must have role 'user'")
    if reply.role != "assistant":
        raise InvalidMessage("the reply of a turn must have role 'assistant'")


def new_session_id() -> str:
    """A fresh, unguessable session id (192 random bits)."""
    return secrets.token_urlsafe(_ID_BYTES)


def valid_session_id(session_id: str) -> bool:
    """Whether ``session_id`` has the shape ``new_session_id`` produces."""
    return _ID_RE.fullmatch(session_id) is not None


def session_key(tenant: str, user: str, session_id: str) -> str:
    """The Redis key of one session: ``{t:<tenant>}:s:<user>:<id>``.

    Tenant and user are percent-encoded, which leaves ordinary ids unchanged but stops a ``:`` or
    ``}`` in a claim from forging another user's key or moving the key out of its tenant's
    Redis Cluster hash slot (the slot is computed from the ``{...}`` tag).
    """
    return f"{{t:{quote(tenant, safe='')}}}:s:{quote(user, safe='')}:{session_id}"


def encode_session(session: Session) -> bytes:
    return orjson.dumps(
        {
            "v": _BLOB_VERSION,
            "tenant": session.tenant,
            "user": session.user,
            "system": session.system,
            "messages": [[m.role, m.content] for m in session.messages],
            "created_at": session.created_at,
            "updated_at": session.updated_at,
        }
    )


def decode_session(raw: bytes | str, tenant: str, user: str, session_id: str) -> Session:
    """Parse a stored blob; raise ValueError if it is not one ``encode_session`` wrote."""
    try:
        data: Any = orjson.loads(raw)
        messages = []
        for role, content in data["messages"]:
            if role not in ("user", "assistant") or not isinstance(content, str):
                raise ValueError("bad message in stored session")
            messages.append(Message(role, content))
        system = data["system"]
        if system is not None and not isinstance(system, str):
            raise ValueError("bad system prompt in stored session")
        return Session(
            id=session_id,
            tenant=tenant,
            user=user,
            system=system,
            messages=tuple(messages),
            created_at=float(data["created_at"]),
            updated_at=float(data["updated_at"]),
        )
    except (orjson.JSONDecodeError, KeyError, TypeError) as exc:
        raise ValueError("stored session is not readable") from exc


# --- the interface --------------------------------------------------------------------------


class SessionStore(Protocol):
    """Where sessions live. ``now`` is wall-clock seconds (``time.time()``), passed in by the caller."""

    async def create(self, tenant: str, user: str, *, system: str | None = None, now: float) -> Session:
        """Start an empty session with an unguessable id."""
        ...

    async def get(self, tenant: str, user: str, session_id: str, *, now: float) -> Session:
        """The session, its idle TTL refreshed; SessionNotFound if it is not this user's live session."""
        ...

    async def append_turn(
        self,
        tenant: str,
        user: str,
        session_id: str,
        user_messages: Sequence[Message],
        reply: Message,
        *,
        now: float,
    ) -> Session:
        """Add one completed turn, trim the history, refresh the idle TTL; return the stored session."""
        ...

    async def delete(self, tenant: str, user: str, session_id: str) -> None:
        """Remove the session; SessionNotFound if it is not there."""
        ...

    async def aclose(self) -> None:
        """Release what the store owns."""
        ...


# --- in memory ------------------------------------------------------------------------------


@dataclass(slots=True)
class _Entry:
    session: Session
    expires_at: float


class MemorySessionStore:
    """Sessions in a dict, expired by the ``now`` each call passes; for one process only.

    Time only moves through the callers' ``now``: ``delete``, which takes none, judges expiry by
    the latest ``now`` any call has passed, so the store never mixes two clocks.
    """

    def __init__(self, policy: HistoryPolicy) -> None:
        self._policy = policy
        self._latest_now = float("-inf")
        self._entries: dict[tuple[str, str, str], _Entry] = {}
        self._next_sweep = float("-inf")

    async def create(self, tenant: str, user: str, *, system: str | None = None, now: float) -> Session:
        self._sweep(now)
        session_id = new_session_id()
        session = Session(session_id, tenant, user, system, (), created_at=now, updated_at=now)
        self._entries[(tenant, user, session_id)] = _Entry(session, now + self._policy.ttl_seconds)
        return session

    async def get(self, tenant: str, user: str, session_id: str, *, now: float) -> Session:
        entry = self._live((tenant, user, session_id), now)
        entry.expires_at = now + self._policy.ttl_seconds
        return entry.session

    async def append_turn(
        self,
        tenant: str,
        user: str,
        session_id: str,
        user_messages: Sequence[Message],
        reply: Message,
        *,
        now: float,
    ) -> Session:
        check_turn(user_messages, reply)
        entry = self._live((tenant, user, session_id), now)
        # No await between the read and the write: concurrent turns in one event loop serialise.
        entry.session = apply_turn(entry.session, user_messages, reply, self._policy, now)
        entry.expires_at = now + self._policy.ttl_seconds
        return entry.session

    async def delete(self, tenant: str, user: str, session_id: str) -> None:
        key = (tenant, user, session_id)
        self._live(key, self._latest_now)
        del self._entries[key]

    async def aclose(self) -> None:
        self._entries.clear()

    def _live(self, key: tuple[str, str, str], now: float) -> _Entry:
        self._latest_now = max(self._latest_now, now)
        entry = self._entries.get(key)
        if entry is None:
            raise SessionNotFound(_NOT_FOUND)
        if now >= entry.expires_at:
            del self._entries[key]
            raise SessionNotFound(_NOT_FOUND)
        return entry

    def _sweep(self, now: float) -> None:
        self._latest_now = max(self._latest_now, now)
        # Expired sessions nobody asks for again would otherwise stay forever; one pass per TTL
        # keeps the cost amortised and the memory bounded by the sessions of the last two TTLs.
        if now < self._next_sweep:
            return
        self._next_sweep = now + self._policy.ttl_seconds
        for key in [k for k, e in self._entries.items() if now >= e.expires_at]:
            del self._entries[key]


# --- in Redis -------------------------------------------------------------------------------


@contextlib.contextmanager
def _redis_boundary() -> Iterator[None]:
    """Translate redis-py and socket failures into the gateway's hierarchy."""
    try:
        yield
    except (RedisError, OSError) as exc:
        raise InternalError("session store unavailable") from exc


class RedisSessionStore:
    """One JSON string per session at ``session_key(...)``, with an idle TTL refreshed on every access.

    Every operation touches one key, so it works unchanged on Redis Cluster. Concurrent turns on
    one session are serialised with WATCH/MULTI: the loser of a race re-reads and re-applies its
    turn, so none is lost. The client belongs to the caller; ``aclose`` does not close it.
    """

    def __init__(self, client: Redis, policy: HistoryPolicy) -> None:
        self._client = client
        self._policy = policy
        self._ttl_ms = max(1, round(policy.ttl_seconds * 1000))

    async def create(self, tenant: str, user: str, *, system: str | None = None, now: float) -> Session:
        with _redis_boundary():
            # NX: a 192-bit id never collides in practice, but if it did, a fresh one is cheap.
            for _ in range(3):
                session = Session(new_session_id(), tenant, user, system, (), created_at=now, updated_at=now)
                key = session_key(tenant, user, session.id)
                if await self._client.set(key, encode_session(session), px=self._ttl_ms, nx=True):
                    return session
        raise InternalError("could not allocate a session id")

    async def get(self, tenant: str, user: str, session_id: str, *, now: float) -> Session:
        if not valid_session_id(session_id):
            raise SessionNotFound(_NOT_FOUND)
        with _redis_boundary():
            raw = await self._client.getex(session_key(tenant, user, session_id), px=self._ttl_ms)
        if raw is None:
            raise SessionNotFound(_NOT_FOUND)
        return self._decode(raw, tenant, user, session_id)

    async def append_turn(
        self,
        tenant: str,
        user: str,
        session_id: str,
        user_messages: Sequence[Message],
        reply: Message,
        *,
        now: float,
    ) -> Session:
        check_turn(user_messages, reply)
        if not valid_session_id(session_id):
            raise SessionNotFound(_NOT_FOUND)
        key = session_key(tenant, user, session_id)
        with _redis_boundary():
            async with self._client.pipeline(transaction=True) as pipe:
                for _ in range(_MAX_WATCH_RETRIES):
                    try:
                        await pipe.watch(key)
                        raw = await pipe.get(key)
                        if raw is None:
                            raise SessionNotFound(_NOT_FOUND)
                        session = apply_turn(
                            self._decode(raw, tenant, user, session_id),
                            user_messages,
                            reply,
                            self._policy,
                            now,
                        )
                        pipe.multi()  # type: ignore[no-untyped-call]  # unannotated in redis-py
                        # XX: a session that expired between GET and EXEC stays gone.
                        pipe.set(key, encode_session(session), px=self._ttl_ms, xx=True)
                        (stored,) = await pipe.execute()
                    except WatchError:
                        # execute() has already reset the pipeline; re-read and re-apply.
                        continue
                    if not stored:
                        raise SessionNotFound(_NOT_FOUND)
                    return session
        raise InternalError("session is being updated too often to append a turn")

    async def delete(self, tenant: str, user: str, session_id: str) -> None:
        if not valid_session_id(session_id):
            raise SessionNotFound(_NOT_FOUND)
        with _redis_boundary():
            removed = await self._client.delete(session_key(tenant, user, session_id))
        if not removed:
            raise SessionNotFound(_NOT_FOUND)

    async def aclose(self) -> None:
        """Nothing to release: the Redis client is created and closed by the app's lifespan."""

    @staticmethod
    def _decode(raw: bytes | str, tenant: str, user: str, session_id: str) -> Session:
        try:
            return decode_session(raw, tenant, user, session_id)
        except ValueError as exc:
            raise InternalError("stored session is not readable") from exc
