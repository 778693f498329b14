"""Writing a trained toy model: checkpoint files in the original Wan2.1 layouts, plot and card."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from safetensors.torch import save_file

import histream_model
from histream_model.config import Preset
from histream_model.dit import WanDiT
from histream_model.vae import WanVAE
from training.vae import BATCH, CROP, FRAMES, ON_OBJECT

SHIPPED = Path(histream_model.__file__).parent / "checkpoints" / "toy"
DIT_FILE = "transformer/diffusion_pytorch_model.safetensors"
VAE_FILE = "vae/toy_vae.safetensors"


def write_checkpoint(out: Path, dit: WanDiT, vae: WanVAE) -> None:
    """`out/transformer/` (Wan2.1's config.json + safetensors) and `out/vae/` (one file)."""
    cfg = dit.config
    (out / "transformer").mkdir(parents=True, exist_ok=True)
    (out / "vae").mkdir(parents=True, exist_ok=True)
    config = {
        "model_type": "t2v",
        "patch_size": list(cfg.patch_size),
        "dim": cfg.dim,
        "ffn_dim": cfg.ffn_dim,
        "freq_dim": cfg.freq_dim,
        "num_heads": cfg.num_heads,
        "num_layers": cfg.num_layers,
        "in_dim": cfg.in_dim,
        "out_dim": cfg.out_dim,
        "text_dim": cfg.text_dim,
        "text_len": cfg.text_len,
        "eps": cfg.eps,
    }
    (out / "transformer" / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    save_file(_contiguous(dit.state_dict()), str(out / DIT_FILE))
    save_file(_contiguous(vae.state_dict()), str(out / VAE_FILE))


def _contiguous(state: dict) -> dict:
    return {k: v.detach().contiguous().clone() for k, v in state.items()}


def write_loss_plot(path: Path, vae_losses: Sequence[float], dit_losses: Sequence[float]) -> None:
    """Both loss curves (raw and a 50-step moving average), log scale, to a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for ax, losses, title in ((axes[0], vae_losses, "VAE"), (axes[1], dit_losses, "DiT")):
        ax.plot(losses, color="0.75", linewidth=0.6, label="per step")
        ax.plot(_moving_average(losses, 50), color="C0", linewidth=1.4, label="50-step mean")
        ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_title(f"{title} loss (final {sum(losses[-100:]) / len(losses[-100:]):.4f})")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _moving_average(values: Sequence[float], n: int) -> list[float]:
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= n:
            total -= values[i - n]
        out.append(total / min(i + 1, n))
    return out


def write_card(out: Path, facts: dict, preset: Preset) -> None:
    """MODEL_CARD.md: what the weights are, how they were made and how to remake them."""
    seconds = facts["seconds"]
    dit, vae = preset.dit, preset.vae
    command = (
        f"python -m training --seed {facts['seed']} --vae-steps {facts['vae_steps']} "
        f"--vae-stream-steps {facts.get('vae_stream_steps', 0)} "
        f"--dit-steps {facts['dit_steps']} --clips {facts['clips']} "
        f"--clip-frames {facts['clip_frames']} --dit-batch {facts.get('dit_batch', 8)}"
    )
    for name in ("first_chunk_share", "top_level_share"):
        if name in facts:
            command += f" --{name.replace('_', '-')} {facts[name]}"
    teacher = facts.get("teacher_steps", 0)
    if teacher:
        command += (
            f" --teacher-steps {teacher} --pairs {facts['pairs']} "
            f"--solve-steps {facts['solve_steps']} --prompt-dropout {facts['prompt_dropout']} "
            f"--guidance {facts['guidance']}"
        )
    if facts.get("device", "cpu") != "cpu":
        command += f" --device {facts['device']}"
    text = f"""# The `toy` preset's weights

Trained by this project, from scratch, with `{command}` (`make train` runs `python -m training`
with its options in TRAIN_ARGS); nothing downloaded.

- **Data**: procedural clips (`training/data.py`): one or two flat shapes (circle, square,
  triangle; 8 colours, 2 sizes) moving left/right/up/down/diagonally, still or bouncing, slowly or
  quickly, wrapping around the edges, on one of 5 background colours; the prompt describes the
  clip. {facts["clips"]} clips of {facts["clip_frames"]} frames at {preset.width}x{preset.height},
  16 fps, for the DiT; fresh random crops for the VAE.
- **VAE**: Wan2.1 architecture, base_dim={vae.base_dim}, dim_mult={list(vae.dim_mult)},
  z_dim={vae.z_dim}; {facts["vae_steps"]} steps of L1 + MSE + 1e-5 KL on {CROP}x{CROP} crops
  ({ON_OBJECT:.0%} of them holding an object) of {FRAMES} frames, batch {BATCH}, then
  {facts.get("vae_stream_steps", 0)} more alternating those with 57-frame streams trained 3
  latent frames a step, histories carried; final loss {facts["vae_final_loss"]} (mean of the
  last 100 steps). Its latent statistics are folded into conv1/conv2, so Wan2.1's latent mean/std
  normalise it.
- **DiT**: Wan2.1 architecture, dim={dit.dim}, {dit.num_layers} layers, {dit.num_heads} heads,
  ffn {dit.ffn_dim}, text {dit.text_len}x{dit.text_dim} from the built-in hashed encoder;
  {facts["dit_steps"]} steps of flow matching with teacher forcing (clean context, block-causal
  frame mask, anchor + window or full-history layouts), at the sampler's timesteps, alternating
  low ({preset.width // 2}x{preset.height // 2}, NTK 1) and high resolution (NTK 2 on h and w);
  final loss {facts["dit_final_loss"]}.{_distilled(facts)}
- **Seed** {facts["seed"]}; {_where(facts)}; wall time: VAE {seconds["vae"]} s,
  encoding {seconds["encode"]} s, DiT {seconds["dit"]} s, total {seconds["total"]} s.
- Loss curves: `loss.png`; per-step losses: `losses.json`.
"""
    (out / "MODEL_CARD.md").write_text(text)


def _distilled(facts: dict) -> str:
    """The card's sentence on distillation (training/distill.py), if the run used it."""
    if not facts.get("teacher_steps"):
        return ""
    guided = (
        f", guided {facts['guidance']}x (classifier-free; the teacher saw the empty prompt in "
        f"{facts['prompt_dropout']:.0%} of its examples)"
        if facts.get("guidance", 1.0) > 1
        else ""
    )
    return (
        f" It starts from a teacher trained {facts['teacher_steps']} steps at every noise level, "
        f"whose {facts['solve_steps']}-step Euler solves from pure noise{guided} gave "
        f"{facts['pairs']} first chunks per resolution that the DiT learns at the top level "
        "(training/distill.py)."
    )


def _where(facts: dict) -> str:
    """Which machine did what: the device (and its name), the CPU threads, a reused VAE."""
    device = facts.get("device", "cpu")
    named = f" ({facts['device_name']})" if facts.get("device_name") else ""
    where = f"trained on `{device}`{named} with {facts['threads']} CPU threads"
    if facts.get("vae_from"):
        where += (
            "; the VAE was reused from an earlier run (`--vae-from`), whose own training time "
            "the VAE figure is"
        )
    return where
