"""A streaming session in storage: fMP4 segments and an HLS playlist that is rewritten after
each segment lands, so it never references a missing object. A session of known length has an
EVENT playlist (segments only appended); an endless one a live sliding window of its latest
segments, older segments deleted once they are well out of it."""

from __future__ import annotations

import math
import threading

from services.storage.base import Storage
from services.storage.layout import Layout


class HlsPlaylist:
    """An HLS v7 playlist of fMP4 segments (RFC 8216). Without `window`, an EVENT playlist:
    segments are only ever appended. With it, a live playlist of the latest `window` segments
    (EXT-X-MEDIA-SEQUENCE counts those that left it).

    `target_duration_s` is the longest segment expected; EXT-X-TARGETDURATION is the ceiling of
    the longest of it and every segment's duration, so it stays fixed while segments fit.
    """

    def __init__(
        self, target_duration_s: float, init_uri: str = "init.mp4", window: int | None = None
    ) -> None:
        if not (math.isfinite(target_duration_s) and target_duration_s > 0):
            raise ValueError(f"target_duration_s={target_duration_s} must be a positive number")
        if window is not None and window < 1:
            raise ValueError(f"window={window} must be at least 1 segment")
        _check_uri(init_uri)
        self.target_duration_s = target_duration_s
        self.init_uri = init_uri
        self.window = window
        self.segments: list[tuple[str, float]] = []  # (uri, duration in seconds)
        self.media_sequence = 0  # segments that left the window
        self.longest_s = target_duration_s  # of every segment ever listed
        self.ended = False

    @property
    def count(self) -> int:
        """Segments added, those that left the window included."""
        return self.media_sequence + len(self.segments)

    def add_segment(self, uri: str, duration_s: float) -> None:
        if self.ended:
            raise RuntimeError(f"cannot add segment {uri!r}: the playlist has ended")
        if not (math.isfinite(duration_s) and duration_s > 0):
            raise ValueError(f"segment {uri!r} duration_s={duration_s} must be positive")
        self.segments.append((_check_uri(uri), duration_s))
        self.longest_s = max(self.longest_s, duration_s)
        if self.window is not None and len(self.segments) > self.window:
            del self.segments[0]
            self.media_sequence += 1

    def end(self) -> None:
        self.ended = True

    @property
    def target_duration(self) -> int:
        # Round to the 6 decimals EXTINF shows first, so 3.0000000001 does not become 4.
        return max(1, math.ceil(round(self.longest_s, 6)))

    def render(self) -> str:
        kind = [] if self.window is not None else ["#EXT-X-PLAYLIST-TYPE:EVENT"]
        lines = [
            "#EXTM3U",
            "#EXT-X-VERSION:7",
            *kind,
            f"#EXT-X-TARGETDURATION:{self.target_duration}",
            f"#EXT-X-MEDIA-SEQUENCE:{self.media_sequence}",
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
    window: an endless session's live window (HlsPlaylist); a segment `2 * window` older than
    the newest is deleted from storage as the newest lands.
    """

    def __init__(
        self,
        storage: Storage,
        layout: Layout,
        session_id: str,
        fps: float,
        target_duration_s: float | None = None,
        window: int | None = None,
    ) -> None:
        if not (math.isfinite(fps) and fps > 0):
            raise ValueError(f"fps={fps} must be a positive number")
        self.storage, self.layout, self.fps = storage, layout, fps
        self.session_id = session_id
        self.playlist_key = layout.session_playlist_key(session_id)  # validates session_id
        self._target_duration_s = target_duration_s
        self.window = window
        self._playlist: HlsPlaylist | None = None
        self._init_written = False
        self._lock = threading.Lock()

    def resume(self, segment_frames: list[int], first_index: int = 1) -> None:
        """Take up a session whose init and segments are stored already, as a restore on
        another replica does: the frame counts of segments `first_index`, ... in order (an
        endless session's snapshot keeps its latest only)."""
        with self._lock:
            self._init_written = True
            if segment_frames:
                durations = [n / self.fps for n in segment_frames]
                playlist = self._new_playlist(durations[0])
                playlist.media_sequence = first_index - 1
                for index, duration in enumerate(durations, start=first_index):
                    playlist.add_segment(self.layout.segment_name(index), duration)
                self._playlist = playlist

    def _new_playlist(self, duration_s: float) -> HlsPlaylist:
        return HlsPlaylist(self._target_duration_s or duration_s, window=self.window)

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
            playlist = self._playlist or self._new_playlist(duration_s)
            expected = playlist.count + 1
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
            if self.window is not None and index > 2 * self.window:  # well out of the window
                old = self.layout.session_segment_key(self.session_id, index - 2 * self.window)
                self.storage.delete(old)
        return key

    @property
    def ended(self) -> bool:
        return self._playlist is not None and self._playlist.ended

    def end(self) -> str:
        """Mark the playlist ended (EXT-X-ENDLIST) and rewrite it; return its key."""
        with self._lock:
            if self._playlist is None:
                self._playlist = self._new_playlist(1.0)
            self._playlist.end()
            self._put_playlist()
        return self.playlist_key

    def _put_playlist(self) -> None:
        assert self._playlist is not None
        body = self._playlist.render().encode()
        self.storage.put(self.playlist_key, body, "application/vnd.apple.mpegurl")


class VideoParts:
    """A video job's fMP4 init and segments, stored as they are made (a decode pool that is
    lost loses nothing), joined into one stream at the end, then removed."""

    def __init__(self, storage: Storage, layout: Layout, video_id: str) -> None:
        self.storage, self.layout, self.video_id = storage, layout, video_id

    def write(self, index: int, data: bytes) -> str:
        """Part 0 is the init segment, part n the n-th media segment."""
        key = self.layout.video_part_key(self.video_id, index)
        self.storage.put(key, data, "video/mp4" if index == 0 else "video/iso.segment")
        return key

    def join(self, count: int) -> bytes:
        """The init segment and the first `count` media segments, in order."""
        return b"".join(
            self.storage.get(self.layout.video_part_key(self.video_id, i)) for i in range(count + 1)
        )

    def remove(self) -> None:
        self.storage.delete_prefix(self.layout.video_parts_prefix(self.video_id))
