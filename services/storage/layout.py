"""Where the service stores each object: every key of one tenant, under `tenants/{tenant}/`."""

from __future__ import annotations

import re
from dataclasses import dataclass

from services.storage.base import check_key

_TENANT_RE = re.compile(r"[a-z0-9-]{1,63}")
_ID_RE = re.compile(r"[A-Za-z0-9_-]{1,128}")
_SEGMENT_INDEX_RANGE = (1, 99999)  # 5 digits in the segment name


def _check_id(kind: str, value: str) -> str:
    if not isinstance(value, str) or not _ID_RE.fullmatch(value):
        raise ValueError(f"{kind}={value!r} must be 1-128 characters of [A-Za-z0-9_-]")
    return value


@dataclass(frozen=True)
class Layout:
    """Object keys of one tenant: everything lives under `tenants/{tenant}/`."""

    tenant: str = "default"

    def __post_init__(self) -> None:
        if not isinstance(self.tenant, str) or not _TENANT_RE.fullmatch(self.tenant):
            raise ValueError(f"tenant={self.tenant!r} must be 1-63 characters of [a-z0-9-]")

    def tenant_prefix(self) -> str:
        return f"tenants/{self.tenant}/"

    def videos_prefix(self) -> str:
        """Every video of the tenant (listing finds their `record.json`s)."""
        return f"{self.tenant_prefix()}videos/"

    def video_prefix(self, video_id: str) -> str:
        return f"{self.videos_prefix()}{_check_id('video_id', video_id)}/"

    def video_object_key(self, video_id: str, name: str) -> str:
        return check_key(self.video_prefix(video_id) + name)

    def video_key(self, video_id: str) -> str:
        return self.video_object_key(video_id, "video.mp4")

    def video_manifest_key(self, video_id: str) -> str:
        return self.video_object_key(video_id, "manifest.json")

    def video_record_key(self, video_id: str) -> str:
        """The gateway's job record for the video."""
        return self.video_object_key(video_id, "record.json")

    def unfinished_prefix(self, kind: str = "videos") -> str:
        """A mark per queued or running video job (`kind` "videos") or unfinished batch
        ("batches"): see services.jobs.marks."""
        return f"{self.tenant_prefix()}unfinished/{_check_id('kind', kind)}/"

    def unfinished_key(self, video_id: str) -> str:
        return check_key(self.unfinished_prefix() + _check_id("video_id", video_id))

    def tombstones_prefix(self) -> str:
        """Marks of deleted videos (see `delete_video`), outside the videos' own prefixes."""
        return f"{self.tenant_prefix()}deleted/"

    def tombstone_key(self, video_id: str) -> str:
        return check_key(self.tombstones_prefix() + _check_id("video_id", video_id))

    def video_parts_prefix(self, video_id: str) -> str:
        """Where a running video job's fMP4 init and segments wait to be joined into its MP4."""
        return self.video_prefix(video_id) + "parts/"

    def video_part_key(self, video_id: str, index: int) -> str:
        """Part 0 is the init segment; part n the n-th media segment."""
        name = "init.mp4" if index == 0 else self.segment_name(index)
        return self.video_parts_prefix(video_id) + name

    def snapshot_key(self, kind: str, object_id: str) -> str:
        """A running session's snapshot (kind "video" or "session")."""
        prefix = self.video_prefix if kind == "video" else self.session_prefix
        return prefix(object_id) + "snapshot.pb"

    def files_prefix(self) -> str:
        """Uploaded files (batch input) and the files batches write (their output and errors)."""
        return f"{self.tenant_prefix()}files/"

    def file_key(self, file_id: str, name: str) -> str:
        """`meta.json` (the file object) or `content` (its bytes)."""
        return check_key(f"{self.files_prefix()}{_check_id('file_id', file_id)}/{name}")

    def batches_prefix(self) -> str:
        return f"{self.tenant_prefix()}batches/"

    def batch_record_key(self, batch_id: str) -> str:
        return check_key(f"{self.batches_prefix()}{_check_id('batch_id', batch_id)}/record.json")

    def sessions_prefix(self) -> str:
        return f"{self.tenant_prefix()}sessions/"

    def session_prefix(self, session_id: str) -> str:
        return f"{self.sessions_prefix()}{_check_id('session_id', session_id)}/"

    def session_init_key(self, session_id: str) -> str:
        return self.session_prefix(session_id) + "init.mp4"

    @staticmethod
    def segment_name(index: int) -> str:
        """'seg-00001.m4s' for index 1; names sort in playback order."""
        lo, hi = _SEGMENT_INDEX_RANGE
        if isinstance(index, bool) or not isinstance(index, int) or not lo <= index <= hi:
            raise ValueError(f"segment index {index!r} must be an int in [{lo}, {hi}] (1-based)")
        return f"seg-{index:05d}.m4s"

    def session_segment_key(self, session_id: str, index: int) -> str:
        return self.session_prefix(session_id) + self.segment_name(index)

    def session_playlist_key(self, session_id: str) -> str:
        return self.session_prefix(session_id) + "playlist.m3u8"


# Object names publish_video owns or the gateway writes beside the media.
