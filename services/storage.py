"""Object storage for videos and sessions: an S3 endpoint (via `minio`) or a local directory.

- `Storage` is the interface; `LocalStorage` (the embedded default) and `S3Storage` implement it.
  Every call is synchronous and thread-safe; async callers wrap them in `asyncio.to_thread`.
- `StorageSettings` / `open_storage` pick the backend from `HISTREAM_STORAGE_*` variables.
- What is stored where, and in which order, is `services.publish`'s concern.

Keys are '/'-separated relative paths; `check_key` rejects anything that could escape the local
root or alias another key (absolute paths, '.', '..', empty segments, backslashes).
"""

from __future__ import annotations

import io
import os
import re
import uuid
from datetime import timedelta
from pathlib import Path
from typing import Protocol, runtime_checkable
from urllib.parse import urlsplit

from minio import Minio
from minio.deleteobjects import DeleteObject
from minio.error import S3Error
from pydantic import SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

# S3 SigV4 presigned URLs live at most 7 days.
PRESIGN_EXPIRY_RANGE_S = (1, 604800)
# S3's limit on a key's UTF-8 length.
MAX_KEY_BYTES = 1024
# LocalStorage writes each object to a temp file beside it first; list() hides these names and
# check_key reserves them, so a half-written object is never visible under its key.
_TMP_PREFIX = ".histream-tmp-"
# A concurrent delete may prune a directory between our mkdir and our open; try again this often.
_PUT_ATTEMPTS = 5
_BUCKET_RE = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")


class ObjectNotFound(KeyError):
    """No object under `key`. A KeyError, so `except KeyError` callers keep working."""

    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key

    def __str__(self) -> str:
        return f"no object at key {self.key!r}"


def check_key(key: str) -> str:
    """Return `key` if it is a safe relative object key, else raise ValueError naming it."""
    if not isinstance(key, str) or not key:
        raise ValueError(f"object key {key!r} must be a non-empty string")
    if key.startswith("/"):
        raise ValueError(f"object key {key!r} must be relative, not start with '/'")
    if "\\" in key:
        raise ValueError(f"object key {key!r} must not contain a backslash; use '/'")
    if any(ord(c) < 0x20 or c == "\x7f" for c in key):
        raise ValueError(f"object key {key!r} must not contain control characters")
    if len(key.encode()) > MAX_KEY_BYTES:
        raise ValueError(f"object key {key[:64]!r}... is longer than {MAX_KEY_BYTES} bytes")
    for segment in key.split("/"):
        if segment in ("", ".", ".."):
            raise ValueError(
                f"object key {key!r} has an empty, '.' or '..' segment; keys are plain "
                "'/'-separated names under the storage root"
            )
        if segment.startswith(_TMP_PREFIX):
            raise ValueError(f"object key {key!r} uses the reserved prefix {_TMP_PREFIX!r}")
    return key


def check_prefix(prefix: str) -> str:
    """A prefix is '' (everything), a key, or a key followed by '/' (a "directory")."""
    if prefix:
        check_key(prefix.removesuffix("/"))
    return prefix


def _check_expiry(expires_s: int) -> int:
    lo, hi = PRESIGN_EXPIRY_RANGE_S
    if not lo <= expires_s <= hi:
        raise ValueError(f"presigned URL expiry {expires_s}s must be in [{lo}, {hi}] seconds")
    return expires_s


@runtime_checkable
class Storage(Protocol):
    """A flat map from keys to bytes. All methods are synchronous and thread-safe."""

    def put(self, key: str, data: bytes, content_type: str | None = None) -> None:
        """Store `data` under `key`; readers see the old object or the new one, never a part."""
        ...

    def get(self, key: str) -> bytes:
        """The object's bytes; raises ObjectNotFound when absent."""
        ...

    def exists(self, key: str) -> bool: ...

    def size(self, key: str) -> int:
        """The object's size in bytes; raises ObjectNotFound when absent."""
        ...

    def list(self, prefix: str = "") -> list[str]:
        """Every key starting with `prefix` (at any depth), sorted."""
        ...

    def delete(self, key: str) -> None:
        """Remove the object; deleting an absent key is not an error."""
        ...

    def delete_prefix(self, prefix: str) -> int:
        """Remove every key starting with `prefix` (which must not be empty); return the count."""
        ...

    def presigned_url(self, key: str, expires_s: int) -> str | None:
        """A URL that GETs the object without credentials, or None: the caller serves the bytes."""
        ...

    def describe(self) -> str:
        """Where objects go, for logs; never contains secrets."""
        ...


