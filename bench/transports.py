"""The two stage transports against in process, one local Ray, paired per repeat.

Two applications of one settings object run side by side: "histream" calls its stages through
Serve's deployment handles, "grpc" with `stage_transport=grpc` (each stage replica's own gRPC
server, found through Serve's session routing). A chunk here is its stage calls one after the
other, as a session makes them without overlap: the denoising phases (the structure stage's,
then the refine stage's with its KV_low commit handed to the structure stage) and the decode
call; in process it is `HiStreamGenerator.step`, the VAE decode and the fMP4 encode. Each
repeat runs the three paths back to back; the ratios are per repeat. Bytes on the wire per
chunk are the gRPC messages' (the driver's calls and the refine stage's hand-offs); the handle
transport carries the same protobuf messages pickled through Ray's object store.
"""

from __future__ import annotations

import asyncio
import functools
import statistics
import time

from ray import serve

from bench.serving import PROMPT, local_settings
from histream_model.components import load_components
from histream_model.config import get_mode
from histream_model.generator import HiStreamGenerator
from histream_model.shape import VideoShape
from services.link.replicas import stage_link
from services.local import server
from services.media import FragmentedMp4Encoder
from services.protocol import StreamKind
from services.sessions import SessionDriver, SessionPlan, StageHandles

APPS = {"handle": server.APP_NAME, "grpc": "grpc"}


def in_process(components, mode: str, frames: int) -> list[float]:
    """Seconds per chunk: denoise, decode and encode, one after the other."""
    preset = components.preset
    gen = HiStreamGenerator(components.dit, preset, mode)
    state = gen.start(components.text.encode([PROMPT]), preset.height, preset.width, frames, 0)
    vae_state = components.vae.new_decode_state()
    encoder = FragmentedMp4Encoder(preset.width, preset.height, fps=16)
    encoder.init_segment()
    seconds = []
    while not state.done:
        started = time.perf_counter()
        chunk = gen.step(state)
        video, vae_state = components.vae.decode_frames(chunk.latents, vae_state)
        encoder.encode_segment(video)
        seconds.append(time.perf_counter() - started)
    encoder.close()
    return seconds


def handles(transport: str, settings) -> StageHandles:
    app = APPS[transport]
    get = functools.partial(serve.get_deployment_handle, app_name=app)
    link = functools.partial(stage_link, settings.model_copy(update={"stage_transport": transport}))
    return StageHandles(
        link(get("StructureStage"), "DenoiseStage", "TextEncoder"),
        link(get("RefineStage"), "DenoiseStage"),
        link(get("DecodePool"), "DecodeStage"),
    )


def service(
    stages: StageHandles, preset, mode: str, frames: int, tag: str, parts: list | None = None
) -> list[float]:
    """Seconds per chunk of a session's stage calls: its phases, then its decode (each
    chunk's (denoise s, decode s) appended to `parts`)."""
    parts = [] if parts is None else parts
    shape = VideoShape(preset, get_mode(mode), preset.height, preset.width, frames)
    plan = SessionPlan(f"bench-{tag}", StreamKind.VIDEO, "default", shape, 0, PROMPT, preset.fps)

    async def run() -> list[float]:
        driver = SessionDriver(stages, plan)
        await driver.open()
        seconds = []
        try:
            for i in range(shape.num_chunks):
                started = time.perf_counter()
                out, denoise_s = await driver.work.denoise(i)
                await driver.stages.decode(out)
                seconds.append(time.perf_counter() - started)
                parts.append((denoise_s, seconds[-1] - denoise_s))
        finally:
            await driver.close()
        return seconds

    return asyncio.run(run())


def wire_bytes(stages: StageHandles) -> int:
    """Message bytes the grpc links carried so far: this process's and the refine stage's."""
    here = sum(
        link.channels.sent_bytes + link.channels.received_bytes
        for link in (stages.structure, stages.refine, stages.decode)
    )
    refine = serve.get_deployment_handle("RefineStage", app_name=APPS["grpc"])
    return here + refine.stats.remote().result()["link_bytes"]


def measure(preset_name: str, mode: str, repeats: int, frames: int, log=print) -> dict:
    settings = local_settings(preset_name)
    components = load_components(preset_name, device="cpu")
    server.start(settings, num_cpus=4, log_to_driver=False)
    grpc_settings = settings.model_copy(update={"stage_transport": "grpc"})
    server.start(grpc_settings, app_name=APPS["grpc"], route_prefix="/grpc")
    sides = {t: handles(t, settings) for t in APPS}
    out: dict = {"in_process": [], "handle": [], "grpc": [], "wire": 0, "chunks": 0}
    out["parts"] = {t: [] for t in APPS}
    try:
        in_process(components, mode, 9)  # warm-up: first calls allocate and pick kernels
        for t, stages in sides.items():
            service(stages, components.preset, mode, 9, f"warm-{t}")
        before = wire_bytes(sides["grpc"])
        for r in range(repeats):
            out["in_process"].append(statistics.median(in_process(components, mode, frames)))
            for t, stages in sides.items():
                parts = out["parts"][t]
                seconds = service(stages, components.preset, mode, frames, f"{t}-{r}", parts)
                out[t].append(statistics.median(seconds))
                if t == "grpc":
                    out["chunks"] += len(seconds)
            log(f"[transports] repeat {r + 1}/{repeats}: " + ", ".join(
                f"{k} {out[k][-1]:.3f} s" for k in ("in_process", "handle", "grpc")
            ))  # fmt: skip
        out["wire"] = (wire_bytes(sides["grpc"]) - before) // max(out["chunks"], 1)
    finally:
        server.stop()
    return out


def section(preset: str, repeats: int = 3, frames: int = 81, log=print) -> str:
    mode = "histream+"
    out = measure(preset, mode, repeats, frames, log)
    base = out["in_process"]
    lines = [
        f"**{preset}** preset, `{mode}`, {frames} frames, {repeats} repeats; each repeat runs "
        "the three paths back to back (seconds: medians over chunks, then over repeats; "
        "ratios per repeat: median (range)).",
        "",
        "| path | s per chunk | vs in process | vs handle | denoise / decode s | "
        "bytes on the wire per chunk |",
        "|---|---|---|---|---|---|",
        f"| in process | {statistics.median(base):.3f} | 1.00x | | | 0 |",
    ]
    for t in ("handle", "grpc"):
        ratio = [s / i for s, i in zip(out[t], base, strict=True)]
        vs_handle = [s / h for s, h in zip(out[t], out["handle"], strict=True)]
        wire = f"{out['wire']:,}" if t == "grpc" else "(Ray object store)"
        split = " / ".join(
            f"{statistics.median(p[k] for p in out['parts'][t]):.3f}" for k in (0, 1)
        )
        lines.append(
            f"| `{t}` transport | {statistics.median(out[t]):.3f} | "
            f"{statistics.median(ratio):.2f}x ({min(ratio):.2f}-{max(ratio):.2f}) | "
            f"{statistics.median(vs_handle):.2f}x ({min(vs_handle):.2f}-{max(vs_handle):.2f}) "
            f"| {split} | {wire} |"
        )
    return "\n".join(lines)
