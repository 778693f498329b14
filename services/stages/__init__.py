"""The model-holding replicas, one Serve deployment each, serving `stages.proto`:

- `denoise.py`  `StructureStage` (low resolution, text encoder) and `RefineStage` (high
                resolution), both a `DenoiseStage` running their resolution's phases, and
                `StepStage`, a worker of HiAR's pipeline holding its share of the step caches;
- `decode.py`   `DecodeStage`, the decode pool;
- `base.py`, `table.py`  what every stage shares: a bounded session table, the idle reaper.

Callers reach them through deployment handles routed by session id, so every request of a
session lands on the replica holding its state; a replica asked about a session it does not
hold answers `SessionNotHeld`.
"""

from services.stages.decode import DecodeStage
from services.stages.denoise import DenoiseStage, RefineStage, StepStage, StructureStage
from services.stages.table import SessionTable

__all__ = [
    "DecodeStage",
    "DenoiseStage",
    "RefineStage",
    "SessionTable",
    "StepStage",
    "StructureStage",
]