def _check_delete_prefix(prefix: str) -> str:
    if not prefix:
        raise ValueError("delete_prefix('') would delete every object; pass a non-empty prefix")
    return check_prefix(prefix)


class LocalStorage:
    """Objects as files under `root` (key 'a/b.mp4' -> root/a/b.mp4); content types are not kept.

    A key cannot be both an object and a "directory" of others ('a' and 'a/b'), unlike in S3;
    `Layout` never asks for that.
    """

    def __init__(self, root: str | Path) -> None:
        self._root = Path(root).resolve()
        self._root.mkdir(parents=True, exist_ok=True)

    @property
    def root(self) -> Path:
        return self._root

    def _path(self, key: str) -> Path:
        return self._root.joinpath(*check_key(key).split("/"))

    def put(self, key: str, data: bytes, content_type: str | None = None) -> None:
        path = self._path(key)
        for attempt in range(_PUT_ATTEMPTS):
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
            except (FileExistsError, NotADirectoryError) as exc:
                if self._below_a_file(path.parent):
                    raise ValueError(f"object key {key!r} is below an existing object") from exc
                continue  # a concurrent delete pruned a directory mid-way (another process, too)
            tmp = path.parent / f"{_TMP_PREFIX}{uuid.uuid4().hex}"
            try:
                with open(tmp, "xb") as f:
                    f.write(data)
                    # Durable before visible: after a crash the key holds old or new bytes.
                    f.flush()
                    os.fsync(f.fileno())
            except FileNotFoundError:
                if attempt == _PUT_ATTEMPTS - 1:
                    raise
                continue
            except BaseException:
                tmp.unlink(missing_ok=True)
                raise
            try:
                os.replace(tmp, path)
            except BaseException as exc:
                tmp.unlink(missing_ok=True)
                if isinstance(exc, IsADirectoryError):
                    raise ValueError(f"object key {key!r} is a prefix of other objects") from exc
                raise
            return
        raise OSError(
            f"could not store {key!r}: its directory kept vanishing ({_PUT_ATTEMPTS} tries)"
        )

    def _below_a_file(self, directory: Path) -> bool:
        while directory != self._root:
            if directory.is_file():
                return True
            directory = directory.parent
        return False

    def get(self, key: str) -> bytes:
        try:
            return self._path(key).read_bytes()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise ObjectNotFound(key) from None

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def size(self, key: str) -> int:
        path = self._path(key)
        if not path.is_file():
            raise ObjectNotFound(key)
        return path.stat().st_size

    def list(self, prefix: str = "") -> list[str]:
        check_prefix(prefix)
        # Walk only the deepest directory the prefix names; filter the rest by string prefix,
        # as S3 does ('videos/a' matches 'videos/ab/x').
        base = self._root.joinpath(*prefix.split("/")[:-1])
        keys = []
        for dirpath, _, files in os.walk(base):
            rel = Path(dirpath).relative_to(self._root).as_posix()
            for name in files:
                key = name if rel == "." else f"{rel}/{name}"
                if not name.startswith(_TMP_PREFIX) and key.startswith(prefix):
                    keys.append(key)
        return sorted(keys)

    def delete(self, key: str) -> None:
        path = self._path(key)
        try:
            path.unlink()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            return
        self._prune(path.parent)

    def delete_prefix(self, prefix: str) -> int:
        keys = self.list(_check_delete_prefix(prefix))
        for key in keys:
            self.delete(key)
        return len(keys)

    def _prune(self, directory: Path) -> None:
        """Remove now-empty directories up to the root, so deleted "directories" vanish."""
        while directory != self._root:
            try:
                directory.rmdir()
            except OSError:  # not empty, or a concurrent delete got there first
                return
            directory = directory.parent

    def presigned_url(self, key: str, expires_s: int) -> str | None:
        check_key(key)
        _check_expiry(expires_s)
        return None

    def describe(self) -> str:
        return f"local directory {self._root}"


