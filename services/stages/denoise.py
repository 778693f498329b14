"""The denoising stages: each holds one resolution's KV caches per session (one for HiStream's
and Diagonal's schedules, one per step there for HiAR's) and runs that resolution's phases of
every chunk's plan (`histream_model.schedules`).

- `StructureStage`: low resolution (KV_low) and the text encoder;
- `RefineStage`: high resolution (KV_high); it runs each chunk's output phase and hands the
  plan's follow-up cache writes (Down(x0) for KV_low) to the structure stage itself, so the
  gateway never waits for them.

Both implement `DenoiseStage` of `stages.proto`. Model work runs in a worker thread
(`asyncio.to_thread`) so a replica keeps answering other sessions' small requests and health
checks while one session computes; torch releases the GIL inside its kernels. One session's
requests run one at a time, under its lock.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import TypeVar

import torch

from histream_model.components import dit_for, text_encoder_for
from histream_model.conditioning import cache_conditioning, conditioning
from histream_model.config import Resolution
from histream_model.flops import cache_layout, kv_bytes, text_kv_bytes
from histream_model.schedules import (
    ChunkPlan,
    Phase,
    PhaseResult,
    ResolutionState,
    handoff,
    new_session_states,
    plan_chunk,
    run_phase,
    session_caches,
    set_text,
)
from histream_model.schedules.execute import BatchMember, batch_key, run_phase_batch
from histream_model.schedules.pipeline import pipelined, split_phases
from histream_model.schedules.restore import (
    phase_after,
    position_after,
    reprefill,
    snapshot_chunks,
)
from histream_model.shape import VideoShape
from histream_model.text import check_prompt
from protos.histream.v1 import stages_pb2
from services.errors import InvalidArgument, SessionNotHeld, remote_result
from services.link.replicas import ReplicaLink, stage_link
from services.logs import ids
from services.protocol import StageName, from_proto, shape_of, to_proto
from services.protocol.identity import replica_name
from services.protocol.routing import own_request_id
from services.protocol.snapshot import kept_latents, kept_writes, prompt_changes
from services.settings import ServeSettings
from services.stages.base import SessionStage, rpc
from services.stages.batcher import PhaseBatcher

log = logging.getLogger("histream.stages")
R = TypeVar("R")


@dataclass
class DenoiseSession:
    """One stage's share of a session: its shape, seed and its resolution's cache states."""

    shape: VideoShape
    seed: int
    states: dict[str, ResolutionState]  # by cache name ("high", or "high.3" ... for HiAR)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    position: tuple[int, int] | None = None  # the last (chunk, phase) run: see position_after

    @property
    def kv_bytes(self) -> int:
        return sum(state.cache.nbytes for state in self.states.values())

    @property
    def device(self) -> torch.device:
        return next(iter(self.states.values())).cache.k.device


class DenoiseStage(SessionStage[DenoiseSession]):
    """The DiT and, per session, one resolution's cache, text K/V and RoPE frequencies."""

    name = StageName.REFINE
    grpc_services = ("DenoiseStage",)  # what its gRPC server serves (stage_transport=grpc)

    def __init__(self, settings: ServeSettings, peers: Mapping[Resolution, object] | None = None):
        super().__init__(settings)
        self.resolution = self.name.resolution  # None: a step worker (both resolutions)
        # handles of the stages holding the other resolutions (links under the grpc transport)
        self.peers = {r: stage_link(settings, h, "DenoiseStage") for r, h in (peers or {}).items()}
        preset = settings.get_preset()
        self.weights = settings.weight_paths()
        self.model = dit_for(preset, self.weights, settings.device, settings.torch_dtype())
        self.preset = replace(preset, dit=self.model.config)
        self.sessions.budget_bytes = settings.stage_budget_bytes or self._device_budget()
        self.batcher: PhaseBatcher[tuple[BatchMember, int], PhaseResult] | None = None
        if settings.phase_batch_size > 1:
            self.batcher = PhaseBatcher(
                self._run_batch, settings.phase_batch_size, settings.phase_batch_wait_s
            )

    def _run_batch(self, jobs: list[tuple[BatchMember, int]]) -> list[PhaseResult]:
        """One batch of the micro-batcher: the same phase of several sessions."""
        members, index = [m for m, _ in jobs], jobs[0][1]
        return run_phase_batch(self.model, members, index, self.preset.options)

    def _device_budget(self) -> int | None:
        """On CUDA, 90% of the memory free once the model is loaded (the rest: workspace)."""
        device = next(self.model.parameters()).device
        if device.type != "cuda":
            return None
        free, _ = torch.cuda.mem_get_info(device)
        return int(free * 0.9)

    def caches_for(self, shape: VideoShape) -> dict[str, Resolution]:
        """The caches of a session of `shape` this stage holds, by name: those at its
        resolution."""
        return {n: r for n, r in session_caches(shape).items() if r == self.resolution}

    def session_bytes(self, shape: VideoShape) -> int:
        """What a session of `shape` holds here, exactly, before it is allocated: its caches
        and one prompt's text K/V (histream_model.flops)."""
        element = torch.empty((), dtype=next(self.model.parameters()).dtype).element_size()
        config = self.model.config
        caches = sum(
            kv_bytes(config, cache_layout(shape, res), 1, element)
            for res in self.caches_for(shape).values()
        )
        return caches + text_kv_bytes(config, 1, element)

    async def _compute(self, fn: Callable[[], R]) -> R:
        return await asyncio.to_thread(fn)

    @rpc
    async def OpenSession(
        self, request: stages_pb2.OpenSessionRequest
    ) -> stages_pb2.OpenSessionResponse:
        spec = request.spec
        shape = shape_of(spec, self.preset)
        caches = self.caches_for(shape)
        if not caches:
            raise InvalidArgument(f"mode {shape.mode.name!r} holds no cache on the {self.label}")
        context = from_proto(request.context)

        def build() -> dict[str, ResolutionState]:
            with torch.no_grad():
                return new_session_states(self.model, shape, context, names=caches)

        self._start_reaper()
        nbytes = self.session_bytes(shape)
        self._make_room(spec.session_id, nbytes)
        session = DenoiseSession(shape, spec.seed, await self._compute(build))
        self.sessions.add(spec.session_id, session, nbytes)
        log.info(
            "%s opened session %s (%d bytes)", self.label, spec.session_id, session.kv_bytes,
            extra=ids(session_id=spec.session_id),
        )  # fmt: skip
        return stages_pb2.OpenSessionResponse(
            session_id=spec.session_id, kv_bytes=session.kv_bytes, num_chunks=shape.num_chunks
        )

    def _phase(self, session: DenoiseSession, chunk: int, index: int) -> tuple[ChunkPlan, Phase]:
        try:
            plan = plan_chunk(session.shape, chunk)
        except ValueError as err:
            raise InvalidArgument(str(err), param="chunk_index") from None
        if not 0 <= index < len(plan.phases):
            raise InvalidArgument(
                f"phase {index} outside [0, {len(plan.phases)}) of chunk {chunk}", param="phase"
            )
        phase = plan.phases[index]
        if phase.cache not in session.states:
            raise InvalidArgument(
                f"phase {index} of chunk {chunk} runs on cache {phase.cache!r}; the "
                f"{self.label} holds {sorted(session.states)}",
                param="phase",
            )
        return plan, phase

    @rpc
    async def RunPhase(self, request: stages_pb2.PhaseRequest) -> stages_pb2.ChunkLatents:
        session = self.sessions.get(request.session_id)
        plan, phase = self._phase(session, request.chunk_index, request.phase)
        received = None
        if request.HasField("latents"):
            received = from_proto(request.latents, session.device)
        options, state = session.shape.preset.options, session.states[phase.cache]

        def run() -> PhaseResult:
            return run_phase(self.model, state, plan, phase, options, session.seed, received)

        async with session.lock:
            self._check_in_order(request, session)
            started = time.perf_counter()
            before = state.denoise_passes + state.commit_passes
            if self.batcher is None:
                done = await self._compute(run)
            else:
                member = BatchMember(state, plan, session.seed, received)
                key = (request.phase, batch_key(state, plan, phase))
                done = await self.batcher.submit(key, (member, request.phase))
            session.position = (request.chunk_index, request.phase)
            passes = state.denoise_passes + state.commit_passes - before
            if request.phase == plan.output:
                passes += await self._hand_on(request.session_id, session, plan, done.latents)
        reply = stages_pb2.ChunkLatents(
            session_id=request.session_id,
            chunk_index=request.chunk_index,
            seconds=time.perf_counter() - started,
            passes=passes,
        )
        if phase.timesteps:
            reply.latents.CopyFrom(to_proto(done.latents))
        if done.write_input is not None:
            reply.write_input.CopyFrom(to_proto(done.write_input))
        return reply

    def _check_in_order(self, request: stages_pb2.PhaseRequest, session: DenoiseSession) -> None:
        """A phase runs only on the state that ran the phase before it at this resolution.
        Anything else is a state left behind: the session moved to another replica (a replica
        change) and back, and this copy missed what ran there. It answers as a lost session,
        so the driver rebuilds it (never silently going on from stale caches)."""
        shape = session.shape
        expected = phase_after(
            lambda k: plan_chunk(shape, k), session.states, session.position, shape.num_chunks
        )
        asked = (request.chunk_index, request.phase)
        if asked != expected:
            position = session.position
            held = "nothing yet" if position is None else f"chunk {position[0]} phase {position[1]}"
            raise SessionNotHeld(
                f"{self.label} replica {replica_name()} holds session {request.session_id!r} as "
                f"of {held}, not the state chunk {asked[0]} phase {asked[1]} follows: a stale "
                "copy (the session ran elsewhere meanwhile); it is rebuilt"
            )

    async def _hand_on(
        self, session_id: str, session: DenoiseSession, plan: ChunkPlan, output: torch.Tensor
    ) -> int:
        """Run the plan's follow-ups (cache writes of the chunk's output) where they belong;
        returns their forward passes."""
        passes = 0
        for index in plan.follow_ups:
            phase = plan.phases[index]
            peer = self.peers.get(phase.resolution)
            if peer is None:
                raise RuntimeError(
                    f"the {self.label} has no handle to the stage holding {phase.resolution} "
                    f"resolution, which phase {index} of chunk {plan.index} needs"
                )
            request = stages_pb2.PhaseRequest(
                session_id=session_id,
                chunk_index=plan.index,
                phase=index,
                latents=to_proto(handoff(session.shape, phase, output)),
            )
            own_request_id()  # see services/protocol/routing.py
            pinned = peer.options(session_id=session_id)  # type: ignore[attr-defined]
            done = await remote_result(pinned.RunPhase.remote(request))
            passes += done.passes
        return passes

    @rpc
    async def RestoreSession(
        self, request: stages_pb2.RestoreRequest
    ) -> stages_pb2.RestoreResponse:
        """Rebuild the session from its snapshot (re-prefill), replacing what this replica
        holds of it: ready for chunk `snapshot.next_chunk`."""
        snapshot = request.snapshot
        shape = shape_of(snapshot.spec, self.preset)
        if len(request.contexts) != len(snapshot.prompts) or not snapshot.prompts:
            raise InvalidArgument("a restore needs the text context of every prompt", "contexts")
        changes = prompt_changes(snapshot.prompts, [from_proto(c) for c in request.contexts])
        done = snapshot.next_chunk
        kept_chunks, writes = kept_latents(snapshot), kept_writes(snapshot)
        if shape.mode.sliding_window:
            window = self.settings.snapshot_window_chunks
            replayed = snapshot_chunks(done, 1, window)
            kept_chunks = {k: v for k, v in kept_chunks.items() if k in replayed}

        def prompt_of(chunk: int) -> torch.Tensor:
            return conditioning(changes, chunk)  # a transition's chunks: their blend

        def committed_under(chunk: int) -> torch.Tensor:  # a re-cache's chunks: its prompt
            return cache_conditioning(changes, chunk, done)

        def plans(chunk: int) -> ChunkPlan:
            return plan_chunk(shape, chunk)

        started = time.perf_counter()
        caches = self.caches_for(shape)
        if not caches:
            raise InvalidArgument(f"mode {shape.mode.name!r} holds no cache on the {self.label}")
        position = position_after(plans, caches, done)
        kept = self.sessions.take_up(request.session_id)
        if kept is not None:
            async with kept.lock:  # a phase still running for the suspended driver ends first
                adopt = kept.position == position and kept.shape == shape
            if adopt:
                return await self._adopt(request.session_id, kept, prompt_of(done), started)

        def rebuild() -> tuple[dict[str, ResolutionState], int]:
            passes = 0
            with torch.no_grad():
                context = prompt_of(done)
                states = new_session_states(self.model, shape, context, names=caches)
                for state in states.values():
                    passes += reprefill(
                        self.model, state, shape, plans, kept_chunks, committed_under, done, writes
                    )
                set_text(self.model, states, context)
            return states, passes

        self._start_reaper()
        self.sessions.discard(request.session_id)
        nbytes = self.session_bytes(shape)
        self._make_room(request.session_id, nbytes)
        try:
            states, passes = await self._compute(rebuild)
        except ValueError as err:  # a snapshot without what this mode's restore reads
            raise InvalidArgument(f"cannot restore session: {err}", "snapshot") from None
        restored = DenoiseSession(shape, snapshot.spec.seed, states, position=position)
        self.sessions.add(request.session_id, restored, nbytes)
        log.info(
            "%s restored session %s at chunk %d", self.label, request.session_id, done,
            extra=ids(session_id=request.session_id),
        )  # fmt: skip
        return stages_pb2.RestoreResponse(
            session_id=request.session_id,
            kv_bytes=restored.kv_bytes,
            passes=passes,
            seconds=time.perf_counter() - started,
        )

    async def _adopt(
        self, session_id: str, session: DenoiseSession, context: torch.Tensor, started: float
    ) -> stages_pb2.RestoreResponse:
        """Take up a session kept here since its suspend, exactly where its snapshot stands:
        only its prompt is set again (one the suspended driver set for a chunk it never ran
        would be wrong)."""

        async with session.lock:
            await self._compute(lambda: set_text(self.model, session.states, context))
        log.info(
            "%s took up kept session %s", self.label, session_id, extra=ids(session_id=session_id)
        )
        return stages_pb2.RestoreResponse(
            session_id=session_id,
            kv_bytes=session.kv_bytes,
            seconds=time.perf_counter() - started,
            adopted=True,
        )

    @rpc
    async def SetPrompt(self, request: stages_pb2.SetPromptRequest) -> stages_pb2.StageAck:
        session = self.sessions.get(request.session_id)
        context = from_proto(request.context)

        async with session.lock:
            await self._compute(lambda: set_text(self.model, session.states, context))
        return stages_pb2.StageAck(session_id=request.session_id, kv_bytes=session.kv_bytes)

    @rpc
    async def CloseSession(self, request: stages_pb2.ReleaseRequest) -> stages_pb2.StageAck:
        if self._kept(request):
            return stages_pb2.StageAck(session_id=request.session_id)
        session = self.sessions.pop(request.session_id)
        freed = session.kv_bytes if session else 0
        return stages_pb2.StageAck(session_id=request.session_id, kv_bytes=freed)

    def check_health(self) -> None:
        if self.model is None:
            raise RuntimeError(f"{self.label} has no model")

    def stats(self) -> dict:
        """Sessions and cache bytes held, RPC calls served (this replica)."""
        kv_bytes = sum(s.kv_bytes for s in self.sessions.values())
        batches = self.batcher.stats.as_dict() if self.batcher is not None else {}
        # (not hasattr: a deployment handle answers every attribute with a method handle)
        links = [p.channels for p in self.peers.values() if isinstance(p, ReplicaLink)]
        wire = {"link_bytes": sum(c.sent_bytes + c.received_bytes for c in links)} if links else {}
        return {**super().stats(), "kv_bytes": kv_bytes, **batches, **wire}


