"""HiAR's pipeline on step workers, without Ray: the real stages in this process, `StepStage`
workers each holding its share of the step caches, the driver running chunks as a wavefront.
The latents are the in-process generator's, bit for bit; chunks overlap on the workers; a
worker that loses the session is rebuilt with the others and the session goes on; a prompt
update applies between whole chunks."""

from __future__ import annotations

import asyncio

import pytest
import torch

from histream_model.components import load_components
from histream_model.config import get_preset
from histream_model.flops import worker_bytes
from histream_model.generator import HiStreamGenerator
from protos.histream.v1 import stages_pb2
from services.protocol import EndReason, StageName, from_proto, to_proto
from services.sessions import SessionDriver
from services.sessions.remote import StageHandles
from services.settings import ServeSettings
from services.stages import DecodeStage, RefineStage, StepStage, StructureStage
from services.storage import StorageSettings
from tests.services.fakes import LocalHandle
from tests.services.harness import run, session_plan

PROMPT, OTHER = "a red fox", "a blue whale"


class Pipeline:
    """Structure, refine and decode stages plus `workers` step workers, behind handles."""

    def __init__(self, tmp_path, workers: int) -> None:
        self.settings = ServeSettings(
            preset="tiny",
            pipeline_workers=workers,
            storage=StorageSettings(local_dir=str(tmp_path / "store")),
        )
        structure = StructureStage(self.settings)
        self.steps = [StepStage(self.settings, w) for w in range(workers)]
        self.calls: list = []
        self.handles = StageHandles(
            LocalHandle(structure, self.calls),
            LocalHandle(RefineStage(self.settings, LocalHandle(structure)), self.calls),
            LocalHandle(DecodeStage(self.settings)),
            steps=tuple(LocalHandle(step, self.calls) for step in self.steps),
        )
        self.structure = structure
        self.timeline: list[tuple[str, int, int]] = []  # ("start" | "end", chunk, phase)
        for step in self.steps:
            step.RunPhase = self._timed(step.RunPhase)

    def _timed(self, run_phase):
        async def timed(request):
            self.timeline.append(("start", request.chunk_index, request.phase))
            try:
                return await run_phase(request)
            finally:
                self.timeline.append(("end", request.chunk_index, request.phase))

        return timed

    def context(self, prompt: str) -> torch.Tensor:
        return self.structure.text.encode([prompt])

    def phases_run(self) -> list[tuple[int, int]]:
        """(chunk, phase) of every RunPhase call, in the order they were made."""
        return [(r.chunk_index, r.phase) for name, _, (r,) in self.calls if name == "RunPhase"]


def generated(mode: str, frames: int, seed: int, switch: int | None = None) -> list:
    c = load_components("tiny", device="cpu")
    gen = HiStreamGenerator(c.dit, c.preset, mode)
    state = gen.start(c.text.encode([PROMPT]), 64, 96, frames, seed)
    out = []
    while not state.done:
        if state.next_chunk == switch:
            gen.set_prompt(state, c.text.encode([OTHER]))
        out.append(gen.step(state).latents)
    return out


@pytest.mark.parametrize(("mode", "workers"), [("hiar", 4), ("histream-hiar", 2)])
def test_a_hiar_session_runs_as_a_wavefront_with_the_sequential_latents(tmp_path, mode, workers):
    pipeline = Pipeline(tmp_path, workers)
    plan = session_plan(mode=mode, frames=57, object_id="video_w", prompt=PROMPT, seed=7)
    driver = SessionDriver(pipeline.handles, plan)
    assert driver.plan.pipelined and driver.plan.denoisers == tuple(
        StageName.step(w) for w in range(workers)
    )

    async def go():
        await driver.open()
        chunks = [c async for c in driver.chunks()]
        await driver.finish(EndReason.COMPLETED, video=stages_pb2.VideoMetadata(id="video_w"))
        return chunks

    chunks = run(go(), timeout_s=120)
    got = [from_proto(c.latents) for c in chunks]
    want = generated(mode, 57, 7)
    assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))
    assert len(got) == 5
    # the wavefront: chunk 1 entered the first worker before chunk 0 left the last one
    timeline = pipeline.timeline
    assert timeline.index(("start", 1, 0)) < timeline.index(("end", 0, 3))
    # each worker held only its share of the step caches (the FLOP model's figure), and none
    # once the session ended
    held = [step.session_bytes(driver.plan.shape) for step in pipeline.steps]
    assert held == worker_bytes(get_preset("tiny"), mode, 64, 96, 57, workers)
    assert all(step.stats()["sessions"] == 0 for step in pipeline.steps)
    assert pipeline.structure.calls.get("RunPhase", 0) == 0  # the resolution stages ran nothing


