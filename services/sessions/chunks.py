"""One session's chunk work on the stages: a chunk's phases up to its output, each on the stage
holding its resolution, then its decode; either done again on rebuilt stages when a stage lost
the session. Each chunk is recorded (for restores) and, once decoded, snapshotted."""

from __future__ import annotations

import asyncio
import time

from histream_model.schedules import plan_chunk
from protos.histream.v1 import stages_pb2
from services.protocol import ChunkReady, digest
from services.sessions.prompts import PromptVersions, too_late
from services.sessions.record import SessionRecord
from services.sessions.remote import SessionStages
from services.sessions.restore import Durability, Restorer
from services.sessions.wavefront import Wavefront


class ChunkWork:
    def __init__(
        self,
        stages: SessionStages,
        record: SessionRecord,
        restorer: Restorer,
        durability: Durability,
    ) -> None:
        self.stages = stages
        self.record = record
        self.restorer = restorer
        self.durability = durability

    async def apply_prompt(self, chunk: int, prompts: PromptVersions) -> None:
        """A prompt update waiting to apply conditions the stages from chunk `chunk` on; each
        chunk of a transition is conditioned on its blend (histream_model.conditioning)."""
        pending = prompts.take()
        if pending is not None:
            self.record.prompt(
                pending.version, chunk, pending.text, pending.context,
                pending.transition_chunks, pending.interpolation, pending.recache,
            )  # fmt: skip
        if not self.record.text_changes(chunk):
            return
        context = self.record.conditioning(chunk)
        try:
            if pending is not None and pending.recache and chunk > 0:
                # the window's caches rebuilt under the new conditioning: a restore that reads
                # the re-cache from the record (cache_conditioning)
                await self.restorer.denoisers(chunk)
            else:
                await self.restorer.retried(
                    lambda: self.stages.set_prompt(context),
                    lambda: self.restorer.denoisers(chunk),  # rebuilt under the new prompt
                )
        except BaseException as err:
            if pending is not None:
                prompts.failed(pending, err if isinstance(err, Exception) else too_late())
            raise
        if pending is not None:
            prompts.applied(pending, chunk)

    def wavefront(self) -> Wavefront:
        """HiAR's pipeline over this session's step workers (see wavefront.py)."""
        return Wavefront(self.stages, self.record, self.restorer)

    async def denoise(self, index: int) -> tuple[stages_pb2.ChunkLatents, float]:
        """The chunk's phases up to its output, each on its resolution's stage (again from the
        first, on rebuilt stages, if a stage lost the session)."""
        started = time.perf_counter()
        plan = plan_chunk(self.stages.plan.shape, index)

        writes: dict[int, stages_pb2.Tensor] = {}

        async def phases() -> stages_pb2.ChunkLatents:
            latents: stages_pb2.Tensor | None = None
            writes.clear()
            for i in range(plan.output + 1):
                out = await self.stages.run_phase(index, i, latents)
                latents = out.latents if out.HasField("latents") else None
                if out.HasField("write_input"):  # what a restore replays this cache write from
                    writes[i] = out.write_input
            return out

        out = await self.restorer.retried(phases, lambda: self.restorer.denoisers(index))
        self.record.denoised_chunk(index, out.latents, writes)
        return out, time.perf_counter() - started

    async def decode(
        self,
        out: stages_pb2.ChunkLatents | asyncio.Future,
        previous: asyncio.Task | None,
        version: int,
        denoise_s: float,
        kv_bytes: int,
    ) -> ChunkReady:
        """The chunk decoded after the one before it; the snapshot then follows it. `out` may
        be a future of (latents, denoising seconds): a chunk still in HiAR's wavefront."""
        if isinstance(out, asyncio.Future):
            out, denoise_s = await out
        if previous is not None:
            await previous  # decode calls of a session stay in chunk order
        seg = await self.restorer.retried(lambda: self.stages.decode(out), self.restorer.decoder)
        sha256 = digest(out.latents)
        self.record.decoded_chunk(out.chunk_index, seg.num_frames, sha256)
        store = self.durability.store
        if store is not None:  # the session as the client has it, for a resume
            snapshot = self.record.snapshot(self.record.decoded, self.stages.session_id)
            snapshot.resumable_until = int(time.time() + self.durability.snapshot_ttl_s)
            await store.save(snapshot, str(self.stages.plan.kind))
        return ChunkReady(
            index=out.chunk_index,
            first_frame=seg.first_frame,
            num_frames=seg.num_frames,
            media=seg.data,
            object_key=seg.object_key,
            prompt_version=version,
            latents=out.latents,
            latents_sha256=sha256,
            denoise_seconds=denoise_s,
            decode_seconds=seg.decode_seconds + seg.encode_seconds,
            kv_bytes=kv_bytes,
        )
