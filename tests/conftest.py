"""Session-wide fixtures: real dependencies on free loopback ports."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pytest

from hubgate.settings import Settings
from hubgate.tokens import mint_dev_token
from tests.support.emulator_server import EmulatorServer
from tests.support.gateway_server import TEST_SECRET, gateway_settings, running_gateway
from tests.support.moto_server import MotoServer
from tests.support.redis_server import RedisServer
from tests.support.sts_proxy import StsProxy


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """One private redis-server for the whole test session (tests flush what they use)."""
    server = RedisServer()
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def fresh_redis_server() -> Iterator[RedisServer]:
    """A private redis-server for one test that kills or restarts it."""
    server = RedisServer()
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(params=["memory", "redis"])
def limiter_url(request: pytest.FixtureRequest, redis_server: RedisServer) -> str | None:
    """Run a test against the in-memory limiter (None) and against Redis (its URL)."""
    return None if request.param == "memory" else redis_server.url


@pytest.fixture(scope="session")
def emulator() -> Iterator[EmulatorServer]:
    """The Bedrock runtime emulator in its own process, shared by the session."""
    server = EmulatorServer()
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def second_emulator() -> Iterator[EmulatorServer]:
    """Another emulator process, for a test that needs two distinct Bedrock endpoints."""
    server = EmulatorServer()
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
async def sts(moto_server: MotoServer) -> AsyncIterator[StsProxy]:
    """STS for route tests: moto behind a proxy that records and can refuse AssumeRole."""
    proxy = StsProxy(moto_server.url)
    await proxy.start()
    try:
        yield proxy
    finally:
        await proxy.stop()


@pytest.fixture
def mint() -> Callable[..., str]:
    """Mint an HS256 token signed with the test secret: mint(tenant="acme", user="alice", ...)."""

    def _mint(tenant: str = "acme", user: str = "alice", lifetime: float = 600, **kwargs: Any) -> str:
        return mint_dev_token(TEST_SECRET, tenant=tenant, user=user, lifetime_seconds=lifetime, **kwargs)

    return _mint


@pytest.fixture
async def gateway(emulator: EmulatorServer) -> AsyncIterator[Settings]:
    """A real gateway (uvicorn, in this test's loop) in front of the emulator; yields its settings."""
    settings = gateway_settings(emulator.url)
    async with running_gateway(settings):
        yield settings


def ws_url(settings: Settings) -> str:
    return f"ws://127.0.0.1:{settings.port}/v1/stream"


@pytest.fixture(scope="session")
def moto_server() -> Iterator[MotoServer]:
    """moto in server mode (DynamoDB, STS, Cognito), shared by the session; tests use unique names."""
    server = MotoServer()
    server.start()
    try:
        yield server
    finally:
        server.stop()
