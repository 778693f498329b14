"""Per-tenant quotas at admission, without Ray: a tenants file, records in a local directory."""

from __future__ import annotations

import asyncio
import json
from types import SimpleNamespace

import pytest

from histream_model.config import get_preset
from services.errors import QuotaExceeded
from services.gateway import quotas as quotas_module
from services.gateway.quotas import QuotaKeeper
from services.jobs import RecordStore, VideoRecord, VideoStatus
from services.protocol import Generation, video_shape
from services.storage import Layout, LocalStorage
from services.tenants import Tenancy
from tests.services.harness import FakeClock

QUOTAS = {"max_videos": 2, "max_sessions": 1, "max_frames": 45, "max_size": "128x64",
          "frames_per_hour": 60, "requests_per_minute": 2}  # fmt: skip


def keeper(tmp_path, open_sessions=lambda tenant: 0) -> QuotaKeeper:
    path = tmp_path / "tenants.json"
    document = {
        "defaults": {"max_frames": 21},
        "tenants": {"capped": {"keys": ["k-capped"], "quotas": QUOTAS},
                    "plain": {"keys": ["k-plain"]}},
    }  # fmt: skip
    path.write_text(json.dumps(document))
    records = RecordStore(LocalStorage(tmp_path / "store"), Layout())
    return QuotaKeeper(Tenancy(str(path), "default"), records, open_sessions, retry_after_s=5)


def generation(frames: int = 21, width: int = 96, height: int = 64) -> Generation:
    shape = video_shape(get_preset("tiny"), "histream+", height, width, frames)
    return Generation(model="tiny", prompt="a cat", shape=shape, seed=0, seconds="1")


def over(work) -> QuotaExceeded:
    with pytest.raises(QuotaExceeded) as err:
        asyncio.run(work()) if asyncio.iscoroutinefunction(work) else work()
    assert err.value.http_status == 429 and err.value.code == "quota_exceeded"
    return err.value


def test_a_request_over_max_frames_or_max_size_is_refused_without_retry_after(tmp_path):
    quotas = keeper(tmp_path)

    async def frames():
        await quotas.admit_video("capped", generation(frames=57))

    err = over(frames)
    assert err.message == ("tenant 'capped' may ask for at most 45 frames (max_frames quota); "
                           "this request asks for 57")  # fmt: skip
    assert err.retry_after_s is None and err.param == "num_frames"
    err = over(lambda: quotas.admit_session("capped", generation(width=192, height=128)))
    assert "at most 128x64 (max_size quota); this request asks for 192x128" in err.message
    # a tenant with no quotas of its own has the file's defaults
    err = over(lambda: quotas.admit_session("plain", generation(frames=33)))
    assert "at most 21 frames" in err.message
    quotas.admit_session("plain", generation(frames=21))


def test_max_videos_counts_the_tenants_queued_and_running_jobs_in_storage(tmp_path):
    quotas = keeper(tmp_path)
    records = quotas.records.for_tenant("capped")

    async def go():
        for i, status in enumerate([VideoStatus.queued, VideoStatus.in_progress,
                                    VideoStatus.completed]):  # fmt: skip
            record = VideoRecord(id=f"video_{i}", model="tiny", created_at=1, seconds="1",
                                 size="96x64", prompt="p", seed=0, mode="histream+",
                                 num_frames=21, tenant="capped", status=status)  # fmt: skip
            await records.put(record)
        assert await quotas.active_videos("capped") == 2
        assert await quotas.active_videos("plain") == 0
        await quotas.admit_video("capped", generation())

    err = over(go)
    assert err.message.startswith("tenant 'capped' is at its max_videos quota: 2 of 2 video")
    assert err.retry_after_s == 5


def test_max_sessions_counts_the_tenants_open_sessions(tmp_path):
    open_now = {"capped": 1}
    quotas = keeper(tmp_path, open_sessions=lambda tenant: open_now.get(tenant, 0))
    err = over(lambda: quotas.admit_session("capped", generation()))
    assert "max_sessions quota: 1 of 1 sessions open" in err.message and err.retry_after_s == 5
    open_now["capped"] = 0
    quotas.admit_session("capped", generation())


def test_frames_per_hour_roll_over_and_retry_after_says_when(tmp_path, monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr(quotas_module, "time", SimpleNamespace(monotonic=clock.monotonic))
    quotas = keeper(tmp_path)
    quotas.admit_session("capped", generation(frames=21))  # t=0
    clock.now = 600.0
    quotas.admit_session("capped", generation(frames=33))  # 54 of 60
    err = over(lambda: quotas.admit_session("capped", generation(frames=21)))
    assert "frames_per_hour quota: 54 of 60 frames asked for in the last hour" in err.message
    assert err.retry_after_s == 3000  # the first 21 age out at t=3600
    clock.now = 3600.0
    quotas.admit_session("capped", generation(frames=21))
    usage = asyncio.run(quotas.usage("capped"))
    assert usage["usage"] == {"sessions": 0, "videos": 0, "frames_last_hour": 54}
    assert usage["quotas"]["frames_per_hour"] == 60


def test_requests_per_minute_allow_a_minutes_burst_then_one_every_share(tmp_path, monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr(quotas_module, "time", SimpleNamespace(monotonic=clock.monotonic))
    quotas = keeper(tmp_path)
    quotas.admit_request("capped")
    quotas.admit_request("capped")
    err = over(lambda: quotas.admit_request("capped"))
    assert err.message == (
        "tenant 'capped' is at its requests_per_minute quota (2); retry after 30 s"
    )
    assert err.retry_after_s == 30
    clock.now = 30.0  # one request's share of the minute has passed
    quotas.admit_request("capped")
    for _ in range(50):
        quotas.admit_request("plain")  # no such quota


def test_an_endless_session_is_capped_by_what_the_tenant_may_still_ask_for(tmp_path):
    quotas = keeper(tmp_path)
    assert quotas.endless_limits("plain") == (None, 21)  # the file's default max_frames
    assert quotas.endless_limits("capped") == (None, 45)  # max_frames below frames_per_hour
    quotas.admit_session("capped", generation(frames=21))
    assert quotas.endless_limits("capped") == (None, 39)  # 60 - 21 left in the hour
