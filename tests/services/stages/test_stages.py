"""The stage classes in this process (no Ray): a structure + refine pair computing what the
in-process generator computes (every mode, batched phases, restores from write inputs, suspend
and take-up, transitions and re-cache), and the decode stage writing a video. Admission and
reaping: test_admission.py."""

from __future__ import annotations

import asyncio
import json

import pytest
import torch

from histream_model.components import load_components
from histream_model.config import get_mode
from histream_model.generator import HiStreamGenerator
from histream_model.taehv import TAEHV
from histream_model.vae import WanVAE
from protos.histream.v1 import stages_pb2
from services.errors import InvalidArgument
from services.media import read_video
from services.protocol import from_proto, to_proto
from services.stages import DecodeStage, RefineStage, StructureStage
from tests.services.fakes import LocalHandle
from tests.services.stages.helpers import H, W, spec, video_stream


def test_structure_and_refine_compute_the_generators_latents(settings):
    structure = StructureStage(settings)
    to_structure = LocalHandle(structure)
    refine = RefineStage(settings, to_structure)

    async def run() -> list[torch.Tensor]:
        context = (
            await structure.EncodePrompt(stages_pb2.EncodePromptRequest(prompt="a fox"))
        ).context
        opened = stages_pb2.OpenSessionRequest(spec=spec("s1"), context=context)
        low = await structure.OpenSession(opened)
        high = await refine.OpenSession(opened)
        assert high.kv_bytes == 4 * low.kv_bytes and low.num_chunks == 2
        out = []
        for i in range(2):
            x_low = await structure.RunPhase(
                stages_pb2.PhaseRequest(session_id="s1", chunk_index=i, phase=0)
            )
            assert x_low.passes == (2 if i == 0 else 1)  # histream+: 2 + 2, then 1 + 1
            x0 = await refine.RunPhase(
                stages_pb2.PhaseRequest(
                    session_id="s1", chunk_index=i, phase=1, latents=x_low.latents
                )
            )
            assert x0.passes == x_low.passes + 2  # its steps, its commit, the handed-on commit
            out.append(from_proto(x0.latents))
        return out

    got = asyncio.run(run())
    c = load_components("tiny", device="cpu")
    gen = HiStreamGenerator(c.dit, c.preset, "histream+")
    want = [r.latents for r in gen.generate(c.text.encode(["a fox"]), H, W, 21, seed=4)]
    assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))
    # the refine stage drove every low-res commit, sending Down(x0) pinned to the session
    handed = [(sid, args[0]) for name, sid, args in to_structure.calls if name == "RunPhase"]
    assert [(sid, r.chunk_index, r.phase) for sid, r in handed] == [("s1", 0, 2), ("s1", 1, 2)]
    assert all(tuple(r.latents.shape[-2:]) == (4, 6) for _, r in handed)  # low-res: 64x96 / 16
    assert structure.calls["RunPhase"] == 4


async def drive(
    stages: dict, sid: str, mode: str, chunks: range, record: dict, frames: int = 33
) -> list:
    """Each chunk's phases up to its output, each on the stage of its resolution (as the session
    driver runs them); the write inputs the stages report go into `record` by (chunk, phase)."""
    from histream_model.config import get_mode, get_preset
    from histream_model.schedules import plan_chunk
    from histream_model.shape import VideoShape

    shape = VideoShape(get_preset("tiny"), get_mode(mode), H, W, frames)
    out = []
    for i in chunks:
        plan, latents = plan_chunk(shape, i), None
        for k in range(plan.output + 1):
            request = stages_pb2.PhaseRequest(session_id=sid, chunk_index=i, phase=k)
            if latents is not None:
                request.latents.CopyFrom(latents)
            reply = await stages[plan.phases[k].resolution].RunPhase(request)
            latents = reply.latents if reply.HasField("latents") else None
            if reply.HasField("write_input"):
                record[i, k] = reply.write_input
        out.append(reply.latents)
    return out