class S3Storage:
    """Objects in one bucket of an S3-compatible endpoint (MinIO, AWS S3, ...).

    endpoint: 'host:port' the service reaches S3 at (no scheme; `secure` picks https).
    public_url: 'scheme://host[:port]' clients reach S3 at, when it differs from `endpoint`
      (e.g. an in-cluster 'minio:9000' behind an ingress); presigned URLs are signed for that
      host, because SigV4 signs the Host header.
    region: the bucket's region; None asks the endpoint once per bucket (GetBucketLocation).
    """

    def __init__(
        self,
        endpoint: str,
        bucket: str,
        access_key: str,
        secret_key: str,
        secure: bool = False,
        region: str | None = None,
        create_bucket: bool = True,
        public_url: str | None = None,
    ) -> None:
        if "://" in endpoint or "/" in endpoint:
            raise ValueError(
                f"S3 endpoint {endpoint!r} must be 'host:port' without scheme or path; "
                "use secure=True for https"
            )
        self._endpoint, self._bucket, self._secure = endpoint, bucket, secure
        self._region, self._public_url = region, public_url
        # One client per process: Minio is thread-safe but must not be shared across processes.
        self._client = Minio(endpoint, access_key, secret_key, secure=secure, region=region)
        self._presigner = self._client
        if public_url is not None:
            parts = urlsplit(public_url)
            if (
                parts.scheme not in ("http", "https")
                or not parts.netloc
                or parts.path not in ("", "/")
            ):
                raise ValueError(
                    f"S3 public_url {public_url!r} must look like 'https://host[:port]'"
                )
            # Presigning is offline given a region; MinIO's default region is us-east-1.
            self._presigner = Minio(
                parts.netloc, access_key, secret_key, secure=parts.scheme == "https",
                region=region or "us-east-1",
            )  # fmt: skip
        if create_bucket:
            self._ensure_bucket()

    def _ensure_bucket(self) -> None:
        if self._client.bucket_exists(self._bucket):
            return
        try:
            self._client.make_bucket(self._bucket, location=self._region)
        except S3Error as exc:
            if exc.code != "BucketAlreadyOwnedByYou":  # another replica won the race
                raise

    def put(self, key: str, data: bytes, content_type: str | None = None) -> None:
        # Below minio's 5 MiB part size this is one PUT, atomic for readers; above it a
        # multipart upload, which S3 also makes visible only on completion.
        self._client.put_object(
            self._bucket, check_key(key), io.BytesIO(data), len(data),
            content_type=content_type or "application/octet-stream",
        )  # fmt: skip

    def get(self, key: str) -> bytes:
        try:
            response = self._client.get_object(self._bucket, check_key(key))
        except S3Error as exc:
            if exc.code == "NoSuchKey":
                raise ObjectNotFound(key) from None
            raise
        try:
            return response.read()
        finally:
            response.close()
            response.release_conn()

    def _stat_size(self, key: str) -> int | None:
        try:
            size = self._client.stat_object(self._bucket, check_key(key)).size
        except S3Error as exc:
            if exc.code == "NoSuchKey":
                return None
            raise
        return int(size or 0)

    def exists(self, key: str) -> bool:
        return self._stat_size(key) is not None

    def size(self, key: str) -> int:
        size = self._stat_size(key)
        if size is None:
            raise ObjectNotFound(key)
        return size

    def list(self, prefix: str = "") -> list[str]:
        objects = self._client.list_objects(
            self._bucket, prefix=check_prefix(prefix) or None, recursive=True
        )
        return sorted(o.object_name for o in objects if o.object_name is not None)

    def delete(self, key: str) -> None:
        self._client.remove_object(self._bucket, check_key(key))

    def delete_prefix(self, prefix: str) -> int:
        keys = self.list(_check_delete_prefix(prefix))
        # remove_objects is lazy: the deletes happen while its error iterator is consumed.
        errors = list(self._client.remove_objects(self._bucket, (DeleteObject(k) for k in keys)))
        if errors:
            failed = ", ".join(f"{e.name!r} ({e.code})" for e in errors[:5])
            raise OSError(f"could not delete {len(errors)} objects under {prefix!r}: {failed}")
        return len(keys)

    def presigned_url(self, key: str, expires_s: int) -> str | None:
        expires = timedelta(seconds=_check_expiry(expires_s))
        return self._presigner.presigned_get_object(self._bucket, check_key(key), expires=expires)

    def describe(self) -> str:
        scheme = "https" if self._secure else "http"
        where = f"s3 bucket {self._bucket!r} at {scheme}://{self._endpoint}"
        if self._region:
            where += f" (region {self._region})"
        if self._public_url:
            where += f", presigned for {self._public_url}"
        return where


