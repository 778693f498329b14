"""What the service stores, where, and in which order.

- `Layout` names every object of one tenant (`tenants/{tenant}/videos/...`, `.../sessions/...`).
- `publish_video` writes a video's media first and its manifest last, so a reader that sees a
  manifest can rely on all of its media being present.
- `HlsPlaylist` / `SessionWriter` publish a streaming session as fMP4 segments and an HLS EVENT
  playlist that is rewritten after each segment lands, so it never references a missing object.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import threading
from dataclasses import dataclass

from services.storage import ObjectNotFound, Storage, check_key

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
_RESERVED_VIDEO_NAMES = ("manifest.json", "record.json")


def publish_video(
    storage: Storage,
    layout: Layout,
    video_id: str,
    media: dict[str, tuple[bytes, str]],
    manifest: dict,
) -> dict:
    """Write `media` (name -> (bytes, content type)), then `manifest.json` last; return it.

    The written manifest is `manifest` plus "objects": [{name, key, size, sha256, content_type}].
    If any media write fails, no manifest is written and the error propagates.
    """
    if not media:
        raise ValueError(f"publish_video({video_id!r}) needs at least one media object")
    if "objects" in manifest:
        raise ValueError("manifest must not contain 'objects'; publish_video fills it in")
    objects = []
    for name, (data, content_type) in media.items():
        if name in _RESERVED_VIDEO_NAMES:
            raise ValueError(f"media name {name!r} is reserved; got media {sorted(media)}")
        objects.append({
            "name": name, "key": layout.video_object_key(video_id, name), "size": len(data),
            "sha256": hashlib.sha256(data).hexdigest(), "content_type": content_type,
        })  # fmt: skip
    final = {**manifest, "objects": objects}
    # Encode before writing anything, so an unserialisable manifest leaves no orphaned media.
    encoded = json.dumps(final, indent=2, sort_keys=True).encode()
    manifest_key = layout.video_manifest_key(video_id)
    # On a re-publish, hide the old manifest first: it must never describe the new media.
    storage.delete(manifest_key)
    for obj, (data, content_type) in zip(objects, media.values(), strict=True):
        storage.put(obj["key"], data, content_type)
    storage.put(manifest_key, encoded, "application/json")
    return final


def read_manifest(storage: Storage, layout: Layout, video_id: str) -> dict | None:
    """The video's manifest, or None while it is unpublished (its media may be incomplete)."""
    try:
        return json.loads(storage.get(layout.video_manifest_key(video_id)))
    except ObjectNotFound:
        return None


def delete_video(storage: Storage, layout: Layout, video_id: str) -> int:
    """Delete the manifest first, then the rest of the video's objects; return the count.

    The mirror of `publish_video`: a reader never sees a manifest whose media is gone.
    """
    manifest_key = layout.video_manifest_key(video_id)
    had_manifest = storage.exists(manifest_key)
    storage.delete(manifest_key)
    return int(had_manifest) + storage.delete_prefix(layout.video_prefix(video_id))


class HlsPlaylist:
    """An HLS v7 EVENT playlist of fMP4 segments (RFC 8216): segments are only ever appended.

    `target_duration_s` is the longest segment expected; EXT-X-TARGETDURATION is the ceiling of
    the longest of it and every segment's duration, so it stays fixed while segments fit.
    """

    def __init__(self, target_duration_s: float, init_uri: str = "init.mp4") -> None:
        if not (math.isfinite(target_duration_s) and target_duration_s > 0):
            raise ValueError(f"target_duration_s={target_duration_s} must be a positive number")
        _check_uri(init_uri)
        self.target_duration_s = target_duration_s
        self.init_uri = init_uri
        self.segments: list[tuple[str, float]] = []  # (uri, duration in seconds)
        self.ended = False

    def add_segment(self, uri: str, duration_s: float) -> None:
        if self.ended:
            raise RuntimeError(f"cannot add segment {uri!r}: the playlist has ended")
        if not (math.isfinite(duration_s) and duration_s > 0):
            raise ValueError(f"segment {uri!r} duration_s={duration_s} must be positive")
        self.segments.append((_check_uri(uri), duration_s))

    def end(self) -> None:
        self.ended = True

    @property
    def target_duration(self) -> int:
        # Round to the 6 decimals EXTINF shows first, so 3.0000000001 does not become 4.
        longest = max([self.target_duration_s, *(d for _, d in self.segments)])
        return max(1, math.ceil(round(longest, 6)))

    def render(self) -> str:
        lines = [
            "#EXTM3U",
            "#EXT-X-VERSION:7",
            "#EXT-X-PLAYLIST-TYPE:EVENT",
            f"#EXT-X-TARGETDURATION:{self.target_duration}",
            "#EXT-X-MEDIA-SEQUENCE:0",
            "#EXT-X-INDEPENDENT-SEGMENTS",
        ]
        if self.segments:  # the map applies to the segments after it; none, no map to fetch
            lines.append(f'#EXT-X-MAP:URI="{self.init_uri}"')
        for uri, duration in self.segments:
            lines += [f"#EXTINF:{duration:.6f},", uri]
        if self.ended:
            lines.append("#EXT-X-ENDLIST")
        return "\n".join(lines) + "\n"


