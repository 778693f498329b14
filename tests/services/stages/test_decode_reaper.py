"""A session stream nobody closes is reaped after `session_idle_timeout_s` (README, *Storage*):
freed, and its playlist ended so no player polls it forever, unless a snapshot lets it go on
(then its media stays open for the resume)."""

from __future__ import annotations

import asyncio
import time

import pytest
import torch

from protos.histream.v1 import stages_pb2
from services.protocol import StreamKind, to_proto
from services.settings import ServeSettings
from services.stages import DecodeStage
from services.storage import Layout, LocalStorage, StorageSettings
from tests.services.harness import run


def session_opened(session_id: str) -> stages_pb2.OpenStreamRequest:
    return stages_pb2.OpenStreamRequest(
        session_id=session_id, object_id=session_id, kind=StreamKind.SESSION.to_proto(),
        width=96, height=64, fps=16,
    )  # fmt: skip


async def freed_by_the_reaper(decode: DecodeStage, within_s: float = 10.0) -> None:
    """Wait for the stage's own background reaper (every 0.5 s at the least) to free every
    session."""
    for _ in range(int(within_s / 0.05)):
        if decode.stats()["sessions"] == 0:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"the reaper left {decode.stats()['sessions']} sessions")


@pytest.mark.parametrize("snapshot", [False, True])
def test_a_reaped_session_gets_an_ended_playlist_unless_it_can_resume(tmp_path, snapshot):
    settings = ServeSettings(
        preset="tiny", storage=StorageSettings(local_dir=str(tmp_path)),
        session_idle_timeout_s=0.01,
    )  # fmt: skip
    decode, storage, layout = DecodeStage(settings), LocalStorage(tmp_path), Layout()
    latents = to_proto(torch.randn(1, 16, 3, 8, 12, generator=torch.Generator().manual_seed(0)))

    async def go() -> None:
        await decode.OpenStream(session_opened("sess_r"))
        await decode.DecodeChunk(
            stages_pb2.ChunkLatents(session_id="sess_r", chunk_index=0, latents=latents)
        )
        if snapshot:
            storage.put(layout.snapshot_key("session", "sess_r"), b"{}")
        await freed_by_the_reaper(decode)

    run(go())
    playlist = storage.get(layout.session_playlist_key("sess_r")).decode()
    assert "seg-00001.m4s" in playlist
    assert ("#EXT-X-ENDLIST" in playlist) is (not snapshot)


def test_a_decode_running_longer_than_the_idle_timeout_is_not_reaped_under_it(tmp_path):
    """A call in flight is use: the reaper (every 0.5 s) passes over a session whose decode
    takes longer than `session_idle_timeout_s`, and frees it only once it is idle after it."""
    settings = ServeSettings(
        preset="tiny", storage=StorageSettings(local_dir=str(tmp_path)),
        session_idle_timeout_s=0.01,
    )  # fmt: skip
    decode = DecodeStage(settings)
    decode_frames = decode.vae.decode_frames

    def slow_decode(*args, **kwargs):  # fault injection: a decode slower than the timeout
        time.sleep(1.5)
        return decode_frames(*args, **kwargs)

    decode.vae.decode_frames = slow_decode
    latents = to_proto(torch.randn(1, 16, 3, 8, 12, generator=torch.Generator().manual_seed(0)))

    async def go() -> None:
        await decode.OpenStream(session_opened("sess_slow"))
        segment = await decode.DecodeChunk(
            stages_pb2.ChunkLatents(session_id="sess_slow", chunk_index=0, latents=latents)
        )
        assert segment.num_frames > 0 and segment.data
        assert decode.stats()["sessions"] == 1
        await freed_by_the_reaper(decode)

    run(go())
