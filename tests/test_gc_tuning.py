"""`hubgate serve` tunes the garbage collector once it has started (HUBGATE_GC_THRESHOLD)."""

from __future__ import annotations

import asyncio
import contextlib
import gc
from collections.abc import Iterator

import pytest

from hubgate.app import create_app
from hubgate.server import EmbeddedServer, tune_gc, uvicorn_config
from hubgate.settings import Settings, SettingsError
from tests.support.emulator_server import EmulatorServer
from tests.support.gateway_server import ensure_aws_env, gateway_settings


@contextlib.contextmanager
def restored_gc() -> Iterator[None]:
    threshold = gc.get_threshold()
    try:
        yield
    finally:
        gc.unfreeze()
        gc.set_threshold(*threshold)


def test_the_threshold_setting_parses_three_integers_or_default() -> None:
    assert Settings().gc_threshold == (10_000, 10, 100)
    assert Settings.from_env({"HUBGATE_GC_THRESHOLD": "20000, 5, 50"}).gc_threshold == (20_000, 5, 50)
    assert Settings.from_env({"HUBGATE_GC_THRESHOLD": "default"}).gc_threshold is None
    for bad in ("1,2", "a,b,c", "1,2,3,4", "-1,10,10"):
        with pytest.raises(SettingsError, match="HUBGATE_GC_THRESHOLD"):
            Settings.from_env({"HUBGATE_GC_THRESHOLD": bad})


def test_tune_gc_freezes_what_exists_and_sets_the_thresholds() -> None:
    with restored_gc():
        gc.unfreeze()
        tune_gc((12_345, 11, 101))
        assert gc.get_threshold() == (12_345, 11, 101)
        assert gc.get_freeze_count() > 1000  # the modules, classes and functions loaded so far


@pytest.mark.parametrize("tune", [True, False])
async def test_the_server_tunes_the_collector_once_started_only_when_asked(
    emulator: EmulatorServer, tune: bool
) -> None:
    settings = gateway_settings(emulator.url, gc_threshold=(23_456, 12, 102))
    ensure_aws_env()
    with restored_gc():
        gc.unfreeze()
        before = gc.get_threshold()
        app = create_app(settings)
        server = EmbeddedServer(uvicorn_config(app, settings, loop="asyncio"), app, settings, tune_gc=tune)
        task = asyncio.create_task(server.serve())
        try:
            async with asyncio.timeout(20):
                while not server.started:
                    assert not task.done(), "the gateway did not start"
                    await asyncio.sleep(0.01)
            if tune:
                assert gc.get_threshold() == (23_456, 12, 102) and gc.get_freeze_count() > 0
            else:
                assert gc.get_threshold() == before and gc.get_freeze_count() == 0
        finally:
            server.should_exit = True
            await asyncio.wait_for(task, timeout=30)
