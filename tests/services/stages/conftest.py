"""The stage tests' settings: the tiny preset, two sessions a replica, storage in tmp_path."""

from __future__ import annotations

import pytest

from services.settings import ServeSettings
from services.storage import StorageSettings


@pytest.fixture
def settings(tmp_path) -> ServeSettings:
    return ServeSettings(
        preset="tiny",
        max_sessions_per_replica=2,
        storage=StorageSettings(local_dir=str(tmp_path / "store")),
    )
