"""The weight override flags (README, *Running against real weights*): `--dit`, `--vae` and
`--text-encoder` replace what is found in `--weights`, for `histream generate` and for
`histream serve` (through its settings, as `HISTREAM_DIT`, ... would)."""

from __future__ import annotations

from histream_model.components import WeightPaths
from services.local.cli import build_parser, settings_from_args, weights_from_args


def test_each_override_flag_replaces_what_the_weights_directory_holds(tiny_pipeline_dir, tmp_path):
    dit, vae, text = tmp_path / "generator.pt", tmp_path / "Wan2.1_VAE.pth", tmp_path / "umt5"
    dit.write_bytes(b"")
    vae.write_bytes(b"")
    text.mkdir()
    found = WeightPaths(tiny_pipeline_dir / "transformer", tiny_pipeline_dir / "vae",
                        tiny_pipeline_dir)  # fmt: skip
    weights = ["--weights", str(tiny_pipeline_dir)]
    overrides = ["--dit", str(dit), "--vae", str(vae), "--text-encoder", str(text)]
    generate = ["generate", "--prompt", "a cat", "--out", str(tmp_path / "v.mp4")]
    parse = build_parser().parse_args
    assert weights_from_args(parse([*generate, *weights])) == found
    assert weights_from_args(parse([*generate, *weights, *overrides])) == WeightPaths(
        dit, vae, text
    )
    assert weights_from_args(parse([*generate, *weights, "--vae", str(vae)])) == WeightPaths(
        found.dit, vae, found.text_encoder
    )
    serve = settings_from_args(parse(["serve", *weights, *overrides]))
    assert serve.weight_paths() == WeightPaths(dit, vae, text)
