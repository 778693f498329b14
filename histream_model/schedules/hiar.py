"""HiAR's schedule (arXiv 2603.08703): context at the current step's noise level.

Every denoising step k has its own cache. Chunk i's pass at step k attends to cache k, which
holds the earlier chunks re-noised to step k + 1's level (clean at the last step): after the
pass, the chunk's x0 is re-noised to t_{k+1} with the draw step k + 1 itself enters from, and a
kv-only pass on that latent at t_{k+1} writes the chunk into cache k. HiAR's code runs the steps
"timestep-first" (every chunk at step 1, then every chunk at step 2, ...); chunk i at step k
reads only cache k (chunks < i at step k) and its own step k - 1 result, so running chunk by
chunk, or as a wavefront of one worker per step, computes the same numbers.

- `hiar`: 4 high-res steps, 4 high-res caches, each under AGSW.
- `histream-hiar`: steps 1-2 at low resolution (caches low.1, low.2), Up(x0) re-noised into
  steps 3-4 at high resolution (high.3, high.4). Step 2's cache gets its low-res x0 re-noised
  to t_3 with a low-res draw of its own (the high-res entry to step 3 draws separately).

Cost per chunk: a denoising pass and a cache pass at every step (8 passes for 4 steps).
"""

from __future__ import annotations

from histream_model.config import Resolution
from histream_model.schedules.histream import Planner, first_chunk_scale, warped_steps
from histream_model.schedules.plan import Entry, Phase, Write
from histream_model.shape import VideoShape

OWN_WRITE_DRAW = 100  # + step: the draw of a write re-noised at a resolution its next step leaves


def step_cache(resolution: Resolution, step: int) -> str:
    """The name of step `step`'s cache (1-based), e.g. "high.3"."""
    return f"{resolution}.{step}"


class HiARSchedule(Planner):
    def phases(self, shape: VideoShape, index: int) -> tuple[Phase, ...]:
        low, high = self.mode.steps(index)
        warped = warped_steps(shape.preset.options, low + high)
        scale = first_chunk_scale(shape, index)
        resolutions = [Resolution.LOW] * low + [Resolution.HIGH] * high
        phases = []
        for j, (res, t) in enumerate(zip(resolutions, warped, strict=True)):
            if j == 0:
                entry = Entry.NOISE
            else:
                entry = Entry.RENOISE if resolutions[j - 1] == res else Entry.UPSAMPLE
            step = dict(
                resolution=res,
                entry=entry,
                timesteps=(t,),
                first_draw=j,
                scale=scale if res == Resolution.HIGH else None,
                cache=step_cache(res, j + 1),
            )
            if j + 1 == len(warped):
                phases.append(Phase(**step, write=Write.CLEAN))
                continue
            same = resolutions[j + 1] == res
            draw = j + 1 if same else OWN_WRITE_DRAW + j + 1
            phases.append(
                Phase(**step, write=Write.RENOISED, write_t=warped[j + 1], write_draw=draw)
            )
        return tuple(phases)
