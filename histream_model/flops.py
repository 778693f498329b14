"""Analytic FLOP and memory model of HiStream inference: pure arithmetic over the configs.

FLOPs count multiply-adds as 2 and cover matrix products only (linear layers, the patch
embedding, attention scores and weighted sums); norms, RoPE, modulation and the re-noising
arithmetic are elementwise and left out. For one forward pass of Lq query tokens attending Lk
self-attention keys (the chunk's attended cache prefix, itself included) and Lt text tokens, per
block of hidden size d and feed-forward size f:

    self-attention projections q, k, v, o   8 Lq d^2
    self-attention scores + weighted sum    4 Lq Lk d
    cross-attention projections q, o        4 Lq d^2   (text K/V: once per prompt, see below)
    cross-attention                         4 Lq Lt d
    feed-forward                            4 Lq d f

plus the patch embedding 2 Lq (C p) d, the timestep embedding (one row per pass) and the head
2 Lq d (C p), with C latent channels and p the patch volume. A t = 0 commit pass (`kv_only`)
runs every block but the last in full, only the last block's k and v projections (4 Lq d^2),
and no head. The text K/V (text embedding + k, v projections of every layer) are computed once
per prompt and resolution, not per pass.

Key lengths come from the same `CacheLayout` the generator allocates; passes per chunk from the
chunk's plan (`histream_model.schedules`), the one the generator and the stages run.
"""

from __future__ import annotations

from dataclasses import dataclass

from histream_model.config import DiTConfig, Preset, Resolution, get_mode
from histream_model.kv_cache import CacheLayout
from histream_model.schedules import PassKind, plan_chunk, session_caches
from histream_model.shape import VideoShape

# -- one forward pass --------------------------------------------------------------------------


def pass_terms(
    config: DiTConfig,
    query_tokens: int,
    key_tokens: int,
    text_tokens: int | None = None,
    kv_only: bool = False,
) -> dict[str, int]:
    """FLOPs of one forward pass by term (keys as in the module docstring), batch 1."""
    d, f, lq = config.dim, config.ffn_dim, query_tokens
    lt = config.text_len if text_tokens is None else text_tokens
    channels = config.in_dim * config.patch_volume
    full_blocks = config.num_layers - 1 if kv_only else config.num_layers
    return {
        "self_proj": full_blocks * 8 * lq * d * d + (4 * lq * d * d if kv_only else 0),
        "self_attn": full_blocks * 4 * lq * key_tokens * d,
        "cross_proj": full_blocks * 4 * lq * d * d,
        "cross_attn": full_blocks * 4 * lq * lt * d,
        "ffn": full_blocks * 4 * lq * d * f,
        "embed": 2 * lq * channels * d + 2 * (config.freq_dim * d + d * d + 6 * d * d),
        "head": 0 if kv_only else 2 * lq * d * config.out_dim * config.patch_volume,
    }


def pass_flops(
    config: DiTConfig,
    query_tokens: int,
    key_tokens: int,
    text_tokens: int | None = None,
    kv_only: bool = False,
) -> int:
    """FLOPs of one forward pass (batch 1); `text_tokens` defaults to the config's text_len."""
    return sum(pass_terms(config, query_tokens, key_tokens, text_tokens, kv_only).values())


def text_kv_flops(config: DiTConfig, text_tokens: int | None = None) -> int:
    """FLOPs of one prompt's cross-attention K/V at one resolution (text embedding included)."""
    d, lt = config.dim, config.text_len if text_tokens is None else text_tokens
    embedding = 2 * lt * (config.text_dim * d + d * d)
    return embedding + config.num_layers * 4 * lt * d * d


# -- passes of a chunk and of a video ----------------------------------------------------------


def _resolution(resolution: Resolution | str) -> Resolution:
    try:
        return Resolution(resolution)
    except ValueError:
        raise ValueError(
            f"resolution must be one of {[r.value for r in Resolution]}, got {resolution!r}"
        ) from None


def tokens_per_frame(shape: VideoShape, resolution: Resolution | str) -> int:
    return shape.tokens_per_frame(shape.latent_hw(_resolution(resolution)))


def cache_layout(shape: VideoShape, resolution: Resolution | str) -> CacheLayout:
    """The layout the generator allocates for this resolution (AGSW or full history)."""
    return CacheLayout.for_shape(shape, _resolution(resolution))


@dataclass(frozen=True)
class PassCost:
    """One forward pass of a chunk, in the order the generator runs them."""

    resolution: Resolution
    kind: PassKind  # a denoising step, or the t = 0 kv_only commit pass
    query_tokens: int  # the chunk's tokens at this resolution
    key_tokens: int  # self-attention keys: the attended cache prefix, the chunk included
    terms: dict[str, int]  # FLOPs by term (see pass_terms)

    @property
    def flops(self) -> int:
        return sum(self.terms.values())


def chunk_passes(shape: VideoShape, chunk_index: int) -> list[PassCost]:
    """The chunk's passes as its schedule plans them (e.g. low steps, high steps, commits)."""
    plan = plan_chunk(shape, chunk_index)
    config = shape.preset.dit
    end = plan.frame_start + plan.num_frames
    passes = []
    for resolution, kind in plan.passes():
        layout = cache_layout(shape, resolution)
        lq = plan.num_frames * layout.tokens_per_frame
        lk = layout.context_frames(end) * layout.tokens_per_frame
        terms = pass_terms(config, lq, lk, kv_only=kind == PassKind.COMMIT)
        passes.append(PassCost(resolution, kind, lq, lk, terms))
    return passes