@pytest.mark.parametrize("mode", ["diagonal", "histream-diagonal", "hiar", "histream-hiar"])
def test_other_seeds_on_the_stages_equal_the_generator_and_restore_from_write_inputs(
    settings, mode
):
    """The new schedules run on the two denoising stages (HiAR's step caches split by
    resolution), give the generator's latents, and a session rebuilt elsewhere from a snapshot
    (its latents and reported write inputs) goes on with the same latents, bit for bit."""

    def pair():
        structure = StructureStage(settings)
        return {"low": structure, "high": RefineStage(settings, LocalHandle(structure))}

    async def run() -> tuple[list, list]:
        stages = pair()
        context = (await stages["low"].EncodePrompt(
            stages_pb2.EncodePromptRequest(prompt="a fox"))).context  # fmt: skip
        opened = stages_pb2.OpenSessionRequest(spec=spec("s", mode, 33), context=context)
        caches = {}
        for res, stage in stages.items():
            if res in get_mode(mode).resolutions:
                caches[res] = (await stage.OpenSession(opened)).kv_bytes
        writes: dict = {}
        first = await drive(stages, "s", mode, range(2), writes)
        assert writes or (mode == "histream-diagonal" and not writes.get((0, 1)))
        snapshot = stages_pb2.SessionSnapshot(spec=spec("s", mode, 33), next_chunk=2)
        snapshot.prompts.add(version=0, from_chunk=0, prompt="a fox")
        for i, latents in enumerate(first):
            chunk = snapshot.chunks.add(index=i, latents=latents)
            for (c, k), x in writes.items():
                if c == i:
                    chunk.writes[k].CopyFrom(x)
        elsewhere = pair()  # fresh replicas: rebuilt, not adopted
        restore = stages_pb2.RestoreRequest(session_id="s", snapshot=snapshot, contexts=[context])
        for res in caches:
            rebuilt = await elsewhere[res].RestoreSession(restore)
            assert not rebuilt.adopted and rebuilt.kv_bytes == caches[res]
        rest = await drive(elsewhere, "s", mode, range(2, 3), {})
        if any(True for _ in writes):  # without the write inputs the restore is refused
            bare = stages_pb2.SessionSnapshot()
            bare.CopyFrom(snapshot)
            for chunk in bare.chunks:
                chunk.ClearField("writes")
            third = pair()
            refused = []
            for res in caches:
                try:
                    await third[res].RestoreSession(stages_pb2.RestoreRequest(
                        session_id="s", snapshot=bare, contexts=[context]))  # fmt: skip
                except InvalidArgument as err:
                    refused.append(str(err))
            assert refused and all("needs that write input" in e for e in refused)
        return first, rest

    first, rest = asyncio.run(run())
    c = load_components("tiny", device="cpu")
    gen = HiStreamGenerator(c.dit, c.preset, mode)
    want = [r.latents for r in gen.generate(c.text.encode(["a fox"]), H, W, 33, seed=4)]
    got = [from_proto(x) for x in first + rest]
    assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))


def test_phases_of_sessions_running_at_once_batch_and_equal_each_generator(settings):
    """With phase_batch_size > 1, three sessions driven at once share batched passes on both
    stages; each still gets exactly its own generator's latents."""
    settings = settings.model_copy(update={"phase_batch_size": 4, "max_sessions_per_replica": 4})
    structure = StructureStage(settings)
    stages = {"low": structure, "high": RefineStage(settings, LocalHandle(structure))}
    prompts = {"a": "a fox", "b": "a whale", "c": "a fox"}

    async def run() -> dict[str, list]:
        opened = {}
        for sid, prompt in prompts.items():
            context = (await structure.EncodePrompt(
                stages_pb2.EncodePromptRequest(prompt=prompt))).context  # fmt: skip
            request = stages_pb2.OpenSessionRequest(
                spec=spec(sid, "histream", 33, seed=ord(sid)), context=context
            )
            for stage in stages.values():
                await stage.OpenSession(request)
            opened[sid] = request
        runs = [drive(stages, sid, "histream", range(3), {}) for sid in prompts]
        return dict(zip(prompts, await asyncio.gather(*runs), strict=True))

    got = asyncio.run(run())
    c = load_components("tiny", device="cpu")
    for sid, prompt in prompts.items():
        gen = HiStreamGenerator(c.dit, c.preset, "histream")
        want = gen.generate(c.text.encode([prompt]), H, W, 33, seed=ord(sid))
        assert all(
            torch.equal(from_proto(a), b.latents) for a, b in zip(got[sid], want, strict=True)
        )
    for stage in stages.values():
        stats = stage.stats()
        assert stats["largest_batch"] == 3  # the three sessions' phases ran as one batch
        assert stats["batched_phases"] > stats["batches"]


