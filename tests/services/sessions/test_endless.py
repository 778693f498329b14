"""Endless sessions without Ray: the real stages in this process, a session with a cap far past
any video length running chunk after chunk with the same bytes held (record, snapshot, HLS
window), resumable from its snapshot with the same latents as if never interrupted."""

from __future__ import annotations

import asyncio
import dataclasses

import pytest
import torch

from histream_model.components import load_components
from histream_model.generator import HiStreamGenerator
from protos.histream.v1 import stages_pb2
from services.protocol import EndReason, StreamKind, from_proto
from services.sessions import SessionDriver
from services.sessions.restore import Durability, SnapshotStore
from services.storage import Layout, LocalStorage
from tests.services.fakes import real_stages
from tests.services.harness import run, session_plan

CAP = 1 + 4 * (3 * 400 - 1)  # 400 chunks of the tiny preset: far past the 481-frame limit
REPLAY = 4  # hls_window_segments: the playlist's window, and what a record keeps at least
RUN = 26


def endless_plan():
    plan = session_plan(StreamKind.SESSION, "histream+", CAP, "sess_e", "a fox", seed=5)
    return dataclasses.replace(plan, endless=True)


def test_an_endless_session_holds_the_same_bytes_and_resumes_exactly(tmp_path):
    store = LocalStorage(tmp_path / "store")
    snapshots = SnapshotStore(store, Layout())
    durability = Durability(store=snapshots, replay_chunks=REPLAY)
    stages = real_stages(tmp_path / "store", window=REPLAY)
    driver = SessionDriver(stages.handles, endless_plan(), durability)
    sizes, latents, kept = [], [], []

    async def first_part() -> stages_pb2.SessionSnapshot:
        await driver.open()
        async for chunk in driver.chunks():
            latents.append(from_proto(chunk.latents))
            snapshot = await snapshots.load("session", "sess_e")
            sizes.append(len(snapshot.SerializeToString()))
            kept.append((len(driver.record.frames), len(driver.record.latents)))
            if chunk.index == RUN - 1:
                break
        await driver.suspend(EndReason.DISCONNECTED, 3600)
        return await snapshots.load("session", "sess_e")

    snapshot = run(first_part(), 120)
    # past the chunks a record keeps (those a restore or a decoder's resume reads: 11 here),
    # the record and the snapshot stop growing (a varint's byte or two aside)
    keep = driver.record.replay
    assert keep == 11 and sizes[keep + 2] < 2 * sizes[keep // 2]
    assert max(sizes[keep + 2 :]) - min(sizes[keep + 2 :]) <= 8, sizes
    assert len(set(kept[keep + 2 :])) == 1 and kept[-1][0] == keep, kept
    assert snapshot.spec.endless and snapshot.next_chunk == RUN
    assert snapshot.first_chunk == RUN - keep
    assert snapshot.frames_before == 9 + 12 * (RUN - keep - 1)
    assert [c.index for c in snapshot.chunks] == [0, *range(RUN - keep, RUN)]

    # the live HLS window lists the latest REPLAY segments; older ones beyond twice it are gone
    prefix = Layout().session_prefix("sess_e")
    playlist = store.get(prefix + "playlist.m3u8").decode()
    assert "#EXT-X-PLAYLIST-TYPE" not in playlist and "#EXT-X-ENDLIST" not in playlist
    assert f"#EXT-X-MEDIA-SEQUENCE:{RUN - REPLAY}" in playlist
    assert playlist.count("#EXTINF") == REPLAY
    segments = [k for k in store.list(prefix) if k.endswith(".m4s")]
    assert segments == [f"{prefix}seg-{i:05d}.m4s" for i in range(RUN - 2 * REPLAY + 1, RUN + 1)]

    # resumed from the snapshot on fresh stages, it goes on with the uninterrupted latents
    fresh = real_stages(tmp_path / "store", window=REPLAY)
    again = SessionDriver(fresh.handles, endless_plan(), durability, snapshot=snapshot)

    async def second_part() -> None:
        await again.resume()
        async for chunk in again.chunks():
            latents.append(from_proto(chunk.latents))
            if chunk.index == RUN + 1:
                break
        await again.close(EndReason.CLOSED)

    run(second_part(), 120)
    c = load_components("tiny", device="cpu")
    gen = HiStreamGenerator(c.dit, c.preset, "histream+")
    state = gen.start(c.text.encode(["a fox"]), 64, 96, CAP, seed=5)
    want = [gen.step(state).latents for _ in range(RUN + 2)]
    assert len(latents) == RUN + 2
    for index, (got, expected) in enumerate(zip(latents, want, strict=True)):
        # the resumed chunks replay a window of 2 (snapshot_window_chunks): near, not bitwise
        if index < RUN:
            assert torch.equal(got, expected), index
        else:
            assert torch.allclose(got, expected, atol=1e-3), index


@pytest.mark.parametrize(
    ("first_chunk", "last_chunk", "error"),
    [
        (13, 12, None),  # the chunk before the oldest kept: resend from 13
        (13, 25, None),  # every chunk delivered: nothing to resend
        (13, 5, "last_chunk=5 must be in [12, 25]: the session has delivered chunks 0..25; "
                "chunks before 13 are no longer kept"),
        (0, 26, "last_chunk=26 must be in [-1, 25]: the session has delivered chunks 0..25"),
    ],
)  # fmt: skip
def test_a_resume_names_the_chunks_it_can_still_resend(tmp_path, first_chunk, last_chunk, error):
    """README, *Endless sessions*: a resume re-sends from the oldest chunk kept; an older
    `last_chunk` answers invalid_argument naming the range."""
    import hashlib
    import time as clock

    from services.errors import InvalidArgument
    from services.sessions.resume import resumable

    store = SnapshotStore(LocalStorage(tmp_path / "s"), Layout())
    snapshot = stages_pb2.SessionSnapshot(
        object_id="sess_e", next_chunk=26, first_chunk=first_chunk,
        token_sha256=hashlib.sha256(b"tok").hexdigest(), resumable_until=int(clock.time()) + 60,
    )  # fmt: skip
    snapshot.spec.tenant = "default"

    async def go():
        await store.save(snapshot, "session")
        return await resumable(store, "sess_e", "tok", last_chunk, "default")

    if error is None:
        assert asyncio.run(go()).first_chunk == first_chunk
    else:
        with pytest.raises(InvalidArgument) as raised:
            asyncio.run(go())
        assert raised.value.message == error and raised.value.param == "last_chunk"
