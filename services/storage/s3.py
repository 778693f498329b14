"""Objects in a bucket of an S3-compatible endpoint (MinIO, AWS S3, ...) via the `minio` client."""

from __future__ import annotations

import io
import os
from datetime import timedelta
from urllib.parse import urlsplit

import certifi
import urllib3
from minio import Minio
from minio.deleteobjects import DeleteObject
from minio.error import S3Error

from services.storage.base import (
    ObjectNotFound,
    check_delete_prefix,
    check_expiry,
    check_key,
    check_prefix,
)

DEFAULT_TIMEOUT_S = 30.0


def http_client(timeout_s: float) -> urllib3.PoolManager:
    """minio's own client settings (up to 5 retries with backoff on 5xx, certifi's CAs or
    SSL_CERT_FILE's) with connect and read timeouts of `timeout_s` instead of 5 minutes; a read
    that times out is retried like a 5xx."""
    return urllib3.PoolManager(
        timeout=urllib3.Timeout(connect=timeout_s, read=timeout_s),
        maxsize=16,
        cert_reqs="CERT_REQUIRED",
        ca_certs=os.environ.get("SSL_CERT_FILE") or certifi.where(),
        retries=urllib3.Retry(total=5, backoff_factor=0.2, status_forcelist=[500, 502, 503, 504]),
    )


class S3Storage:
    """Objects in one bucket of an S3-compatible endpoint (MinIO, AWS S3, ...).

    endpoint: 'host:port' the service reaches S3 at (no scheme; `secure` picks https).
    public_url: 'scheme://host[:port]' clients reach S3 at, when it differs from `endpoint`
      (e.g. an in-cluster 'minio:9000' behind an ingress); presigned URLs are signed for that
      host, because SigV4 signs the Host header.
    region: the bucket's region; None asks the endpoint once per bucket (GetBucketLocation).
    timeout_s: the longest a connect or a read may take before the request is retried (6
      tries in all): an endpoint that stops answering mid-request costs a session seconds,
      not the minio client's default 5 minutes.
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
        timeout_s: float = DEFAULT_TIMEOUT_S,
    ) -> None:
        if "://" in endpoint or "/" in endpoint:
            raise ValueError(
                f"S3 endpoint {endpoint!r} must be 'host:port' without scheme or path; "
                "use secure=True for https"
            )
        self._endpoint, self._bucket, self._secure = endpoint, bucket, secure
        self._region, self._public_url = region, public_url
        # One client per process: Minio is thread-safe but must not be shared across processes.
        self._client = Minio(
            endpoint, access_key, secret_key, secure=secure, region=region,
            http_client=http_client(timeout_s),
        )  # fmt: skip
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
        keys = self.list(check_delete_prefix(prefix))
        # remove_objects is lazy: the deletes happen while its error iterator is consumed.
        errors = list(self._client.remove_objects(self._bucket, (DeleteObject(k) for k in keys)))
        if errors:
            failed = ", ".join(f"{e.name!r} ({e.code})" for e in errors[:5])
            raise OSError(f"could not delete {len(errors)} objects under {prefix!r}: {failed}")
        return len(keys)

    def presigned_url(self, key: str, expires_s: int) -> str | None:
        expires = timedelta(seconds=check_expiry(expires_s))
        return self._presigner.presigned_get_object(self._bucket, check_key(key), expires=expires)

    def describe(self) -> str:
        scheme = "https" if self._secure else "http"
        where = f"s3 bucket {self._bucket!r} at {scheme}://{self._endpoint}"
        if self._region:
            where += f" (region {self._region})"
        if self._public_url:
            where += f", presigned for {self._public_url}"
        return where
