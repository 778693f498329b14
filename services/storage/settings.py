"""Which storage the service uses, from `HISTREAM_STORAGE_*` variables: S3 or a directory."""

from __future__ import annotations

import re

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from services.storage.base import PRESIGN_EXPIRY_RANGE_S, Storage
from services.storage.local import LocalStorage
from services.storage.s3 import S3Storage

_BUCKET_RE = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")


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
    # an S3 connect or read slower than this is retried (up to 5 times); minio's default is 300 s
    timeout_s: float = Field(30.0, gt=0, le=600)

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
            timeout_s=settings.timeout_s,
        )  # fmt: skip
    if not settings.local_dir:
        raise ValueError("no storage configured: set HISTREAM_STORAGE_LOCAL_DIR or _ENDPOINT")
    return LocalStorage(settings.local_dir)
