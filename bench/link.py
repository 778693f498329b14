"""The decode stage over real gRPC against in process: each chunk's decode call made on the
DecodeStage object directly, and through `GrpcStage` to a `StageServer` holding another one in
this process (its own thread and event loop; loopback TCP), sessions alternating per repeat.
Reported: the median call time per chunk on each side, the difference (serialization, the
channel and the hop between loops), and the bytes on the wire per chunk (request + reply)."""

from __future__ import annotations

import asyncio
import statistics
import tempfile
import time

import torch

from histream_model.config import get_preset
from protos.histream.v1 import stages_pb2
from services.link import GrpcStage, StageServer
from services.protocol import StreamKind, to_proto
from services.settings import ServeSettings
from services.stages import DecodeStage
from services.storage import StorageSettings


def _stage(preset: str) -> DecodeStage:
    storage = StorageSettings(local_dir=tempfile.mkdtemp(prefix="histream-link-"))
    return DecodeStage(ServeSettings(preset=preset, storage=storage))


async def _session(stage, name: str, preset, chunks: int, seed: int) -> tuple[list[float], int]:
    """Decode `chunks` chunks of random latents as session `name`; (seconds per call, bytes)."""
    vae = preset.vae
    h, w = preset.height // vae.spatial_stride, preset.width // vae.spatial_stride
    kind = StreamKind.SESSION.to_proto()
    opened = stages_pb2.OpenStreamRequest(
        session_id=name, object_id=name, kind=kind, width=preset.width, height=preset.height,
        fps=16, tenant="default",
    )  # fmt: skip
    await stage.OpenStream(opened)
    g = torch.Generator().manual_seed(seed)
    seconds, wire = [], 0
    for index in range(chunks):
        z = torch.randn(1, vae.z_dim, preset.options.chunk_frames, h, w, generator=g)
        request = stages_pb2.ChunkLatents(session_id=name, chunk_index=index, latents=to_proto(z))
        started = time.perf_counter()
        reply = await stage.DecodeChunk(request)
        seconds.append(time.perf_counter() - started)
        wire += request.ByteSize() + reply.ByteSize()
    await stage.CloseStream(stages_pb2.ReleaseRequest(session_id=name))
    return seconds, wire // chunks


class _Linked:
    """The same calls through GrpcStage (`Method.remote(request)`)."""

    def __init__(self, client: GrpcStage) -> None:
        self.client = client

    def __getattr__(self, name: str):
        return getattr(self.client, name).remote


def measure(preset_name: str, chunks: int, repeats: int, log=print) -> dict:
    preset = get_preset(preset_name)
    server = StageServer(_stage(preset_name), "DecodeStage", "127.0.0.1:0", preset)
    port = server.start()
    direct = _stage(preset_name)  # its own methods, awaited in this loop
    out = {"direct": [], "grpc": [], "wire": 0}

    async def run() -> None:
        client = GrpcStage(f"127.0.0.1:{port}", "DecodeStage", preset, timeout_s=300)
        linked = _Linked(client)
        try:
            for r in range(repeats + 1):  # the first round warms both sides up
                for side, stage in (("direct", direct), ("grpc", linked)):
                    seconds, wire = await _session(stage, f"s{r}{side}", preset, chunks, r)
                    if r:
                        out[side] += seconds[1:]  # chunk 0 decodes fewer frames
                        out["wire"] = wire
                log(f"[link] repeat {r}: direct {statistics.median(out['direct'] or [0]):.4f} s")
        finally:
            await client.close()

    try:
        asyncio.run(run())
    finally:
        server.stop(grace_s=1)
    return out


def section(preset: str, chunks: int = 6, repeats: int = 3, log=print) -> str:
    out = measure(preset, chunks, repeats, log)
    direct, linked = statistics.median(out["direct"]), statistics.median(out["grpc"])
    return "\n".join([
        f"`{preset}` preset ({get_preset(preset).width}x{get_preset(preset).height}), "
        f"{repeats} sessions a side of {chunks} chunks, alternating; the median of chunks 1+.",
        "",
        "| decode call | s per chunk | vs in process | bytes on the wire per chunk |",
        "|---|---|---|---|",
        f"| in process (the stage object) | {direct:.4f} | 1.00x | 0 |",
        f"| over gRPC (loopback) | {linked:.4f} | {linked / direct:.2f}x "
        f"(+{(linked - direct) * 1000:.1f} ms) | {out['wire']:,} |",
    ])  # fmt: skip
