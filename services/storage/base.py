"""The storage interface: a flat map from keys to bytes, and the rules every key follows.

Keys are '/'-separated relative paths; `check_key` rejects anything that could escape the local
root or alias another key (absolute paths, '.', '..', empty segments, backslashes).
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

# S3 SigV4 presigned URLs live at most 7 days.
PRESIGN_EXPIRY_RANGE_S = (1, 604800)
# S3's limit on a key's UTF-8 length.
MAX_KEY_BYTES = 1024
# LocalStorage writes each object to a temp file beside it first; list() hides these names and
# check_key reserves them, so a half-written object is never visible under its key.
TMP_PREFIX = ".histream-tmp-"


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
        if segment.startswith(TMP_PREFIX):
            raise ValueError(f"object key {key!r} uses the reserved prefix {TMP_PREFIX!r}")
    return key


def check_prefix(prefix: str) -> str:
    """A prefix is '' (everything), a key, or a key followed by '/' (a "directory")."""
    if prefix:
        check_key(prefix.removesuffix("/"))
    return prefix


def check_expiry(expires_s: int) -> int:
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


def check_delete_prefix(prefix: str) -> str:
    if not prefix:
        raise ValueError("delete_prefix('') would delete every object; pass a non-empty prefix")
    return check_prefix(prefix)
