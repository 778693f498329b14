"""Each stage loads only what it runs (README, *Running against real weights*): the structure
stage the DiT and the text encoder, the refine stage the DiT, the decode pool the VAE."""

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