def test_a_step_worker_that_loses_the_session_is_rebuilt_with_the_others(tmp_path):
    pipeline = Pipeline(tmp_path, 2)
    plan = session_plan(mode="hiar", frames=57, object_id="video_l", prompt=PROMPT, seed=7)
    restored: list[StageName] = []
    driver = SessionDriver(pipeline.handles, plan, on_restore=lambda s, _: restored.append(s))
    second = pipeline.steps[1]
    real = second.RunPhase
    taken = []

    async def losing(request):
        if request.chunk_index == 2 and not taken:  # the replica "died" with the session
            taken.append(request.session_id)
            second.sessions.discard(request.session_id)
        return await real(request)

    second.RunPhase = losing

    async def go():
        await driver.open()
        return [c async for c in driver.chunks()]

    chunks = run(go(), timeout_s=120)
    assert taken and [c.index for c in chunks] == list(range(5))
    assert sorted(restored) == [StageName.STEP1, StageName.STEP2]  # both, from one record
    got = [from_proto(c.latents) for c in chunks]
    want = generated("hiar", 57, 7)
    assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))


def test_a_prompt_update_applies_between_whole_chunks_of_the_wavefront(tmp_path):
    pipeline = Pipeline(tmp_path, 4)
    plan = session_plan(mode="hiar", frames=57, object_id="video_p", prompt=PROMPT, seed=7)
    driver = SessionDriver(pipeline.handles, plan)
    other = to_proto(pipeline.context(OTHER).float())

    async def go():
        await driver.open()
        chunks, applied = [], None
        async for chunk in driver.chunks():
            chunks.append(chunk)
            if chunk.index == 0:
                applied = driver.prompts.submit(other, OTHER)
        return chunks, await asyncio.wait_for(applied, 5)

    chunks, (version, from_chunk) = run(go(), timeout_s=120)
    assert version == 1 and 1 <= from_chunk < 5
    assert [c.prompt_version for c in chunks] == [0] * from_chunk + [1] * (5 - from_chunk)
    got = [from_proto(c.latents) for c in chunks]
    want = generated("hiar", 57, 7, switch=from_chunk)
    assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))


def test_a_client_leaving_mid_wave_stops_every_chunk_in_flight(tmp_path):
    """The consumer goes away after the first chunk: the chunks still in the wavefront stop,
    no step call is made after the close, and every worker frees the session."""
    pipeline = Pipeline(tmp_path, 4)
    plan = session_plan(mode="hiar", frames=57, object_id="video_c", prompt=PROMPT, seed=7)
    driver = SessionDriver(pipeline.handles, plan)

    async def go():
        await driver.open()
        chunks = driver.chunks()
        first = await chunks.__anext__()
        await chunks.aclose()
        await driver.close()
        calls = len(pipeline.phases_run())
        await asyncio.sleep(0.5)  # a chunk task left running would call on
        return first, calls, len(pipeline.phases_run())

    first, at_close, later = run(go(), timeout_s=120)
    assert first.index == 0 and later == at_close
    assert at_close < 5 * 4  # the session did not run to its end
    assert all(step.stats()["sessions"] == 0 for step in pipeline.steps)
