"""A session stream nobody closes is reaped after `session_idle_timeout_s` (README, *Storage*):
freed, and its playlist ended so no player polls it forever, unless a snapshot lets it go on
(then its media stays open for the resume)."""

from __future__ import annotations

import asyncio

import pytest
import torch

from protos.histream.v1 import stages_pb2
from services.protocol import StreamKind, to_proto
from services.settings import ServeSettings
from services.stages import DecodeStage
from services.storage import Layout, LocalStorage, StorageSettings
from tests.services.harness import run


@pytest.mark.parametrize("snapshot", [False, True])
def test_a_reaped_session_gets_an_ended_playlist_unless_it_can_resume(tmp_path, snapshot):
    settings = ServeSettings(
        preset="tiny", storage=StorageSettings(local_dir=str(tmp_path)),
        session_idle_timeout_s=0.01,
    )  # fmt: skip
    decode, storage, layout = DecodeStage(settings), LocalStorage(tmp_path), Layout()
    latents = to_proto(torch.randn(1, 16, 3, 8, 12, generator=torch.Generator().manual_seed(0)))

    async def go() -> None:
        opened = stages_pb2.OpenStreamRequest(
            session_id="sess_r", object_id="sess_r", kind=StreamKind.SESSION.to_proto(),
            width=96, height=64, fps=16,
        )  # fmt: skip
        await decode.OpenStream(opened)
        await decode.DecodeChunk(
            stages_pb2.ChunkLatents(session_id="sess_r", chunk_index=0, latents=latents)
        )
        if snapshot:
            storage.put(layout.snapshot_key("session", "sess_r"), b"{}")
        await asyncio.sleep(0.05)
        assert decode.reap() == ["sess_r"] and decode.stats()["sessions"] == 0

    run(go())
    playlist = storage.get(layout.session_playlist_key("sess_r")).decode()
    assert "seg-00001.m4s" in playlist
    assert ("#EXT-X-ENDLIST" in playlist) is (not snapshot)
