"""Each stage loads only what it runs (README, *Running against real weights*): the structure
stage the DiT and the text encoder, the refine stage the DiT, the decode pool the VAE; and a
denoising stage's byte budget."""

from __future__ import annotations

import pytest

import services.stages.decode as decode_module
import services.stages.denoise as denoise_module
from services.settings import ServeSettings
from services.stages import DecodeStage, RefineStage, StructureStage
from services.storage import StorageSettings


@pytest.fixture
def loads(monkeypatch) -> list[str]:
    """The names of the loaders called, in order (each still loads)."""
    called: list[str] = []
    for module, name in ((denoise_module, "dit_for"), (denoise_module, "text_encoder_for"),
                         (decode_module, "decoder_for")):  # fmt: skip
        loader = getattr(module, name)

        def recording(*args, _loader=loader, _name=name, **kwargs):
            called.append(_name)
            return _loader(*args, **kwargs)

        monkeypatch.setattr(module, name, recording)
    return called


def test_each_stage_loads_only_what_it_runs(loads, tmp_path):
    settings = ServeSettings(preset="tiny", storage=StorageSettings(local_dir=str(tmp_path)))
    structure = StructureStage(settings)
    assert sorted(loads) == ["dit_for", "text_encoder_for"]
    loads.clear()
    RefineStage(settings, structure)
    assert loads == ["dit_for"]
    loads.clear()
    DecodeStage(settings)
    assert loads == ["decoder_for"]


def test_a_denoisers_byte_budget_is_the_setting_or_on_cuda_90_percent_of_free_memory(
    tmp_path, monkeypatch
):
    """README, *Limits and overload*: with `stage_budget_bytes` unset, a denoising stage on CUDA
    admits sessions up to 90% of the memory free once its model is loaded; on the CPU, none."""
    from types import SimpleNamespace

    import torch

    storage = StorageSettings(local_dir=str(tmp_path))
    stage = StructureStage(ServeSettings(preset="tiny", storage=storage))
    assert stage.sessions.budget_bytes is None  # on the CPU: admitted by count only
    set_by_hand = StructureStage(ServeSettings(preset="tiny", storage=storage,
                                               stage_budget_bytes=12345))  # fmt: skip
    assert set_by_hand.sessions.budget_bytes == 12345

    on_gpu = SimpleNamespace(device=torch.device("cuda", 0))
    monkeypatch.setattr(stage, "model", SimpleNamespace(parameters=lambda: iter([on_gpu])))
    asked = []
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda d: asked.append(d) or (10_000, 80_000))
    assert stage._device_budget() == 9_000 and asked == [torch.device("cuda", 0)]
