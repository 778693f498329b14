"""Publishing: object layout, manifests written last, HLS playlists that only reference stored
segments."""

from __future__ import annotations

import hashlib
import json

import pytest

from services.storage import (
    HlsPlaylist,
    Layout,
    SessionWriter,
    Storage,
    delete_video,
    is_deleted,
    publish_video,
    read_manifest,
    sweep_tombstones,
)
from tests.services.conftest import VIDEO


def test_layout_keys() -> None:
    layout = Layout("acme-1")
    assert Layout().tenant_prefix() == "tenants/default/"
    assert layout.video_key("vid_1") == "tenants/acme-1/videos/vid_1/video.mp4"
    assert layout.video_manifest_key("vid_1") == "tenants/acme-1/videos/vid_1/manifest.json"
    assert layout.video_record_key("vid_1") == "tenants/acme-1/videos/vid_1/record.json"
    assert layout.video_prefix("vid_1") == "tenants/acme-1/videos/vid_1/"
    assert (
        layout.video_object_key("vid_1", "poster.jpg") == "tenants/acme-1/videos/vid_1/poster.jpg"
    )
    assert layout.videos_prefix() == "tenants/acme-1/videos/"
    assert layout.sessions_prefix() == "tenants/acme-1/sessions/"
    assert layout.session_init_key("S-9") == "tenants/acme-1/sessions/S-9/init.mp4"
    assert layout.session_segment_key("S-9", 1) == "tenants/acme-1/sessions/S-9/seg-00001.m4s"
    assert layout.session_segment_key("S-9", 99999) == "tenants/acme-1/sessions/S-9/seg-99999.m4s"
    assert layout.session_playlist_key("S-9") == "tenants/acme-1/sessions/S-9/playlist.m3u8"
    assert layout.session_prefix("S-9") == "tenants/acme-1/sessions/S-9/"


@pytest.mark.parametrize("tenant", ["", "Acme", "a_b", "a/b", "..", "x" * 64])
def test_layout_rejects_bad_tenants(tenant: str) -> None:
    with pytest.raises(ValueError, match=f"tenant={tenant!r}"):
        Layout(tenant)


@pytest.mark.parametrize("bad_id", ["", "a/b", "..", "a b", "a.b", "x" * 129])
def test_layout_rejects_bad_ids(bad_id: str) -> None:
    with pytest.raises(ValueError, match=f"video_id={bad_id!r}"):
        Layout().video_key(bad_id)
    with pytest.raises(ValueError, match=f"session_id={bad_id!r}"):
        Layout().session_playlist_key(bad_id)


@pytest.mark.parametrize("index", [0, -1, 100000, True, 1.0])
def test_layout_rejects_bad_segment_indexes(index: int) -> None:
    with pytest.raises(ValueError, match=f"segment index {index!r}"):
        Layout().session_segment_key("s", index)


class RecordingStorage:
    """Forwards to `inner`, recording the keys of puts in order; fails puts of `fail_on`."""

    def __init__(self, inner: Storage, fail_on: str | None = None) -> None:
        self.inner, self.fail_on = inner, fail_on
        self.puts: list[str] = []

    def put(self, key: str, data: bytes, content_type: str | None = None) -> None:
        if self.fail_on is not None and key.endswith(self.fail_on):
            raise OSError(f"injected failure writing {key}")
        self.inner.put(key, data, content_type)
        self.puts.append(key)

    def __getattr__(self, name: str) -> object:
        return getattr(self.inner, name)


POSTER = b"\xff\xd8\xff" + bytes(100)


def test_publish_video_writes_media_and_a_checked_manifest(storage: Storage) -> None:
    layout = Layout("acme")
    media = {"video.mp4": (VIDEO, "video/mp4"), "poster.jpg": (POSTER, "image/jpeg")}
    manifest = publish_video(storage, layout, "v1", media, {"prompt_chars": 12, "frames": 81})

    assert manifest["frames"] == 81
    assert manifest["objects"] == [
        {"name": "video.mp4", "key": "tenants/acme/videos/v1/video.mp4", "size": len(VIDEO),
         "sha256": hashlib.sha256(VIDEO).hexdigest(), "content_type": "video/mp4"},
        {"name": "poster.jpg", "key": "tenants/acme/videos/v1/poster.jpg", "size": 103,
         "sha256": hashlib.sha256(POSTER).hexdigest(), "content_type": "image/jpeg"},
    ]  # fmt: skip
    for obj in manifest["objects"]:
        data = storage.get(obj["key"])
        assert (len(data), hashlib.sha256(data).hexdigest()) == (obj["size"], obj["sha256"])
    assert read_manifest(storage, layout, "v1") == manifest
    assert json.loads(storage.get(layout.video_manifest_key("v1"))) == manifest
    assert storage.list(layout.video_prefix("v1")) == [
        "tenants/acme/videos/v1/manifest.json",
        "tenants/acme/videos/v1/poster.jpg",
        "tenants/acme/videos/v1/video.mp4",
    ]
    assert read_manifest(storage, layout, "v2") is None
    assert read_manifest(storage, Layout("other"), "v1") is None  # tenants do not share objects


