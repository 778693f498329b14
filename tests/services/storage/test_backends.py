"""Storage: both backends (a local directory and a real S3 HTTP endpoint served by moto) behave
the same."""

from __future__ import annotations

import contextlib
import threading
import time
import urllib.request
from pathlib import Path

import pytest
from pydantic import ValidationError

from services.storage import (
    LocalStorage,
    ObjectNotFound,
    S3Storage,
    Storage,
    StorageSettings,
    open_storage,
)
from tests.services.conftest import ACCESS_KEY, BINARY, SECRET_KEY, VIDEO, make_s3


def test_backends_implement_the_protocol(storage: Storage) -> None:
    assert isinstance(storage, Storage)
    assert storage.describe()


def test_put_get_exists_size_round_trip(storage: Storage) -> None:
    assert not storage.exists("a/b/c.bin")
    storage.put("a/b/c.bin", BINARY, "application/octet-stream")
    assert storage.exists("a/b/c.bin")
    assert storage.get("a/b/c.bin") == BINARY
    assert storage.size("a/b/c.bin") == 768
    assert not storage.exists("a/b")  # a "directory" is not an object

    storage.put("a/b/c.bin", b"shorter")  # overwrite replaces the whole object
    assert storage.get("a/b/c.bin") == b"shorter"
    assert storage.size("a/b/c.bin") == 7

    storage.put("empty", b"")
    assert storage.get("empty") == b""
    assert storage.size("empty") == 0

    storage.delete("a/b/c.bin")
    assert not storage.exists("a/b/c.bin")
    storage.delete("a/b/c.bin")  # deleting an absent key is not an error
    assert storage.list() == ["empty"]


def test_list_and_delete_prefix(storage: Storage) -> None:
    keys = ["v/2/a", "v/1/b/c", "v/10/a", "w", "v/1/a"]
    for i, key in enumerate(keys):
        storage.put(key, bytes([i]))

    assert storage.list() == ["v/1/a", "v/1/b/c", "v/10/a", "v/2/a", "w"]
    assert storage.list("v/1/") == ["v/1/a", "v/1/b/c"]
    assert storage.list("v/1") == ["v/1/a", "v/1/b/c", "v/10/a"]  # a string prefix, as in S3
    assert storage.list("v/1/b") == ["v/1/b/c"]
    assert storage.list("nothing/") == []

    assert storage.delete_prefix("v/1/") == 2
    assert storage.list() == ["v/10/a", "v/2/a", "w"]
    assert storage.get("v/10/a") == bytes([2])
    assert storage.delete_prefix("nothing/") == 0
    with pytest.raises(ValueError, match="every object"):
        storage.delete_prefix("")
    assert storage.list() == ["v/10/a", "v/2/a", "w"]


def test_missing_object_raises_object_not_found(storage: Storage) -> None:
    with pytest.raises(ObjectNotFound) as info:
        storage.get("missing/x.mp4")
    assert isinstance(info.value, KeyError)
    assert info.value.key == "missing/x.mp4"
    assert str(info.value) == "no object at key 'missing/x.mp4'"
    with pytest.raises(ObjectNotFound, match=r"missing/x\.mp4"):
        storage.size("missing/x.mp4")


BAD_KEYS = ["/etc/passwd", "../escape", "a/../../escape", "a\\..\\b", "", "a//b", "a/", "./a"]


@pytest.mark.parametrize("key", BAD_KEYS)
def test_bad_keys_are_rejected_with_the_key_named(
    storage: Storage, key: str, tmp_path: Path
) -> None:
    named = repr(key)
    for call in (
        lambda: storage.put(key, b"x"),
        lambda: storage.get(key),
        lambda: storage.exists(key),
        lambda: storage.size(key),
        lambda: storage.delete(key),
        lambda: storage.presigned_url(key, 60),
    ):
        with pytest.raises(ValueError) as info:
            call()
        assert named in str(info.value)
    assert storage.list() == []
    assert not (tmp_path / "escape").exists()


def test_local_delete_prunes_empty_directories(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path)
    storage.put("v/1/a", b"a")
    storage.put("v/1/b/c", b"c")
    storage.put("v/2/a", b"a")
    assert storage.delete_prefix("v/1/") == 2
    assert not (tmp_path / "v" / "1").exists()
    assert (tmp_path / "v" / "2" / "a").read_bytes() == b"a"
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["2", "a", "v"]  # no temp files left


def test_local_key_conflicting_with_a_directory_is_a_clear_error(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path)
    storage.put("a/b", b"x")
    with pytest.raises(ValueError, match="'a/b/c' is below an existing object"):
        storage.put("a/b/c", b"y")
    with pytest.raises(ValueError, match="'a' is a prefix of other objects"):
        storage.put("a", b"y")
    assert storage.list() == ["a/b"]


