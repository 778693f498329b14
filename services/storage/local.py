"""Objects as files under a local directory: the embedded default."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

from services.storage.base import (
    TMP_PREFIX,
    ObjectNotFound,
    check_delete_prefix,
    check_expiry,
    check_key,
    check_prefix,
)

# A concurrent delete may prune a directory between our mkdir and our open; try again this often.
_PUT_ATTEMPTS = 5


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
            tmp = path.parent / f"{TMP_PREFIX}{uuid.uuid4().hex}"
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
                if not name.startswith(TMP_PREFIX) and key.startswith(prefix):
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
        keys = self.list(check_delete_prefix(prefix))
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
        check_expiry(expires_s)
        return None

    def describe(self) -> str:
        return f"local directory {self._root}"
