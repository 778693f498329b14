"""Object storage: backends (an S3 endpoint or a local directory), where each object goes, and
the order it is written in.

- `base.py`      the `Storage` interface and key rules; `local.py`, `s3.py` implement it;
- `settings.py`  `StorageSettings` / `open_storage`: the backend from `HISTREAM_STORAGE_*`;
- `layout.py`    `Layout`: every key of one tenant;
- `publish.py`   a video's media, then its manifest; `hls.py`: a session's segments + playlist.

Every storage call is synchronous and thread-safe; async callers wrap them in `asyncio.to_thread`.
"""

from services.storage.base import (
    MAX_KEY_BYTES,
    PRESIGN_EXPIRY_RANGE_S,
    ObjectNotFound,
    Storage,
    check_key,
    check_prefix,
)
from services.storage.hls import HlsPlaylist, SessionWriter, VideoParts
from services.storage.layout import Layout
from services.storage.local import LocalStorage
from services.storage.publish import (
    StoredObject,
    VideoManifest,
    delete_video,
    is_deleted,
    publish_video,
    read_manifest,
    sweep_tombstones,
)
from services.storage.s3 import S3Storage
from services.storage.settings import StorageSettings, open_storage

__all__ = [
    "MAX_KEY_BYTES",
    "PRESIGN_EXPIRY_RANGE_S",
    "HlsPlaylist",
    "Layout",
    "LocalStorage",
    "ObjectNotFound",
    "S3Storage",
    "SessionWriter",
    "Storage",
    "StorageSettings",
    "StoredObject",
    "VideoManifest",
    "VideoParts",
    "check_key",
    "check_prefix",
    "delete_video",
    "is_deleted",
    "open_storage",
    "publish_video",
    "read_manifest",
    "sweep_tombstones",
]
