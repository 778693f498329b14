"""The gateway core without Ray: readiness and what clients get when storage fails."""

from __future__ import annotations

import asyncio

import pytest

from services.errors import Unavailable
from services.gateway.core import GatewayCore
from services.gateway.requests import VideoCreate
from services.sessions import StageHandles
from services.settings import ServeSettings
from services.storage import LocalStorage, StorageSettings


class Answering:
    """A stage handle whose `stats` answers (or never does)."""

    def __init__(self, hangs: bool = False) -> None:
        self.hangs = hangs

    @property
    def stats(self):
        handle = self

        class Remote:
            @staticmethod
            async def remote() -> dict:
                if handle.hangs:
                    await asyncio.Event().wait()
                return {"sessions": 0}

        return Remote


class Down(LocalStorage):
    """Storage whose every call fails the way an unreachable endpoint does."""

    def _fail(self, *args, **kwargs):
        raise ConnectionRefusedError("connection refused (port 9)")

    put = get = exists = list = delete = delete_prefix = _fail


def core(tmp_path, stages=(False, False, False)) -> GatewayCore:
    settings = ServeSettings(preset="tiny", storage=StorageSettings(local_dir=str(tmp_path)))
    return GatewayCore(settings, StageHandles(*(Answering(h) for h in stages)))


def test_ready_when_storage_and_every_stage_answer(tmp_path):
    ready, body = asyncio.run(core(tmp_path).readiness())
    assert ready and set(body["checks"].values()) == {"ok"}


def test_not_ready_while_a_stage_or_storage_does_not_answer(tmp_path, monkeypatch):
    monkeypatch.setattr("services.gateway.core.READY_TIMEOUT_S", 0.05)
    gateway = core(tmp_path, stages=(False, True, False))
    gateway.records.storage = Down(tmp_path)
    ready, body = asyncio.run(gateway.readiness())
    assert not ready and body["status"] == "not_ready"
    assert body["checks"] == {
        "storage": "failed (ConnectionRefusedError)",
        "StructureStage": "ok",
        "RefineStage": "failed (TimeoutError)",
        "DecodePool": "ok",
    }


def test_storage_down_is_503_with_an_error_id_not_the_details(tmp_path):
    gateway = core(tmp_path)
    gateway.records.storage = Down(tmp_path)

    async def go() -> None:
        with pytest.raises(Unavailable, match=r"storage is unavailable; retry later \(quote err_"):
            await gateway.videos.create(VideoCreate(prompt="a fox", seconds=1))
        with pytest.raises(Unavailable) as err:
            await gateway.videos.get("video_1")
        assert err.value.http_status == 503 and "port 9" not in err.value.message

    asyncio.run(go())
