"""Who is calling: API keys mapped to tenants.

The tenants file (`histream serve --tenants FILE`, `HISTREAM_TENANTS_FILE`; a Kubernetes Secret
in production) is YAML or JSON:

    defaults:             # quotas of tenants that give none (absent: no limits)
      max_sessions: 4
    tenants:
      acme:
        keys: ["sk-acme-1", "sha256:<hex of a key>"]
        quotas: {max_videos: 8, max_frames: 477, max_size: 1920x1088, frames_per_hour: 20000}

A key is given in plaintext or as `sha256:` and the hex SHA-256 of the key; plaintext keys are
hashed on load and neither kept nor logged, and a caller's key is looked up by its hash. The
file is read again when it changes (its modification time and size, checked at most once a
second); a file that no longer parses keeps the tenants of the last good one (and says so in
the log). Without a file the service is open: every caller, with or without a key, is the
default tenant (`ServeSettings.tenant`), as `make run` expects.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import time
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from services.errors import Unauthenticated
from services.storage import Layout

log = logging.getLogger("histream.gateway")
RECHECK_S = 1.0  # how often the file's stat is looked at, at most
_HEX = set("0123456789abcdef")


def key_hash(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


class Quotas(BaseModel):
    """What one tenant may use; None: no limit. Checked by the gateway (gateway/quotas.py)."""

    model_config = ConfigDict(extra="forbid")

    max_sessions: int | None = Field(None, ge=0)  # streaming sessions open at once
    max_videos: int | None = Field(None, ge=0)  # video jobs queued or running at once
    max_frames: int | None = Field(None, ge=1)  # frames of one video or session
    max_session_seconds: int | None = Field(None, ge=1)  # how long an endless session may run
    max_size: str | None = Field(None, pattern=r"^[1-9][0-9]{0,4}x[1-9][0-9]{0,4}$")  # WxH
    frames_per_hour: int | None = Field(None, ge=0)  # frames asked for in a rolling hour
    requests_per_minute: int | None = Field(None, ge=1)  # API calls (a burst of a minute's)

    def size_limit(self) -> tuple[int, int] | None:
        if self.max_size is None:
            return None
        width, height = self.max_size.split("x")
        return int(width), int(height)


class TenantEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")

    keys: list[str] = Field(min_length=1)
    quotas: Quotas | None = None  # None: the file's defaults

    @field_validator("keys")
    @classmethod
    def _hashed(cls, keys: list[str]) -> list[str]:
        """Every key as its hex SHA-256 (plaintext ones hashed here)."""
        hashed = []
        for key in keys:
            if key.startswith("sha256:"):
                digest = key.removeprefix("sha256:").lower()
                if len(digest) != 64 or not set(digest) <= _HEX:
                    raise ValueError("a sha256: key needs 64 hex digits after the prefix")
                hashed.append(digest)
            elif not key:
                raise ValueError("a key cannot be empty")
            else:
                hashed.append(key_hash(key))
        return hashed


class TenantsDocument(BaseModel):
    model_config = ConfigDict(extra="forbid")

    defaults: Quotas = Field(default_factory=Quotas)
    tenants: dict[str, TenantEntry] = Field(min_length=1)

    @field_validator("tenants")
    @classmethod
    def _names(cls, tenants: dict[str, TenantEntry]) -> dict[str, TenantEntry]:
        for name in tenants:
            Layout(name)  # a storage prefix: 1-63 characters of [a-z0-9-]
        return tenants


def parse_tenants(text: str, source: str) -> tuple[dict[str, str], dict[str, Quotas]]:
    """(key hash -> tenant name, tenant name -> quotas) from a tenants file's text.
    ValueError naming what is wrong (never a key: plaintext keys do not appear in messages)."""
    try:
        data = yaml.safe_load(text) if not source.endswith(".json") else json.loads(text)
    except (yaml.YAMLError, json.JSONDecodeError) as err:
        raise ValueError(f"{source}: not valid YAML or JSON ({type(err).__name__})") from None
    try:
        document = TenantsDocument.model_validate(data)
    except ValidationError as err:
        where = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in err.errors())
        raise ValueError(f"{source}: {where}") from None
    owners: dict[str, str] = {}
    for name, entry in document.tenants.items():
        for digest in entry.keys:
            other = owners.setdefault(digest, name)
            if other != name:
                raise ValueError(f"{source}: one key is given to both {other!r} and {name!r}")
    quotas = {name: entry.quotas or document.defaults for name, entry in document.tenants.items()}
    return owners, quotas


def bearer(authorization: str | None) -> str | None:
    """The key of an `Authorization` header or metadata value (`Bearer <key>`, or the key)."""
    if not authorization:
        return None
    scheme, _, rest = authorization.strip().partition(" ")
    if scheme.lower() == "bearer":
        return rest.strip() or None
    return authorization.strip()


class Tenancy:
    """The tenants of a gateway replica; `authenticate` names the caller's tenant."""

    def __init__(self, path: str | None, default: str) -> None:
        self.path = Path(path) if path else None
        self.default = Layout(default).tenant
        self._owners: dict[str, str] = {}
        self._quotas: dict[str, Quotas] = {}
        self._stat: tuple[float, int] | None = None
        self._checked = 0.0
        self._lock = threading.Lock()
        if self.path is None:
            log.warning(
                "no tenants file (--tenants / HISTREAM_TENANTS_FILE): the API is open, every "
                "caller is tenant %r", self.default,
            )  # fmt: skip
        else:
            self._load()  # a bad file at start is an error: refuse to serve
            log.info("tenants file %s: %d tenants", self.path, len(set(self._owners.values())))

    @property
    def open(self) -> bool:
        return self.path is None

    def names(self) -> list[str]:
        """Every tenant that can call (the default one when open)."""
        self._reload_if_changed()
        return [self.default] if self.open else sorted(set(self._owners.values()))

    def quotas(self, tenant: str) -> Quotas:
        """The tenant's quotas (none on an open service)."""
        self._reload_if_changed()
        return self._quotas.get(tenant) or Quotas()

    def authenticate(self, authorization: str | None) -> str:
        """The tenant of the caller whose `Authorization` is given; Unauthenticated when the
        service has tenants and the key is missing or unknown."""
        if self.open:
            return self.default
        key = bearer(authorization)
        if key is None:
            raise Unauthenticated(
                "no API key: send it as 'Authorization: Bearer <key>' (gRPC: the "
                "'authorization' metadata; WebSocket: the header, or api_key in the first "
                "message)"
            )
        self._reload_if_changed()
        tenant = self._owners.get(key_hash(key))
        if tenant is None:
            raise Unauthenticated("the API key is not valid")
        return tenant

    def _load(self) -> None:
        assert self.path is not None
        stat = self.path.stat()
        owners, quotas = parse_tenants(self.path.read_text(), str(self.path))
        with self._lock:
            self._owners, self._quotas = owners, quotas
            self._stat = (stat.st_mtime, stat.st_size)

    def _reload_if_changed(self) -> None:
        now = time.monotonic()
        if self.path is None or now - self._checked < RECHECK_S:
            return
        self._checked = now
        try:
            stat = os.stat(self.path)
            if (stat.st_mtime, stat.st_size) == self._stat:
                return
            self._load()
            count = len(set(self._owners.values()))
            log.info("tenants file %s changed: %d tenants", self.path, count)
        except (OSError, ValueError) as err:
            log.error("tenants file %s not reloaded, the last good one stays: %s", self.path, err)