class StructureStage(DenoiseStage):
    """Low-res structure steps and the KV_low commits; holds the text encoder."""

    name = StageName.STRUCTURE
    label = "structure stage"
    grpc_services = ("DenoiseStage", "TextEncoder")

    def __init__(self, settings: ServeSettings) -> None:
        super().__init__(settings)
        self.text = text_encoder_for(
            self.preset, self.weights, settings.device, settings.torch_dtype()
        )

    @rpc
    async def EncodePrompt(
        self, request: stages_pb2.EncodePromptRequest
    ) -> stages_pb2.EncodePromptResponse:
        try:
            prompt = check_prompt(request.prompt, self.settings.max_prompt_chars)
        except ValueError as err:
            raise InvalidArgument(str(err), param="prompt") from None
        context = await self._compute(lambda: self.text.encode([prompt]))
        return stages_pb2.EncodePromptResponse(context=to_proto(context.float()))


class RefineStage(DenoiseStage):
    """High-res refinement and the KV_high commit; hands Down(x0) to the structure stage."""

    name = StageName.REFINE
    label = "refine stage"

    def __init__(self, settings: ServeSettings, structure: object | None = None) -> None:
        peers = {Resolution.LOW: structure} if structure is not None else {}
        super().__init__(settings, peers)


class StepStage(DenoiseStage):
    """A worker of a pipelined HiAR session (`pipeline_workers` of them): the caches of its
    share of the steps only, split from the schedule (histream_model/schedules/pipeline.py);
    the session driver runs the chunks through the workers as a wavefront."""

    def __init__(self, settings: ServeSettings, worker: int) -> None:
        if not 0 <= worker < settings.pipeline_workers:
            raise ValueError(f"worker {worker} outside [0, {settings.pipeline_workers})")
        self.name = StageName.step(worker)
        self.label = f"step worker {worker + 1}"
        self.worker = worker
        super().__init__(settings)

    def caches_for(self, shape: VideoShape) -> dict[str, Resolution]:
        if not pipelined(shape):
            return {}
        plan = plan_chunk(shape, 0)
        group = split_phases(plan, self.settings.pipeline_workers, shape)[self.worker]
        return {plan.phases[i].cache: plan.phases[i].resolution for i in group}
