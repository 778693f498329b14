"""CUDA correctness of the schedules (`python -m bench.gpu_check` on a CUDA machine): in bf16 on
the `bench` preset, every mode's phases run on split states (as the stages hold them) and HiAR's
pipelined runs (2 and 4 worker threads) equal the in-process generator, bit for bit."""

import torch

from histream_model import MODES, build_dit
from histream_model.config import get_mode, get_preset
from histream_model.generator import HiStreamGenerator
from histream_model.schedules import handoff, new_session_states, plan_chunk, run_phase
from histream_model.schedules.pipeline import PipelinedRun
from histream_model.shape import VideoShape

preset = get_preset("bench")
dit = build_dit(preset, device="cuda", dtype=torch.bfloat16)
ctx = torch.randn(1, preset.dit.text_len, preset.dit.text_dim, device="cuda")
H, W, F = 384, 640, 45
for mode in MODES:
    gen = HiStreamGenerator(dit, preset, mode)
    want = [c.latents for c in gen.generate(ctx, H, W, F, seed=3)]
    shape = VideoShape(preset, get_mode(mode), H, W, F)
    states = new_session_states(dit, shape, ctx)
    got = []
    for i in range(shape.num_chunks):
        plan = plan_chunk(shape, i)
        received = None
        for k, phase in enumerate(plan.phases):
            r = run_phase(dit, states[phase.cache], plan, phase, preset.options, 3, received)
            if k == plan.output:
                got.append(r.latents)
            if k + 1 < len(plan.phases):
                received = handoff(shape, plan.phases[k + 1], r.latents)
    same = all(torch.equal(a, b) for a, b in zip(got, want, strict=True))
    finite = all(torch.isfinite(x).all().item() for x in want)
    line = f"{mode}: split-state equal={same}, finite={finite}"
    if shape.mode.schedule == "hiar":
        for workers in (2, 4):
            states = new_session_states(dit, shape, ctx)
            plans = [plan_chunk(shape, i) for i in range(shape.num_chunks)]
            piped = [x for _, x in PipelinedRun(dit, states, shape, 3, workers, plans)]
            equal = all(torch.equal(a, b) for a, b in zip(piped, want, strict=True))
            line += f", pipelined x{workers} equal={equal}"
    print(line, flush=True)
