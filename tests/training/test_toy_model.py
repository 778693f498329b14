"""The `toy` preset: its weights are found where `Preset.weights` says, through the ordinary
loaders; a missing checkpoint names `make train`; `histream eval` scores a trained folder.

The shipped weights are the embedded default and follow their prompts (colour and motion read
back from the pixels).
"""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from histream_model.components import CHECKPOINTS, load_components, resolve_weights, shipped_weights
from histream_model.config import DEFAULT_PRESET, get_preset
from histream_model.weights.common import WeightsError
from services.local.cli import main as cli_main
from training.evaluate import SCENES, evaluate


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A toy-architecture checkpoint from a very short `histream train` run."""
    out = tmp_path_factory.mktemp("toy") / "weights"
    code = cli_main(["train", "--out", str(out), "--vae-steps", "2",
                     "--vae-stream-steps", "2", "--dit-steps", "2",
                     "--clips", "2", "--clip-frames", "21", "--threads", "2"])  # fmt: skip
    assert code == 0
    return out


def test_the_default_preset_is_the_toy_with_its_shipped_weights() -> None:
    assert DEFAULT_PRESET == "toy"
    paths = shipped_weights(get_preset(DEFAULT_PRESET))
    assert paths is not None and paths.dit.is_relative_to(CHECKPOINTS)
    assert shipped_weights(get_preset("tiny")) is None  # random weights, built from the config
    card = (CHECKPOINTS / get_preset("toy").weights / "MODEL_CARD.md").read_text()
    assert "--teacher-steps 4000" in card  # the recipe that made them, to remake them


def test_the_shipped_weights_follow_their_prompts() -> None:
    """Issue 13: the embedded default draws the prompt's scene. `histream eval` on the first 8
    evaluation prompts (45 frames, seed 0, `histream`) read, when the weights shipped: colour 7
    of 8, motion direction 6, background 8 (shape 3, size 5, speed 5; README, "A model trained
    here"). The floors leave a prompt's worth of room for other torch builds."""
    components = load_components("toy", device="cpu")
    scores = evaluate(components, ["histream"], SCENES[:8], [0], 45)
    right = {k: sum(s.adherence[k] for s in scores) for k in scores[0].adherence}
    assert right["colour"] >= 6 and right["motion"] >= 5 and right["background"] >= 7, right


def test_toy_weights_are_looked_for_in_the_package(tmp_path) -> None:
    toy = get_preset("toy")
    assert (CHECKPOINTS / toy.weights).parent == CHECKPOINTS / "checkpoints"
    moved = replace(toy, weights=str(tmp_path / "nowhere"))
    with pytest.raises(WeightsError, match=r"ships its weights in .*nowhere.*make train"):
        shipped_weights(moved)
    with pytest.raises(WeightsError, match="make train"):
        load_components(moved, device="cpu")


def test_toy_weights_load_through_the_ordinary_loaders(trained, monkeypatch) -> None:
    toy = get_preset("toy")
    monkeypatch.setattr("histream_model.components.CHECKPOINTS", trained.parent)
    shipped = replace(toy, weights=trained.name)
    paths = shipped_weights(shipped)
    assert paths == resolve_weights(trained) and paths.text_encoder is None
    components = load_components(shipped, device="cpu")
    assert components.dit.config == toy.dit
    assert (components.vae.config.base_dim, components.vae.config.dim_mult) == (16, (1, 2, 2, 2))
    assert 1_000_000 < sum(p.numel() for p in components.dit.parameters()) < 3_000_000


def test_histream_eval_scores_a_trained_folder(trained, tmp_path, capsys) -> None:
    out = tmp_path / "scores.json"
    capsys.readouterr()
    args = ["eval", "--weights", str(trained), "--modes", "histream", "self-forcing",
            "--scenes", "1", "--frames", "21", "--drift-seconds", "0",
            "--out", str(out)]  # fmt: skip
    code = cli_main(args)
    assert code == 0
    result = json.loads(out.read_text())
    assert list(result["summary"]) == ["self-forcing", "histream"]  # the reference first
    videos = {v["mode"]: v for v in result["videos"]}
    assert videos["histream"]["prompt"] == SCENES[0].prompt and videos["histream"]["frames"] == 21
    assert set(videos["histream"]["adherence"]) == {
        "colour", "shape", "size", "motion", "speed", "background"
    }  # fmt: skip
    assert videos["self-forcing"]["psnr"] is None and videos["histream"]["psnr"] > 0
    assert 0 < videos["histream"]["ssim"] <= 1
    assert json.loads(capsys.readouterr().out) == result["summary"]


def test_the_diagnosis_measures_the_top_level_and_can_fine_tune_it(trained, tmp_path, capsys):
    from training.diagnose import main as diagnose

    capsys.readouterr()
    out = tmp_path / "tuned"
    code = diagnose(["--weights", str(trained), "--finetune", "2", "--clips", "2",
                     "--out", str(out)])  # fmt: skip
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    targets = {"placed low", "noise-peak low", "placed high", "noise-peak high"}
    assert set(result) == {"before", "after"} and set(result["before"]) == targets
    for measured in result["before"].values():
        assert measured["object_mse"] > 0 and measured["object_variance"] > 0
    assert result["after"] != result["before"]  # the fine-tune changed the DiT
    tuned = load_components("toy", resolve_weights(out), device="cpu")
    assert tuned.dit.config == get_preset("toy").dit