def test_publish_video_writes_the_manifest_last(storage: Storage) -> None:
    recorder = RecordingStorage(storage)
    layout = Layout()
    media = {"video.mp4": (VIDEO, "video/mp4"), "poster.jpg": (POSTER, "image/jpeg")}
    publish_video(recorder, layout, "v1", media, {})
    assert recorder.puts == [layout.video_key("v1"), layout.video_object_key("v1", "poster.jpg"),
                             layout.video_manifest_key("v1")]  # fmt: skip


def test_publish_video_failure_leaves_no_manifest(storage: Storage) -> None:
    layout = Layout()
    media = {"poster.jpg": (POSTER, "image/jpeg"), "video.mp4": (VIDEO, "video/mp4")}
    with pytest.raises(OSError, match="injected failure"):
        publish_video(RecordingStorage(storage, fail_on="video.mp4"), layout, "v1", media, {})
    assert not storage.exists(layout.video_manifest_key("v1"))
    assert read_manifest(storage, layout, "v1") is None

    # A failed re-publish must not leave the old manifest describing the new, partial media.
    publish_video(storage, layout, "v2", media, {"attempt": 1})
    new_media = {"poster.jpg": (b"new poster", "image/jpeg"), "video.mp4": (b"new", "video/mp4")}
    with pytest.raises(OSError, match="injected failure"):
        publish_video(RecordingStorage(storage, fail_on="video.mp4"), layout, "v2", new_media, {})
    assert read_manifest(storage, layout, "v2") is None


def test_delete_video_removes_the_manifest_first(storage: Storage) -> None:
    layout = Layout()
    media = {"audio.aac": (b"aac", "audio/aac"), "video.mp4": (VIDEO, "video/mp4")}
    publish_video(storage, layout, "v1", media, {})
    storage.put(layout.video_record_key("v1"), b"{}", "application/json")
    publish_video(storage, layout, "v2", media, {})
    deleted: list[str] = []

    class Recording(RecordingStorage):
        def delete(self, key: str) -> None:
            deleted.append(key)
            self.inner.delete(key)

    # 'audio.aac' sorts before 'manifest.json': a plain delete_prefix would drop media first.
    assert delete_video(Recording(storage), layout, "v1") == 4
    media_deleted = [key for key in deleted if key.startswith(layout.video_prefix("v1"))]
    assert media_deleted[0] == layout.video_manifest_key("v1")
    assert storage.list(layout.videos_prefix()) == storage.list(layout.video_prefix("v2"))
    assert delete_video(storage, layout, "v1") == 0


def test_a_deleted_video_leaves_a_tombstone_the_sweep_removes_once_old(storage: Storage) -> None:
    """The tombstone lets a job writing the record as the delete lands find the delete (see
    services.jobs.records.RecordStore.put_unless_deleted); it lies outside the video's prefix,
    so listings never see it, and goes once older than the sweep's age."""
    layout = Layout("acme-1")
    publish_video(storage, layout, "v1", {"video.mp4": (VIDEO, "video/mp4")}, {})
    assert not is_deleted(storage, layout, "v1")
    assert delete_video(storage, layout, "v1") == 2  # the video and its manifest
    assert is_deleted(storage, layout, "v1") and not is_deleted(storage, Layout(), "v1")
    assert storage.list(layout.tenant_prefix()) == ["tenants/acme-1/deleted/v1"]
    storage.put(layout.tombstone_key("v2"), b"not json", "application/json")
    assert sweep_tombstones(storage, layout, older_than_s=3600) == 1  # only the unreadable one
    assert is_deleted(storage, layout, "v1") and not is_deleted(storage, layout, "v2")
    assert sweep_tombstones(storage, layout, older_than_s=-1) == 1
    assert storage.list(layout.tenant_prefix()) == []