def test_a_suspend_keeps_the_denoiser_state_and_a_resume_takes_it_up(settings):
    """CloseSession(suspend, keep_s) keeps the caches; RestoreSession of the session where its
    snapshot stands takes them up (adopted, no passes); one standing elsewhere is rebuilt."""
    structure = StructureStage(settings)
    refine = RefineStage(settings, LocalHandle(structure))

    async def run() -> None:
        request = stages_pb2.EncodePromptRequest(prompt="a fox")
        context = (await structure.EncodePrompt(request)).context
        opened = stages_pb2.OpenSessionRequest(spec=spec("s"), context=context)
        await structure.OpenSession(opened)
        await refine.OpenSession(opened)
        phase = stages_pb2.PhaseRequest(session_id="s", chunk_index=0, phase=0)
        low = await structure.RunPhase(phase)
        phase.phase = 1
        phase.latents.CopyFrom(low.latents)
        x0 = await refine.RunPhase(phase)  # chunk 0 complete on both (the commit handed on)
        caches = [
            stage.sessions.get("s").states[res].cache
            for stage, res in ((structure, "low"), (refine, "high"))
        ]
        release = stages_pb2.ReleaseRequest(session_id="s", suspend=True, keep_s=60)
        for stage in (structure, refine):
            await stage.CloseSession(release)
            assert stage.stats()["sessions"] == 1  # kept
        snapshot = stages_pb2.SessionSnapshot(spec=spec("s"), next_chunk=1)
        snapshot.prompts.add(version=0, from_chunk=0, prompt="a fox")
        snapshot.chunks.add(index=0, latents=x0.latents)
        restore = stages_pb2.RestoreRequest(session_id="s", snapshot=snapshot, contexts=[context])
        for stage, cache in zip((structure, refine), caches, strict=True):
            taken = await stage.RestoreSession(restore)
            assert taken.adopted and taken.passes == 0
            assert cache in [s.cache for s in stage.sessions.get("s").states.values()]
            await stage.CloseSession(release)  # kept again, at chunk 1; a resume at chunk 0:
        restore.snapshot.next_chunk = 0
        for stage, cache in zip((structure, refine), caches, strict=True):
            rebuilt = await stage.RestoreSession(restore)
            held = [s.cache for s in stage.sessions.get("s").states.values()]
            assert not rebuilt.adopted and cache not in held

    asyncio.run(run())


@pytest.mark.parametrize("decoder", ["wan", "taehv"])
def test_decode_stage_writes_a_video_with_its_manifest(settings, tmp_path, decoder):
    decode = DecodeStage(settings.model_copy(update={"decoder": decoder}))
    assert isinstance(decode.vae, TAEHV if decoder == "taehv" else WanVAE)
    c = load_components("tiny", device="cpu")
    gen = HiStreamGenerator(c.dit, c.preset, "histream")
    chunks = list(gen.generate(c.text.encode(["a fox"]), H, W, 21, seed=0))

    async def run() -> str:
        await decode.OpenStream(video_stream("r1", "video_1"))
        for chunk in chunks:
            seg = await decode.DecodeChunk(
                stages_pb2.ChunkLatents(
                    session_id="r1", chunk_index=chunk.index, latents=to_proto(chunk.latents)
                )
            )
            assert seg.num_frames == (9 if chunk.index == 0 else 12)
        video = stages_pb2.VideoMetadata(id="video_1", model="tiny", seed=5, size=f"{W}x{H}")
        done = await decode.FinishStream(
            stages_pb2.FinishStreamRequest(session_id="r1", video=video)
        )
        assert done.num_frames == 21
        return done.manifest_key

    key = asyncio.run(run())
    assert key == "tenants/default/videos/video_1/manifest.json"
    manifest = json.loads((tmp_path / "store" / key).read_text())
    assert (manifest["num_frames"], manifest["seed"], manifest["fps"]) == (21, 5, 16)
    assert manifest["objects"][0]["name"] == "video.mp4"
    path = tmp_path / "store" / "tenants/default/videos/video_1/video.mp4"
    assert read_video(path) == (21, W, H)
    assert decode.stats()["sessions"] == 0


@pytest.mark.parametrize("mode", ["self-forcing", "no-drc"])
def test_single_resolution_modes_run_on_the_refine_stage_alone(settings, mode):
    """Modes without DRC hold no low-res cache: every phase runs on the refine stage, the
    structure stage holds nothing of the session, and the latents are the generator's."""
    structure = StructureStage(settings)
    stages = {"low": structure, "high": RefineStage(settings, LocalHandle(structure))}

    async def run() -> list:
        context = (await structure.EncodePrompt(
            stages_pb2.EncodePromptRequest(prompt="a fox"))).context  # fmt: skip
        opened = stages_pb2.OpenSessionRequest(spec=spec("s", mode, 33), context=context)
        await stages["high"].OpenSession(opened)
        return await drive(stages, "s", mode, range(3), {})

    got = [from_proto(x) for x in asyncio.run(run())]
    assert structure.calls.get("RunPhase", 0) == 0 and structure.stats()["sessions"] == 0
    c = load_components("tiny", device="cpu")
    want = HiStreamGenerator(c.dit, c.preset, mode).generate(
        c.text.encode(["a fox"]), H, W, 33, seed=4
    )
    assert all(torch.equal(a, b.latents) for a, b in zip(got, want, strict=True))