def chunk_flops(shape: VideoShape, chunk_index: int) -> dict[tuple[str, str], int]:
    """FLOPs of one chunk by (resolution, kind); kinds the mode does not run are absent."""
    out: dict[tuple[str, str], int] = {}
    for p in chunk_passes(shape, chunk_index):
        out[p.resolution, p.kind] = out.get((p.resolution, p.kind), 0) + p.flops
    return out


@dataclass(frozen=True)
class VideoFlops:
    """A whole video's denoising FLOPs (every chunk's steps and commits), batch 1."""

    shape: VideoShape
    chunks: tuple[tuple[PassCost, ...], ...]  # per chunk, its passes in order
    text_kv: int  # once per prompt: both resolutions' text K/V (not in `total`)

    @property
    def total(self) -> int:
        return sum(p.flops for chunk in self.chunks for p in chunk)

    @property
    def per_frame(self) -> float:
        """Per output video frame, as the paper's per-frame latency."""
        return self.total / self.shape.num_frames

    def by_kind(self) -> dict[tuple[str, str], int]:
        out: dict[tuple[str, str], int] = {}
        for chunk in self.chunks:
            for p in chunk:
                out[p.resolution, p.kind] = out.get((p.resolution, p.kind), 0) + p.flops
        return out

    def by_term(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for chunk in self.chunks:
            for p in chunk:
                for term, value in p.terms.items():
                    out[term] = out.get(term, 0) + value
        return out


def video_flops(preset: Preset, mode: str, height: int, width: int, num_frames: int) -> VideoFlops:
    """The FLOP model of one video at a preset, mode and size (validated like a request)."""
    shape = VideoShape(preset, get_mode(mode), height, width, num_frames)
    chunks = tuple(tuple(chunk_passes(shape, i)) for i in range(shape.num_chunks))
    resolutions = 2 if shape.mode.dual_resolution else 1
    return VideoFlops(shape=shape, chunks=chunks, text_kv=resolutions * text_kv_flops(preset.dit))


# -- memory ------------------------------------------------------------------------------------


def kv_bytes(
    config: DiTConfig, layout: CacheLayout, batch: int = 1, bytes_per_element: int = 4
) -> int:
    """Bytes of one preallocated self-attention cache (keys and values, every layer)."""
    return 2 * config.num_layers * batch * layout.capacity_tokens * config.dim * bytes_per_element


def text_kv_bytes(config: DiTConfig, batch: int = 1, bytes_per_element: int = 4) -> int:
    """Bytes of one prompt's cross-attention K/V at one resolution."""
    return 2 * config.num_layers * batch * config.text_len * config.dim * bytes_per_element


def session_bytes(
    preset: Preset,
    mode: str,
    height: int,
    width: int,
    num_frames: int,
    bytes_per_element: int = 4,
    batch: int = 1,
) -> dict[str, int]:
    """What one session holds between chunks: {"kv_low", "kv_high", "text_kv"} in bytes.

    "kv_low"/"kv_high" sum every cache at that resolution (one for HiStream's schedules, one per
    step there for HiAR's). The text K/V is counted once per resolution (each stage keeps its own
    copy, shared by its caches).
    """
    shape = VideoShape(preset, get_mode(mode), height, width, num_frames)
    config = preset.dit
    out = {"kv_low": 0, "kv_high": 0, "text_kv": 0}
    out["text_kv"] = len(shape.mode.resolutions) * text_kv_bytes(config, batch, bytes_per_element)
    for resolution in session_caches(shape).values():
        layout = cache_layout(shape, resolution)
        out[f"kv_{resolution}"] += kv_bytes(config, layout, batch, bytes_per_element)
    return out


def worker_bytes(
    preset: Preset,
    mode: str,
    height: int,
    width: int,
    num_frames: int,
    workers: int,
    bytes_per_element: int = 4,
) -> list[int]:
    """What one session holds on each of `workers` pipeline workers (HiAR's step workers,
    `histream_model.schedules.pipeline.split_phases`): its share of the caches and one text K/V."""
    from histream_model.schedules.pipeline import split_phases

    shape = VideoShape(preset, get_mode(mode), height, width, num_frames)
    plan = plan_chunk(shape, 0)
    config = preset.dit
    text = text_kv_bytes(config, 1, bytes_per_element)
    out = []
    for group in split_phases(plan, workers, shape):
        caches = {plan.phases[i].cache: plan.phases[i].resolution for i in group}
        held = sum(
            kv_bytes(config, cache_layout(shape, res), 1, bytes_per_element)
            for res in caches.values()
        )
        out.append(held + text)
    return out


def dit_parameters(config: DiTConfig) -> int:
    """Parameters of the DiT (weights and biases), e.g. 1,418,996,800 for Wan2.1-T2V-1.3B."""
    d, f, out = config.dim, config.ffn_dim, config.out_dim * config.patch_volume
    patch = config.in_dim * config.patch_volume * d + d
    text = config.text_dim * d + d + d * d + d
    time = config.freq_dim * d + d + d * d + d + d * 6 * d + 6 * d
    attention = 4 * (d * d + d) + 2 * d  # q, k, v, o + norm_q, norm_k
    block = 2 * attention + 2 * d + (d * f + f + f * d + d) + 6 * d  # + norm3, ffn, modulation
    head = d * out + out + 2 * d
    return patch + text + time + config.num_layers * block + head