def test_publish_video_checks_inputs_before_writing(storage: Storage) -> None:
    layout = Layout()
    with pytest.raises(ValueError, match=r"'manifest\.json' is reserved"):
        publish_video(storage, layout, "v1", {"manifest.json": (b"{}", "application/json")}, {})
    with pytest.raises(ValueError, match="at least one media object"):
        publish_video(storage, layout, "v1", {}, {})
    with pytest.raises(TypeError):  # not JSON: fails before any media is written
        publish_video(storage, layout, "v1", {"video.mp4": (VIDEO, "video/mp4")}, {"x": object()})
    assert storage.list() == []


def test_hls_playlist_renders_an_event_playlist() -> None:
    playlist = HlsPlaylist(target_duration_s=1.0)
    assert "#EXT-X-MAP" not in playlist.render()  # nothing to fetch before the first segment
    playlist.add_segment("seg-00001.m4s", 1.0)
    playlist.add_segment("seg-00002.m4s", 1.3125)
    playlist.end()
    assert playlist.render() == (
        "#EXTM3U\n"
        "#EXT-X-VERSION:7\n"
        "#EXT-X-PLAYLIST-TYPE:EVENT\n"
        "#EXT-X-TARGETDURATION:2\n"
        "#EXT-X-MEDIA-SEQUENCE:0\n"
        "#EXT-X-INDEPENDENT-SEGMENTS\n"
        '#EXT-X-MAP:URI="init.mp4"\n'
        "#EXTINF:1.000000,\n"
        "seg-00001.m4s\n"
        "#EXTINF:1.312500,\n"
        "seg-00002.m4s\n"
        "#EXT-X-ENDLIST\n"
    )
    with pytest.raises(RuntimeError, match="has ended"):
        playlist.add_segment("seg-00003.m4s", 1.0)


def test_hls_target_duration_is_the_ceiling_of_the_longest_segment() -> None:
    playlist = HlsPlaylist(target_duration_s=2.0)
    playlist.add_segment("a", 0.1 * 3 * 10)  # 3.0000000000000004: float noise, not 4 seconds
    assert playlist.target_duration == 3
    playlist.add_segment("b", 3.2)
    assert playlist.target_duration == 4
    with pytest.raises(ValueError, match="duration_s=0"):
        playlist.add_segment("c", 0)
    with pytest.raises(ValueError, match="target_duration_s=-1"):
        HlsPlaylist(-1)


def parse_playlist(text: str) -> tuple[dict[str, str], list[tuple[float, str]], bool]:
    """(header tags, [(EXTINF seconds, uri)], ended) of a media playlist, checking its shape."""
    lines = text.splitlines()
    assert lines[0] == "#EXTM3U" and text.endswith("\n")
    tags: dict[str, str] = {}
    segments: list[tuple[float, str]] = []
    ended = False
    i = 1
    while i < len(lines):
        line = lines[i]
        assert not ended, f"line after EXT-X-ENDLIST: {line!r}"
        if line.startswith("#EXTINF:"):
            assert line.endswith(",")
            segments.append((float(line[len("#EXTINF:") : -1]), lines[i + 1]))
            assert not lines[i + 1].startswith("#")
            i += 1
        elif line == "#EXT-X-ENDLIST":
            ended = True
        else:
            name, _, value = line.partition(":")
            assert name.startswith("#EXT") and not segments, f"tag after a segment: {line!r}"
            tags[name] = value
        i += 1
    return tags, segments, ended