def _check_uri(uri: str) -> str:
    if not uri or any(c in uri for c in '"\r\n') or uri.startswith("#"):
        raise ValueError(f"playlist URI {uri!r} must be non-empty, without quotes or newlines")
    return uri


class SessionWriter:
    """Publishes one streaming session: init segment, media segments, a growing HLS playlist.

    Each `write_segment` stores the segment before rewriting the playlist, and the init segment
    must come first, so the playlist never references a missing object. Calls are serialised,
    so a later playlist is never overwritten by an earlier one.
    target_duration_s: the longest segment expected; None takes the first segment's duration.
    """

    def __init__(
        self,
        storage: Storage,
        layout: Layout,
        session_id: str,
        fps: float,
        target_duration_s: float | None = None,
    ) -> None:
        if not (math.isfinite(fps) and fps > 0):
            raise ValueError(f"fps={fps} must be a positive number")
        self.storage, self.layout, self.fps = storage, layout, fps
        self.session_id = session_id
        self.playlist_key = layout.session_playlist_key(session_id)  # validates session_id
        self._target_duration_s = target_duration_s
        self._playlist: HlsPlaylist | None = None
        self._init_written = False
        self._lock = threading.Lock()

    def write_init(self, data: bytes) -> str:
        key = self.layout.session_init_key(self.session_id)
        with self._lock:
            self.storage.put(key, data, "video/mp4")
            self._init_written = True
        return key

    def write_segment(self, index: int, data: bytes, num_frames: int) -> str:
        """Store segment `index` (1-based, consecutive) of `num_frames` frames; return its key."""
        if isinstance(num_frames, bool) or not isinstance(num_frames, int) or num_frames < 1:
            raise ValueError(f"num_frames={num_frames!r} must be a positive int")
        key = self.layout.session_segment_key(self.session_id, index)
        duration_s = num_frames / self.fps
        with self._lock:
            if not self._init_written:
                raise RuntimeError(
                    f"session {self.session_id!r}: write_init before segment {index}"
                )
            playlist = self._playlist or HlsPlaylist(self._target_duration_s or duration_s)
            expected = len(playlist.segments) + 1
            if index != expected:
                raise ValueError(f"segment index {index} out of order; expected {expected}")
            if playlist.ended:
                raise RuntimeError(
                    f"session {self.session_id!r} has ended; segment {index} refused"
                )
            self.storage.put(key, data, "video/iso.segment")
            playlist.add_segment(self.layout.segment_name(index), duration_s)
            self._playlist = playlist
            self._put_playlist()
        return key

    def end(self) -> str:
        """Mark the playlist ended (EXT-X-ENDLIST) and rewrite it; return its key."""
        with self._lock:
            if self._playlist is None:
                self._playlist = HlsPlaylist(self._target_duration_s or 1.0)
            self._playlist.end()
            self._put_playlist()
        return self.playlist_key

    def _put_playlist(self) -> None:
        assert self._playlist is not None
        body = self._playlist.render().encode()
        self.storage.put(self.playlist_key, body, "application/vnd.apple.mpegurl")
