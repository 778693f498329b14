"""A driver touches the stages holding its session every `session_idle_timeout_s / 3` (README,
*Sessions that survive*: a dead gateway replica's drivers stop touching, so the stages free its
sessions within `session_idle_timeout_s`)."""

from __future__ import annotations

import asyncio

import services.sessions.remote as remote_module
from services.gateway.core import GatewayCore
from services.protocol import StreamKind
from services.sessions import Durability, SessionDriver
from services.settings import ServeSettings
from services.storage import StorageSettings
from tests.services.fakes import fake_stages
from tests.services.harness import FakeClock, Overlay, run, session_plan, settle


def test_the_gateways_drivers_touch_every_third_of_the_stages_idle_timeout(tmp_path):
    settings = ServeSettings(preset="tiny", storage=StorageSettings(local_dir=str(tmp_path)))
    core = GatewayCore(settings, fake_stages().handles)
    assert settings.session_idle_timeout_s == 15
    assert core.durability.heartbeat_s == 5.0


def test_a_driver_touches_its_stages_at_its_heartbeat_and_a_dead_one_stops(monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr(remote_module, "asyncio", Overlay(asyncio, sleep=clock.sleep))
    stages = fake_stages()
    plan = session_plan(StreamKind.SESSION, "histream+", 33, "sess_h")
    driver = SessionDriver(stages.handles, plan, Durability(heartbeat_s=5.0))

    async def go() -> tuple[list, list]:
        await driver.open()
        await settle()
        touched = stages.journal.find("Touch")
        beating = driver.stages._beating
        beating.cancel()  # the gateway replica died: its tasks are gone
        await asyncio.gather(beating, return_exceptions=True)
        before = len(stages.journal.find("Touch"))
        clock.now += 60
        await settle()
        return touched, [before, len(stages.journal.find("Touch"))]

    touched, counts = run(go())
    assert clock.sleeps and set(clock.sleeps) == {5.0}  # between touches: the heartbeat
    assert {e.stage for e in touched} == {"structure", "refine", "decode"}
    assert counts[0] == counts[1]  # none after the driver is gone
