"""Publishing a video: media first, manifest last, so a reader that sees a manifest can rely on
all of its media being present; deleting in the mirror order.

`VideoManifest` is the manifest the service publishes for a finished video job; `publish_video`
takes any JSON object as the manifest and adds the list of stored objects to it.
"""

from __future__ import annotations

import hashlib
import json
import time

from pydantic import BaseModel

from services.storage.base import ObjectNotFound, Storage
from services.storage.layout import Layout


class StoredObject(BaseModel):
    """One media object of a published video."""

    name: str  # e.g. "video.mp4"
    key: str  # its full object key
    size: int  # bytes
    sha256: str  # hex digest of its bytes
    content_type: str


class VideoManifest(BaseModel):
    """`manifest.json` of a finished video job (its record holds the job's lifecycle)."""

    id: str  # the video id
    model: str  # the model id the request named
    mode: str  # generation mode
    seed: int
    size: str  # "WIDTHxHEIGHT"
    fps: int
    created_at: int  # unix seconds the job was created
    num_frames: int  # frames in the MP4
    objects: list[StoredObject] = []  # filled in by publish_video

    def fields(self) -> dict:
        """What to hand to `publish_video`: everything but the objects it fills in."""
        return self.model_dump(mode="json", exclude={"objects"})


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
    """Leave the video's tombstone, delete its unfinished mark (if any) and its manifest, then
    the rest of its objects; return how many of its objects went (the marks not counted).

    The mirror of `publish_video`: a reader never sees a manifest whose media is gone. The
    tombstone, written first, is for a job writing the video's record at the same moment
    (storage has no compare-and-swap): it checks for one after each write (`is_deleted`) and
    deletes again, so a delete always wins. `sweep_tombstones` removes old ones.
    """
    stone = json.dumps({"deleted_at": time.time()}).encode()
    storage.put(layout.tombstone_key(video_id), stone, "application/json")
    storage.delete(layout.unfinished_key(video_id))
    manifest_key = layout.video_manifest_key(video_id)
    had_manifest = storage.exists(manifest_key)
    storage.delete(manifest_key)
    return int(had_manifest) + storage.delete_prefix(layout.video_prefix(video_id))


def is_deleted(storage: Storage, layout: Layout, video_id: str) -> bool:
    """Whether the video was deleted (its tombstone is there)."""
    return storage.exists(layout.tombstone_key(video_id))


def sweep_tombstones(storage: Storage, layout: Layout, older_than_s: float) -> int:
    """Remove the tenant's tombstones older than `older_than_s`; returns how many. A job still
    writing a record that long after its video's delete has long been stopped: each write
    checks that the record still exists first, and leases are renewed only while it does."""
    now, swept = time.time(), 0
    for key in storage.list(layout.tombstones_prefix()):
        try:
            deleted_at = float(json.loads(storage.get(key))["deleted_at"])
        except (ObjectNotFound, ValueError, KeyError, TypeError):
            deleted_at = 0.0  # unreadable: old enough
        if now - deleted_at > older_than_s:
            storage.delete(key)
            swept += 1
    return swept
