"""The grpc stage transport's link, without Ray: `ReplicaLink` asks a directory (Serve's router,
in production: `StageAddress` through the deployment handle) which replica holds a session,
keeps the answer, and calls that replica's gRPC server; a replica lost under a session is asked
for anew when the driver restores, and the session goes on on another replica with the latents
and fMP4 bytes of an uninterrupted run."""

from __future__ import annotations

import dataclasses

import pytest

from histream_model.config import get_preset
from protos.histream.v1 import stages_pb2
from services.errors import ReplicaLost, SessionNotHeld
from services.link import StageServer
from services.link.replicas import ReplicaLink, stage_link
from services.protocol import EndReason, StreamKind
from services.sessions import SessionDriver
from services.settings import ServeSettings
from services.stages import DecodeStage
from services.storage import StorageSettings
from tests.services.fakes import real_stages
from tests.services.harness import run, session_plan

TINY = get_preset("tiny")


class Directory:
    """Stands in for Serve's session routing: the replica address every `StageAddress` call
    answers (changed by the test, as a replica set change would), and who asked."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.asked: list[str | None] = []

    def options(self, session_id: str | None = None) -> _Asking:
        return _Asking(self, session_id)

    @property
    def StageAddress(self) -> _Asking:
        return _Asking(self, None)


@dataclasses.dataclass
class _Asking:
    directory: Directory
    session_id: str | None

    @property
    def StageAddress(self) -> _Asking:
        return self

    async def remote(self) -> str:
        self.directory.asked.append(self.session_id)
        return self.directory.address


@pytest.fixture
def two_decoders(tmp_path):
    """Two decode replicas sharing one storage, each on its own gRPC server."""
    settings = ServeSettings(preset="tiny", storage=StorageSettings(local_dir=str(tmp_path / "s")))
    servers = [StageServer(DecodeStage(settings), "DecodeStage", "127.0.0.1:0", TINY) for _ in "ab"]
    targets = [f"127.0.0.1:{s.start()}" for s in servers]
    try:
        yield servers, targets
    finally:
        for server in servers:
            server.stop(grace_s=0)


def chunks(stages, plan, lose=None) -> tuple[list, bytes]:
    """(latents digest, media) of every chunk of `plan`; `lose(i)` runs after chunk i."""

    async def go():
        driver = SessionDriver(stages, plan)
        await driver.open()
        out = []
        async for c in driver.chunks():
            out.append((c.latents_sha256, c.media))
            if lose is not None:
                lose(len(out) - 1)
        await driver.finish(EndReason.COMPLETED)
        return out, driver.init_segment

    return run(go(), 120)


def test_a_session_moves_to_another_replica_when_its_replica_is_lost(tmp_path, two_decoders):
    servers, (a, b) = two_decoders
    plan = session_plan(StreamKind.SESSION, "histream+", 69, "sess_r", "a fox")
    expected, init = chunks(real_stages(tmp_path / "alone").handles, plan)

    directory = Directory(a)
    link = ReplicaLink(directory, ("DecodeStage",), TINY, timeout_s=30)
    stages = real_stages(tmp_path / "linked")
    handles = dataclasses.replace(stages.handles, decode=link)

    def lose(index: int) -> None:
        if index == 1:  # replica a goes away; Serve now routes the session to b
            directory.address = b
            servers[0].stop(grace_s=0)

    got, got_init = chunks(handles, plan, lose)
    # nothing lost: every chunk, the same latents; the media of chunks before the loss are the
    # same bytes (a restored decoder re-decodes a tail: within 1/255, not bit for bit)
    assert got_init == init and [d for d, _ in got] == [d for d, _ in expected]
    assert got[:2] == expected[:2] and all(media for _, media in got)
    assert len(got) == 6 and not stages.journal.find("DecodeChunk")
    # asked when placed (open), again at the restore after the loss; never per chunk
    session = directory.asked[0]
    assert session and directory.asked == [session, session]
    assert link.channels.targets() == [a, b]
    assert servers[1].stage.calls["RestoreStream"] == 1
    assert servers[1].stage.calls["DecodeChunk"] == 4  # chunks 2..5 (b restored after 1)


def test_a_replica_set_change_alone_does_not_move_a_session(tmp_path, two_decoders):
    """The session stays where its state is: asked for once, at its opening."""
    servers, (a, b) = two_decoders
    plan = session_plan(StreamKind.SESSION, "histream+", 45, "sess_k", "a fox")
    expected, init = chunks(real_stages(tmp_path / "alone").handles, plan)
    directory = Directory(a)
    link = ReplicaLink(directory, ("DecodeStage",), TINY, timeout_s=30)
    handles = dataclasses.replace(real_stages(tmp_path / "linked").handles, decode=link)

    def change(index: int) -> None:
        if index == 0:
            directory.address = b

    assert chunks(handles, plan, change) == (expected, init)
    assert len(directory.asked) == 1 and link.addresses == {}  # closed: forgotten
    assert servers[0].stage.calls["DecodeChunk"] == 4 and not servers[1].stage.calls


def test_a_session_the_replica_does_not_hold_is_asked_for_anew(two_decoders):
    servers, (a, b) = two_decoders
    directory = Directory(a)
    link = ReplicaLink(directory, ("DecodeStage",), TINY, timeout_s=10)
    touch = stages_pb2.ReleaseRequest(session_id="s1")

    async def go():
        pinned = link.options(session_id="s1")
        for _ in range(2):
            with pytest.raises(SessionNotHeld, match="s1"):
                await pinned.Touch.remote(touch)
            assert link.addresses == {}
            directory.address = b
        await link.channels.close()

    run(go(), 30)
    assert directory.asked == ["s1", "s1"]
    assert servers[0].stage.calls["Touch"] == servers[1].stage.calls["Touch"] == 1


def test_a_lost_replica_is_reported_and_forgotten(two_decoders):
    servers, (a, _) = two_decoders
    link = ReplicaLink(Directory(a), ("DecodeStage",), TINY, timeout_s=5)
    servers[0].stop(grace_s=0)

    async def go():
        try:
            await link.options(session_id="s2").CloseStream.remote(
                stages_pb2.ReleaseRequest(session_id="s2")
            )
        finally:
            await link.channels.close()

    with pytest.raises(ReplicaLost, match=r"DecodeStage\.CloseStream"):
        run(go(), 30)
    assert link.addresses == {}


def test_the_handle_transport_leaves_handles_as_they_are():
    handle = object()
    assert stage_link(ServeSettings(preset="tiny"), handle, "DecodeStage") is handle
    linked = stage_link(
        ServeSettings(preset="tiny", stage_transport="grpc"), handle, "DenoiseStage"
    )
    assert isinstance(linked, ReplicaLink) and linked.handle is handle
    assert {"RunPhase", "OpenSession", "Touch"} <= set(linked.methods)
    with pytest.raises(AttributeError):
        linked.DecodeChunk  # noqa: B018  not a DenoiseStage RPC


def test_stage_tls_needs_both_halves():
    with pytest.raises(ValueError, match="stage_tls_cert is set without its pair"):
        ServeSettings(stage_tls_cert="cert.pem")


def test_a_link_works_from_one_event_loop_to_the_next(two_decoders):
    """A channel belongs to the loop it was made on: a link used by successive asyncio.run
    calls (a CLI, a benchmark) makes a new one for each loop."""
    _, (a, _) = two_decoders
    link = ReplicaLink(Directory(a), ("DecodeStage",), TINY, timeout_s=10)
    touch = stages_pb2.ReleaseRequest(session_id="s3")

    async def ask():
        with pytest.raises(SessionNotHeld):
            await link.options(session_id="s3").Touch.remote(touch)

    for _ in range(2):
        run(ask(), 30)
    assert link.channels.targets() == [a]


def test_a_stage_counts_link_bytes_only_with_links_to_its_peers():
    """The refine stage's stats add `link_bytes` for a gRPC link to the structure stage, and
    nothing for a deployment handle (which answers every attribute, `channels` included)."""
    from histream_model.config import Resolution
    from services.stages import RefineStage

    class AnyAttribute:  # like a Serve DeploymentHandle
        def __getattr__(self, name):
            return AnyAttribute()

    handle = RefineStage(ServeSettings(preset="tiny"), AnyAttribute())
    assert "link_bytes" not in handle.stats()
    linked = RefineStage(ServeSettings(preset="tiny", stage_transport="grpc"), AnyAttribute())
    assert isinstance(linked.peers[Resolution.LOW], ReplicaLink)
    assert linked.stats()["link_bytes"] == 0