def test_concurrent_overwrites_are_atomic_for_readers(storage: Storage) -> None:
    payloads = [bytes([i]) * 50_000 for i in range(4)]
    storage.put("hot", payloads[0])
    start = threading.Barrier(len(payloads) + 1)
    seen: list[bytes] = []

    def writer(data: bytes) -> None:
        start.wait()
        for _ in range(5):
            storage.put("hot", data)

    threads = [threading.Thread(target=writer, args=(p,)) for p in payloads]
    for t in threads:
        t.start()
    start.wait()
    while any(t.is_alive() for t in threads):
        seen.append(storage.get("hot"))
    for t in threads:
        t.join()
    assert seen and all(s in payloads for s in seen)  # never a mix or a truncated object
    assert storage.list() == ["hot"]


def test_local_concurrent_puts_and_deletes_in_one_directory(tmp_path: Path) -> None:
    # Deletes prune the directory whenever it empties; puts into it must still land.
    storage = LocalStorage(tmp_path)
    start = threading.Barrier(4)

    def churn(worker: int) -> None:
        start.wait()
        for i in range(100):
            key = f"d/w{worker}-{i}"
            storage.put(key, b"x")
            storage.delete(key)
        storage.put(f"d/w{worker}-final", b"done")

    threads = [threading.Thread(target=churn, args=(w,)) for w in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert storage.list("d/") == [f"d/w{w}-final" for w in range(4)]


def test_presigned_url_downloads_the_object(s3_endpoint: str) -> None:
    storage = make_s3(s3_endpoint)
    storage.put("tenants/default/videos/v1/video.mp4", VIDEO, "video/mp4")
    url = storage.presigned_url("tenants/default/videos/v1/video.mp4", 300)
    assert url is not None and url.startswith(f"http://{s3_endpoint}/")
    assert "X-Amz-Expires=300" in url and "X-Amz-Signature=" in url
    with urllib.request.urlopen(url, timeout=10) as response:
        assert response.read() == VIDEO
        assert response.headers["Content-Type"] == "video/mp4"


def test_presigned_url_uses_the_public_url(s3_endpoint: str) -> None:
    port = s3_endpoint.rsplit(":", 1)[1]
    storage = make_s3(s3_endpoint, public_url=f"http://localhost:{port}")
    storage.put("k", b"public bytes")
    url = storage.presigned_url("k", 60)
    assert url is not None and url.startswith(f"http://localhost:{port}/")
    with urllib.request.urlopen(url, timeout=10) as response:
        assert response.read() == b"public bytes"
    assert "presigned for http://localhost" in storage.describe()


def test_local_presigned_url_is_none(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path)
    storage.put("k", b"x")
    assert storage.presigned_url("k", 60) is None


@pytest.mark.parametrize("expires_s", [0, 604801])
def test_presigned_url_rejects_bad_expiry(storage: Storage, expires_s: int) -> None:
    with pytest.raises(ValueError, match=f"expiry {expires_s}s"):
        storage.presigned_url("k", expires_s)


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in StorageSettings.model_fields:
        monkeypatch.delenv(f"HISTREAM_STORAGE_{name.upper()}", raising=False)
    return monkeypatch


def test_settings_default_to_a_local_directory(
    clean_env: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    settings = StorageSettings()
    assert (settings.local_dir, settings.endpoint, settings.bucket) == (
        "outputs/storage", None, "histream")  # fmt: skip
    assert settings.presign_expiry_s == 3600
    clean_env.setenv("HISTREAM_STORAGE_LOCAL_DIR", str(tmp_path / "store"))
    storage = open_storage()
    assert isinstance(storage, LocalStorage)
    assert storage.root == tmp_path / "store"


def test_settings_from_the_environment_open_s3(
    clean_env: pytest.MonkeyPatch, s3_endpoint: str
) -> None:
    clean_env.setenv("HISTREAM_STORAGE_ENDPOINT", s3_endpoint)
    clean_env.setenv("HISTREAM_STORAGE_BUCKET", "env-bucket")
    clean_env.setenv("HISTREAM_STORAGE_ACCESS_KEY", ACCESS_KEY)
    clean_env.setenv("HISTREAM_STORAGE_SECRET_KEY", SECRET_KEY)
    clean_env.setenv("HISTREAM_STORAGE_REGION", "us-east-1")
    clean_env.setenv("HISTREAM_STORAGE_SECURE", "false")
    clean_env.setenv("HISTREAM_STORAGE_PRESIGN_EXPIRY_S", "600")
    settings = StorageSettings()
    assert (settings.endpoint, settings.bucket, settings.region) == (
        s3_endpoint, "env-bucket", "us-east-1")  # fmt: skip
    assert settings.presign_expiry_s == 600 and settings.secure is False
    assert SECRET_KEY not in repr(settings)

    storage = open_storage(settings)
    assert isinstance(storage, S3Storage)
    storage.put("k", b"via env")
    assert storage.get("k") == b"via env"
    description = storage.describe()
    assert description == f"s3 bucket 'env-bucket' at http://{s3_endpoint} (region us-east-1)"
    assert SECRET_KEY not in description and ACCESS_KEY not in description


@pytest.mark.parametrize("value", ["0", "604801", "-5"])
def test_settings_reject_a_bad_presign_expiry(clean_env: pytest.MonkeyPatch, value: str) -> None:
    clean_env.setenv("HISTREAM_STORAGE_PRESIGN_EXPIRY_S", value)
    with pytest.raises(ValidationError, match=f"presign_expiry_s={value} must be in"):
        StorageSettings()


def test_settings_reject_a_bad_endpoint_and_bucket(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("HISTREAM_STORAGE_ENDPOINT", "http://minio:9000")
    with pytest.raises(ValidationError, match="endpoint='http://minio:9000' must be 'host:port'"):
        StorageSettings()
    with pytest.raises(ValidationError, match="bucket='Bad_Bucket'"):
        StorageSettings(endpoint="minio:9000", bucket="Bad_Bucket")


def test_s3_without_keys_fails_naming_what_is_missing(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("HISTREAM_STORAGE_ENDPOINT", "minio:9000")
    clean_env.setenv("HISTREAM_STORAGE_ACCESS_KEY", "someone")
    with pytest.raises(ValueError) as info:
        open_storage()
    message = str(info.value)
    assert "endpoint='minio:9000'" in message
    assert "HISTREAM_STORAGE_SECRET_KEY not set" in message
    assert "ACCESS_KEY" not in message
    with pytest.raises(ValueError, match="HISTREAM_STORAGE_ACCESS_KEY and HISTREAM_STORAGE_SECRET"):
        open_storage(StorageSettings(endpoint="minio:9000", access_key=None))


class StallOnce:
    """A TCP proxy to an S3 endpoint whose first connection takes the request and never
    answers (an endpoint that hangs mid-request); later connections are passed through."""

    def __init__(self, target: str) -> None:
        import socket

        self.target = target.rsplit(":", 1)
        self.server = socket.create_server(("127.0.0.1", 0))
        self.endpoint = f"127.0.0.1:{self.server.getsockname()[1]}"
        self.stalled: list = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        import socket

        while True:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            if not self.stalled:
                self.stalled.append(client)  # read nothing, answer nothing
                continue
            upstream = socket.create_connection((self.target[0], int(self.target[1])))
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(src, dst) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (src, dst):
                with contextlib.suppress(OSError):
                    sock.close()

    def close(self) -> None:
        self.server.close()
        for sock in self.stalled:
            sock.close()


def test_an_s3_request_that_hangs_is_retried_after_the_timeout(s3_endpoint: str) -> None:
    """An endpoint that stops answering mid-request costs `timeout_s`, not minio's 5 minutes
    (a stuck snapshot write once stalled a streaming session)."""
    make_s3(s3_endpoint, "stall-bucket").put("k", b"before")
    proxy = StallOnce(s3_endpoint)
    try:
        storage = S3Storage(
            proxy.endpoint, "stall-bucket", ACCESS_KEY, SECRET_KEY, region="us-east-1",
            create_bucket=False, timeout_s=0.5,
        )  # fmt: skip
        started = time.monotonic()
        assert storage.get("k") == b"before"
        took = time.monotonic() - started
    finally:
        proxy.close()
    assert len(proxy.stalled) == 1 and 0.5 <= took < 10


def test_the_s3_timeout_is_a_setting(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("HISTREAM_STORAGE_TIMEOUT_S", "7.5")
    assert StorageSettings().timeout_s == 7.5
    clean_env.setenv("HISTREAM_STORAGE_TIMEOUT_S", "0")
    with pytest.raises(ValidationError, match="timeout_s"):
        StorageSettings()


def test_an_s3_endpoint_that_never_answers_is_tried_6_times_then_fails() -> None:
    """Each request is retried up to 5 times (6 tries in all), each try at most `timeout_s`;
    then the call fails instead of waiting on."""
    import socket
    import threading

    listener = socket.create_server(("127.0.0.1", 0))
    accepted: list[socket.socket] = []

    def accept() -> None:  # take connections, never answer
        while True:
            try:
                accepted.append(listener.accept()[0])
            except OSError:
                return

    threading.Thread(target=accept, daemon=True).start()
    endpoint = f"127.0.0.1:{listener.getsockname()[1]}"
    try:
        with pytest.raises(Exception) as failed:
            S3Storage(endpoint, "silent", ACCESS_KEY, SECRET_KEY, region="us-east-1", timeout_s=0.1)
    finally:
        listener.close()
        for sock in accepted:
            sock.close()
    assert len(accepted) == 6, repr(failed.value)
