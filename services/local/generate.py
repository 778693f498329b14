"""In-process generation to an MP4 file: prompt -> chunks -> streaming VAE decode -> H.264.

Used by `histream generate`. Each chunk is decoded and encoded as soon as it is denoised, so
memory holds one chunk of frames at a time, and the report separates denoising time (what the
paper's per-frame latency measures) from decoding and encoding.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from tqdm import tqdm

from histream_model.components import Components
from histream_model.config import get_mode
from histream_model.generator import ChunkResult, HiStreamGenerator
from histream_model.shape import VideoShape
from histream_model.text import check_prompt
from services.media import Mp4Writer


@dataclass(frozen=True)
class ChunkReport:
    index: int
    low_steps: int  # low-res denoising passes
    high_steps: int  # high-res denoising passes
    low_passes: int  # low-res passes including the KV_low commit
    high_passes: int  # high-res passes including the KV_high commit
    seconds: float  # denoising + commits
    decode_seconds: float
    kv_bytes: dict[str, int]  # {"low", "high"} bytes held by the session's caches

    @classmethod
    def of(cls, chunk: ChunkResult, decode_seconds: float) -> ChunkReport:
        """The report of a generated chunk: its costs, not its latents."""
        costs = {f.name: getattr(chunk, f.name) for f in fields(cls) if hasattr(chunk, f.name)}
        return cls(**costs, decode_seconds=decode_seconds)


@dataclass
class GenerateReport:
    mode: str
    preset: str
    height: int
    width: int
    num_frames: int
    seed: int
    chunks: list[ChunkReport] = field(default_factory=list)
    denoise_seconds: float = 0.0
    denoise_seconds_per_frame: float = 0.0
    decode_seconds: float = 0.0
    encode_seconds: float = 0.0
    output: str = ""

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)


def generate_video(
    components: Components,
    prompt: str,
    out: str | Path,
    mode: str = "histream+",
    seed: int = 0,
    num_frames: int | None = None,
    height: int | None = None,
    width: int | None = None,
    progress: bool = True,
) -> GenerateReport:
    """Generate one video into `out` (MP4); the partial file is removed if anything fails."""
    preset = components.preset
    shape = VideoShape(
        preset,
        get_mode(mode),
        preset.height if height is None else height,
        preset.width if width is None else width,
        preset.num_frames if num_frames is None else num_frames,
    )
    prompt = check_prompt(prompt)
    report = GenerateReport(
        mode=mode,
        preset=preset.name,
        height=shape.height,
        width=shape.width,
        num_frames=shape.num_frames,
        seed=seed,
        output=str(out),
    )
    context = components.text.encode([prompt])
    generator = HiStreamGenerator(components.dit, preset, mode)
    state = generator.start(context, shape.height, shape.width, shape.num_frames, seed)
    vae_state = components.vae.new_decode_state()
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    writer = Mp4Writer(out, width=shape.width, height=shape.height, fps=preset.fps)
    bar = tqdm(total=shape.num_chunks, desc=f"{mode} chunks", unit="chunk", disable=not progress)
    try:
        while not state.done:
            chunk = generator.step(state)
            started = time.perf_counter()
            frames, vae_state = components.vae.decode_frames(chunk.latents, vae_state)
            decoded = time.perf_counter()
            writer.write(frames)
            report.encode_seconds += time.perf_counter() - decoded
            report.decode_seconds += decoded - started
            report.chunks.append(ChunkReport.of(chunk, decode_seconds=decoded - started))
            bar.update(1)
            bar.set_postfix(denoise_s=f"{chunk.seconds:.2f}")
        writer.close()
    except BaseException:
        writer.abort()
        raise
    finally:
        bar.close()
    report.denoise_seconds = sum(c.seconds for c in report.chunks)
    report.denoise_seconds_per_frame = report.denoise_seconds / shape.num_frames
    return report