def test_session_writer_playlist_only_references_stored_segments(storage: Storage) -> None:
    layout = Layout("acme")
    fps = 16
    writer = SessionWriter(storage, layout, "sess-1", fps=fps)
    prefix = layout.session_prefix("sess-1")
    assert writer.write_init(b"init bytes") == prefix + "init.mp4"
    frames = [21, 21, 9]

    for index, num_frames in enumerate(frames, start=1):
        key = writer.write_segment(index, bytes([index]) * 10, num_frames)
        assert key == f"{prefix}seg-{index:05d}.m4s"
        tags, segments, ended = parse_playlist(storage.get(writer.playlist_key).decode())
        assert tags["#EXT-X-VERSION"] == "7"
        assert tags["#EXT-X-PLAYLIST-TYPE"] == "EVENT"
        assert tags["#EXT-X-MEDIA-SEQUENCE"] == "0"
        assert tags["#EXT-X-TARGETDURATION"] == "2"  # ceil(21 / 16)
        assert "#EXT-X-INDEPENDENT-SEGMENTS" in tags
        assert tags["#EXT-X-MAP"] == 'URI="init.mp4"'
        assert storage.exists(prefix + "init.mp4")
        assert [d for d, _ in segments] == [n / fps for n in frames[:index]]
        assert [u for _, u in segments] == [f"seg-{i:05d}.m4s" for i in range(1, index + 1)]
        assert all(storage.exists(prefix + uri) for _, uri in segments)
        assert not ended

    assert writer.end() == writer.playlist_key
    _, segments, ended = parse_playlist(storage.get(writer.playlist_key).decode())
    assert ended and len(segments) == 3
    assert storage.get(prefix + "seg-00002.m4s") == bytes([2]) * 10
    names = ["init.mp4", "playlist.m3u8", "seg-00001.m4s", "seg-00002.m4s", "seg-00003.m4s"]
    assert storage.list(prefix) == [prefix + name for name in names]
    with pytest.raises(RuntimeError, match="has ended"):
        writer.write_segment(4, b"late", 21)


def test_session_writer_writes_each_segment_before_its_playlist(storage: Storage) -> None:
    recorder = RecordingStorage(storage)
    writer = SessionWriter(recorder, Layout(), "s", fps=8)
    writer.write_init(b"i")
    writer.write_segment(1, b"a", 8)
    writer.write_segment(2, b"b", 8)
    writer.end()
    names = [key.rsplit("/", 1)[1] for key in recorder.puts]
    assert names == ["init.mp4", "seg-00001.m4s", "playlist.m3u8", "seg-00002.m4s",
                     "playlist.m3u8", "playlist.m3u8"]  # fmt: skip


def test_session_writer_rejects_misuse(storage: Storage) -> None:
    writer = SessionWriter(storage, Layout(), "s", fps=16)
    with pytest.raises(RuntimeError, match="write_init before segment 1"):
        writer.write_segment(1, b"a", 16)
    writer.write_init(b"i")
    with pytest.raises(ValueError, match="segment index 2 out of order; expected 1"):
        writer.write_segment(2, b"a", 16)
    with pytest.raises(ValueError, match="num_frames=0"):
        writer.write_segment(1, b"a", 0)
    with pytest.raises(ValueError, match="fps=0"):
        SessionWriter(storage, Layout(), "s", fps=0)
    assert storage.list() == [Layout().session_init_key("s")]  # nothing half-written


def test_session_ended_before_any_segment_has_an_empty_ended_playlist(storage: Storage) -> None:
    writer = SessionWriter(storage, Layout(), "s", fps=16)
    writer.end()
    tags, segments, ended = parse_playlist(storage.get(writer.playlist_key).decode())
    assert ended and segments == [] and "#EXT-X-MAP" not in tags


def test_an_endless_sessions_playlist_is_a_live_window_and_old_segments_go(
    storage: Storage,
) -> None:
    layout = Layout("acme")
    writer = SessionWriter(storage, layout, "sess-e", fps=16, window=3)
    prefix = layout.session_prefix("sess-e")
    writer.write_init(b"init")
    for index in range(1, 9):
        writer.write_segment(index, bytes([index]), 12)
    tags, segments, ended = parse_playlist(storage.get(writer.playlist_key).decode())
    assert "#EXT-X-PLAYLIST-TYPE" not in tags and not ended  # live, not EVENT
    assert tags["#EXT-X-MEDIA-SEQUENCE"] == "5"  # segments 1..5 left the window
    assert [u for _, u in segments] == ["seg-00006.m4s", "seg-00007.m4s", "seg-00008.m4s"]
    # kept for twice the window (a resume re-sends from storage), then deleted
    stored = [k.removeprefix(prefix) for k in storage.list(prefix) if k.endswith(".m4s")]
    assert stored == [f"seg-{i:05d}.m4s" for i in range(3, 9)]
    # taken up elsewhere from the kept segments' frame counts, it goes on numbering
    again = SessionWriter(storage, layout, "sess-e", fps=16, window=3)
    again.resume([12, 12, 12], first_index=6)
    again.write_segment(9, b"9", 12)
    tags, segments, _ = parse_playlist(storage.get(writer.playlist_key).decode())
    assert tags["#EXT-X-MEDIA-SEQUENCE"] == "6"
    assert [u for _, u in segments][-1] == "seg-00009.m4s"
    assert not storage.exists(prefix + "seg-00003.m4s")
