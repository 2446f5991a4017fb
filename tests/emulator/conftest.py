"""Fixtures for the emulator's real-server tests: one emulator process, a fresh botocore client per test."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import Any

import aioboto3
import pytest
from botocore.config import Config

from tests.support.emulator_server import EmulatorServer

ACCESS_KEY_ID = "AKIDEXAMPLE"
SECRET_ACCESS_KEY = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"
REGION = "us-east-1"
# botocore's `max_attempts` counts retries, so 1 would still allow one retry of a 429/5xx;
# `total_max_attempts` counts the first try too, and 1 means exactly one request.
NO_RETRIES = Config(retries={"total_max_attempts": 1, "mode": "standard"}, connect_timeout=5, read_timeout=10)


@pytest.fixture(scope="session")
def emulator_process() -> Iterator[EmulatorServer]:
    """One emulator with no configured delays, for every test in this package."""
    server = EmulatorServer()
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def emulator_server(emulator_process: EmulatorServer) -> EmulatorServer:
    """The shared emulator with its request log and stream counters cleared."""
    emulator_process.reset()
    return emulator_process


def bedrock_session(session_token: str | None = None) -> aioboto3.Session:
    return aioboto3.Session(
        aws_access_key_id=ACCESS_KEY_ID,
        aws_secret_access_key=SECRET_ACCESS_KEY,
        aws_session_token=session_token,
        region_name=REGION,
    )


@pytest.fixture
async def bedrock(emulator_server: EmulatorServer) -> AsyncIterator[Any]:
    """A real aioboto3 bedrock-runtime client pointed at the emulator, without retries."""
    async with bedrock_session().client(
        "bedrock-runtime", endpoint_url=emulator_server.url, config=NO_RETRIES
    ) as client:
        yield client