def test_a_restore_mid_transition_rebuilds_each_chunk_under_its_blend(settings):
    """A session rebuilt elsewhere in the middle of a prompt transition (its snapshot's change
    says 3 chunks, slerp) replays each chunk's cache writes under that chunk's blend and goes
    on with the generator's latents, bit for bit."""
    from histream_model.conditioning import PromptChange, conditioning

    def pair():
        structure = StructureStage(settings)
        return {"low": structure, "high": RefineStage(settings, LocalHandle(structure))}

    async def encode(stage, prompt: str) -> stages_pb2.Tensor:
        request = stages_pb2.EncodePromptRequest(prompt=prompt)
        return (await stage.EncodePrompt(request)).context

    async def condition(stages, context: torch.Tensor) -> None:
        for stage in stages.values():
            await stage.SetPrompt(
                stages_pb2.SetPromptRequest(session_id="s", context=to_proto(context))
            )

    async def run() -> list:
        stages = pair()
        a, b = await encode(stages["low"], "a fox"), await encode(stages["low"], "a heron")
        changes = [PromptChange(0, from_proto(a)), PromptChange(2, from_proto(b), 3, "slerp")]
        opened = stages_pb2.OpenSessionRequest(spec=spec("s", "histream+", 57), context=a)
        for stage in stages.values():
            await stage.OpenSession(opened)
        out = await drive(stages, "s", "histream+", range(2), {}, 57)
        await condition(stages, conditioning(changes, 2))
        out += await drive(stages, "s", "histream+", range(2, 3), {}, 57)
        snapshot = stages_pb2.SessionSnapshot(spec=spec("s", "histream+", 57), next_chunk=3)
        snapshot.prompts.add(version=0, from_chunk=0, prompt="a fox")
        snapshot.prompts.add(version=1, from_chunk=2, prompt="a heron", transition_chunks=3,
                             interpolation="slerp")  # fmt: skip
        for i, latents in enumerate(out):
            snapshot.chunks.add(index=i, latents=latents)
        elsewhere = pair()
        restore = stages_pb2.RestoreRequest(session_id="s", snapshot=snapshot, contexts=[a, b])
        for stage in elsewhere.values():
            assert not (await stage.RestoreSession(restore)).adopted
        for chunk in (3, 4):  # the blend goes on, then ends: the driver sets each
            await condition(elsewhere, conditioning(changes, chunk))
            out += await drive(elsewhere, "s", "histream+", range(chunk, chunk + 1), {}, 57)
        return out

    got = [from_proto(x) for x in asyncio.run(run())]
    c = load_components("tiny", device="cpu")
    gen = HiStreamGenerator(c.dit, c.preset, "histream+")
    state = gen.start(c.text.encode(["a fox"]), H, W, 57, seed=4)
    want = []
    for i in range(5):
        if i == 2:
            gen.set_prompt(state, c.text.encode(["a heron"]), 3, "slerp")
        want.append(gen.step(state).latents)
    assert all(torch.equal(x, y) for x, y in zip(got, want, strict=True))


def test_a_recache_rebuilds_the_window_under_the_new_prompt_as_the_generator_does(settings):
    """The driver's re-cache is a restore of both denoisers from the record with the change
    marked `recache`: the chunks after it are the generator's under set_prompt(recache=True)."""

    async def run() -> list:
        structure = StructureStage(settings)
        stages = {"low": structure, "high": RefineStage(settings, LocalHandle(structure))}
        a = (await structure.EncodePrompt(stages_pb2.EncodePromptRequest(prompt="a fox"))).context
        b = (await structure.EncodePrompt(stages_pb2.EncodePromptRequest(prompt="a heron"))).context
        opened = stages_pb2.OpenSessionRequest(spec=spec("s", "histream+", 57), context=a)
        for stage in stages.values():
            await stage.OpenSession(opened)
        out = await drive(stages, "s", "histream+", range(3), {}, 57)
        snapshot = stages_pb2.SessionSnapshot(spec=spec("s", "histream+", 57), next_chunk=3)
        snapshot.prompts.add(version=0, from_chunk=0, prompt="a fox")
        snapshot.prompts.add(version=1, from_chunk=3, prompt="a heron", recache=True)
        for i, latents in enumerate(out):
            snapshot.chunks.add(index=i, latents=latents)
        restore = stages_pb2.RestoreRequest(session_id="s", snapshot=snapshot, contexts=[a, b])
        for stage in stages.values():  # in place, on the replicas holding the session
            await stage.RestoreSession(restore)
        return out + await drive(stages, "s", "histream+", range(3, 5), {}, 57)

    got = [from_proto(x) for x in asyncio.run(run())]
    c = load_components("tiny", device="cpu")
    gen = HiStreamGenerator(c.dit, c.preset, "histream+")
    state = gen.start(c.text.encode(["a fox"]), H, W, 57, seed=4)
    want = [gen.step(state).latents for _ in range(3)]
    gen.set_prompt(state, c.text.encode(["a heron"]), recache=True)
    want += [gen.step(state).latents for _ in range(2)]
    assert all(torch.equal(x, y) for x, y in zip(got, want, strict=True))