class StorageSettings(BaseSettings):
    """Where objects go, from `HISTREAM_STORAGE_*` variables. `endpoint` set -> S3, else local."""

    model_config = SettingsConfigDict(env_prefix="HISTREAM_STORAGE_")

    local_dir: str | None = "outputs/storage"  # the embedded default's root directory
    endpoint: str | None = None  # 'host:port' of an S3 endpoint; when set, S3 is used
    bucket: str = "histream"
    access_key: SecretStr | None = None
    secret_key: SecretStr | None = None
    secure: bool = False  # https to the endpoint
    region: str | None = None  # None: asked of the endpoint once per bucket
    public_url: str | None = None  # 'https://host[:port]' clients reach S3 at, for presigned URLs
    presign_expiry_s: int = 3600  # lifetime of the presigned URLs the gateway hands out

    @field_validator("presign_expiry_s")
    @classmethod
    def _expiry_in_range(cls, value: int) -> int:
        lo, hi = PRESIGN_EXPIRY_RANGE_S
        if not lo <= value <= hi:
            raise ValueError(f"presign_expiry_s={value} must be in [{lo}, {hi}] seconds (7 days)")
        return value

    @field_validator("bucket")
    @classmethod
    def _bucket_name(cls, value: str) -> str:
        if not _BUCKET_RE.fullmatch(value):
            raise ValueError(f"bucket={value!r} must be 3-63 characters of [a-z0-9.-]")
        return value

    @field_validator("endpoint")
    @classmethod
    def _endpoint_form(cls, value: str | None) -> str | None:
        if value is not None and ("://" in value or "/" in value):
            raise ValueError(f"endpoint={value!r} must be 'host:port' (set secure=true for https)")
        return value or None


def open_storage(settings: StorageSettings | None = None) -> Storage:
    """The storage `settings` (default: read from the environment) describe."""
    settings = settings or StorageSettings()
    if settings.endpoint:
        missing = [
            f"HISTREAM_STORAGE_{name.upper()}"
            for name in ("access_key", "secret_key")
            if not getattr(settings, name) or not getattr(settings, name).get_secret_value()
        ]
        if missing:
            raise ValueError(
                f"S3 storage at endpoint={settings.endpoint!r} needs credentials; "
                f"{' and '.join(missing)} not set"
            )
        assert settings.access_key is not None and settings.secret_key is not None
        return S3Storage(
            settings.endpoint, settings.bucket,
            settings.access_key.get_secret_value(), settings.secret_key.get_secret_value(),
            secure=settings.secure, region=settings.region, public_url=settings.public_url,
        )  # fmt: skip
    if not settings.local_dir:
        raise ValueError("no storage configured: set HISTREAM_STORAGE_LOCAL_DIR or _ENDPOINT")
    return LocalStorage(settings.local_dir)
