"""Serving overhead: the distributed pipeline against the in-process generator, one run.

Three measurements, repeated with the paths interleaved (medians):
- denoising per chunk: the stage RPCs of a chunk through Serve handles, as the session driver
  sends them (low-res phase on the structure stage, high-res phase + both commits through the
  refine stage, latents serialized both ways) against `HiStreamGenerator.step` in this process;
- end to end per chunk: a WebSocket streaming session (gateway -> stages -> decode pool ->
  fMP4 segment to the client) against denoise + VAE decode + fMP4 encode in this process;
- time to first chunk of a streaming session: from the start message to the first segment.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from ray import serve
from websockets.sync.client import connect

from histream_model.components import load_components
from histream_model.config import get_mode
from histream_model.generator import HiStreamGenerator
from histream_model.shape import VideoShape
from services.local import server
from services.media import FragmentedMp4Encoder
from services.protocol import StageName, StreamKind
from services.sessions import SessionDriver, SessionPlan, StageHandles
from services.settings import ServeSettings, StageScaling
from services.storage import StorageSettings

PROMPT = "a red fox running through fresh snow"
DENOISE_AND_DECODE = (StageName.STRUCTURE, StageName.REFINE, StageName.DECODE)


@dataclass
class Samples:
    """One value per repeat; the two paths of a repeat ran back to back."""

    inproc_denoise: list[float] = field(default_factory=list)  # median s per chunk
    service_denoise: list[float] = field(default_factory=list)
    inproc_e2e: list[float] = field(default_factory=list)  # s per chunk over the video
    service_e2e: list[float] = field(default_factory=list)
    inproc_first: list[float] = field(default_factory=list)  # s to the first segment
    service_first: list[float] = field(default_factory=list)


def in_process(components, mode: str, frames: int) -> tuple[list[float], float, float]:
    """(denoise s per chunk, end-to-end s per chunk, s to the first segment)."""
    preset = components.preset
    started = time.perf_counter()
    context = components.text.encode([PROMPT])
    gen = HiStreamGenerator(components.dit, preset, mode)
    state = gen.start(context, preset.height, preset.width, frames, seed=0)
    vae_state = components.vae.new_decode_state()
    encoder = FragmentedMp4Encoder(preset.width, preset.height, fps=16)
    encoder.init_segment()
    denoise, first = [], 0.0
    while not state.done:
        chunk = gen.step(state)
        denoise.append(chunk.seconds)
        video, vae_state = components.vae.decode_frames(chunk.latents, vae_state)
        encoder.encode_segment(video)
        if not first:
            first = time.perf_counter() - started
    encoder.close()
    total = time.perf_counter() - started
    return denoise, total / len(denoise), first


def service_denoise(preset, mode: str, frames: int, tag: str) -> list[float]:
    """Wall time per chunk of the denoising stage calls (no decode), through Serve handles."""
    handles = StageHandles(*(stage_handle(name) for name in DENOISE_AND_DECODE))
    shape = VideoShape(preset, get_mode(mode), preset.height, preset.width, frames)
    plan = SessionPlan(f"bench-{tag}", StreamKind.VIDEO, "default", shape, 0, PROMPT, preset.fps)

    async def run() -> list[float]:
        driver = SessionDriver(handles, plan)
        await driver.open()
        try:
            return [(await driver.work.denoise(i))[1] for i in range(shape.num_chunks)]
        finally:
            await driver.close()

    return asyncio.run(run())


def local_settings(preset_name: str) -> ServeSettings:
    """A local service for benchmarks: one replica per deployment, all on this machine's
    cores (no CPU reservations), as many torch threads per replica as in this process,
    storage in a fresh temporary directory."""
    stage = StageScaling(num_cpus=0)
    return ServeSettings(
        preset=preset_name,
        torch_threads=torch.get_num_threads(),
        http_port=server.free_port(),
        grpc_port=server.free_port(),
        storage=StorageSettings(local_dir=tempfile.mkdtemp(prefix="histream-bench-")),
        gateway=stage,
        structure=stage,
        refine=stage,
        decode=stage,
    )


def stage_handle(name: StageName):
    return serve.get_deployment_handle(str(name), app_name=server.APP_NAME)


def session_events(port: int, mode: str, frames: int) -> Iterator[tuple[dict, float]]:
    """A WebSocket session's JSON events to its end, each with the seconds since its start
    message (each segment's bytes are read, not kept)."""
    start = {"type": "start", "prompt": PROMPT, "mode": mode, "num_frames": frames}
    t0 = time.perf_counter()
    with connect(f"ws://127.0.0.1:{port}/v1/sessions", max_size=None) as ws:
        ws.send(json.dumps(start))
        while True:
            event = json.loads(ws.recv(timeout=900))
            if event["type"] in ("init", "chunk"):
                ws.recv(timeout=900)
            yield event, time.perf_counter() - t0
            if event["type"] in ("session.ended", "error"):
                return


def service_session(port: int, preset, mode: str, frames: int) -> tuple[float, float]:
    """(end-to-end s per chunk, s to the first segment) of a WebSocket session."""
    chunks, first, elapsed = 0, 0.0, 0.0
    for event, elapsed in session_events(port, mode, frames):
        if event["type"] == "chunk":
            chunks += 1
            first = first or elapsed
    return elapsed / max(chunks, 1), first


def measure(
    preset_name: str = "bench",
    mode: str = "histream+",
    repeats: int = 3,
    frames: int = 81,
    log=print,
    decoder: str = "wan",
) -> tuple[Samples, ServeSettings]:
    settings = local_settings(preset_name).model_copy(update={"decoder": decoder})
    components = load_components(preset_name, device="cpu", decoder=decoder)
    server.start(settings, num_cpus=4, log_to_driver=False)
    samples = Samples()
    try:
        # warm-up: first calls allocate and pick kernels on both sides
        in_process(components, mode, 9)
        service_denoise(components.preset, mode, 9, "warmup")
        service_session(settings.http_port, components.preset, mode, 9)
        for r in range(repeats):
            denoise, e2e, first = in_process(components, mode, frames)
            samples.inproc_denoise.append(median(denoise))
            samples.inproc_e2e.append(e2e)
            samples.inproc_first.append(first)
            samples.service_denoise.append(
                median(service_denoise(components.preset, mode, frames, str(r)))
            )
            e2e, first = service_session(settings.http_port, components.preset, mode, frames)
            samples.service_e2e.append(e2e)
            samples.service_first.append(first)
            log(f"[serving] repeat {r + 1}/{repeats} done")
    finally:
        server.stop()
    return samples, settings


def median(values: list[float]) -> float:
    return statistics.median(values)


def section(preset_name: str, repeats: int, frames: int, log, decoder: str = "wan") -> str:
    """The serving table: the distributed pipeline over the in-process generator."""
    samples, settings = measure(preset_name, "histream+", repeats, frames, log, decoder)
    rows = [
        ("denoising per chunk (stage RPCs vs `step`)", samples.inproc_denoise,
         samples.service_denoise),
        ("end to end per chunk (WebSocket session vs denoise + decode + encode)",
         samples.inproc_e2e, samples.service_e2e),
        ("time to first chunk of a session", samples.inproc_first, samples.service_first),
    ]  # fmt: skip
    lines = [
        "| measurement | in-process s | service s | service / in-process: median (range) |",
        "|---|---|---|---|",
    ]
    for name, inproc, service in rows:
        ratios = [s / i for s, i in zip(service, inproc, strict=True)]
        lines.append(
            f"| {name} | {median(inproc):.3f} | {median(service):.3f} | "
            f"{median(ratios):.2f}x ({min(ratios):.2f}-{max(ratios):.2f}) |"
        )
    return (
        f"**{preset_name}** preset, `histream+`, {frames} frames, decoder `{decoder}`, "
        f"{repeats} repeats; in each "
        "repeat the in-process path and the service ran back to back and their ratio is taken "
        "(seconds are medians over repeats). The service is one local Ray with one replica per "
        f"deployment and {settings.torch_threads} torch threads per replica (as in-process), on "
        "the same 2 cores: the decode pool's work overlaps the denoisers' there, where a real "
        "deployment runs them on separate GPUs.\n\n" + "\n".join(lines)
    )
