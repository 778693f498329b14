"""Video jobs: their records in storage (`records.py`) and the runner that generates them
(`runner.py`). Runs in the gateway process; reaches the stages through `services.sessions`."""

from services.jobs.records import RecordStore, VideoError, VideoRecord, VideoStatus
from services.jobs.runner import JobRunner

__all__ = ["JobRunner", "RecordStore", "VideoError", "VideoRecord", "VideoStatus"]
