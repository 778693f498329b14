"""Files of the OpenAI Files API shape: what a client uploads as a batch's input, and what a
batch writes (its output and its errors). Stored under the tenant's `files/` prefix: the file
object (`meta.json`) and its bytes (`content`)."""

from __future__ import annotations

import time
import uuid

from pydantic import BaseModel

from services.errors import NotFound
from services.jobs.records import RecordStore
from services.storage import ObjectNotFound

PURPOSES = ("batch", "batch_output")  # what a client may upload: "batch"


def new_file_id() -> str:
    """`file-`, the creation time in milliseconds (12 hex digits), 20 random hex digits."""
    return f"file-{int(time.time() * 1000):012x}{uuid.uuid4().hex[:20]}"


class FileObject(BaseModel):
    id: str
    object: str = "file"
    bytes: int
    created_at: int
    filename: str
    purpose: str
    status: str = "processed"
    expires_at: int | None = None

    def public(self) -> dict:
        return self.model_dump(mode="json")


class FileStore:
    """A tenant's files (through the tenant's RecordStore: the same storage and errors)."""

    def __init__(self, records: RecordStore) -> None:
        self.records = records

    @property
    def layout(self):
        return self.records.layout

    def for_tenant(self, tenant: str) -> FileStore:
        return FileStore(self.records.for_tenant(tenant))

    async def create(self, filename: str, purpose: str, data: bytes) -> FileObject:
        meta = FileObject(
            id=new_file_id(), bytes=len(data), created_at=int(time.time()),
            filename=filename, purpose=purpose,
        )  # fmt: skip
        storage, layout = self.records.storage, self.layout
        await self.records.storage_call(storage.put, layout.file_key(meta.id, "content"), data)
        body = meta.model_dump_json().encode()
        key = layout.file_key(meta.id, "meta.json")
        await self.records.storage_call(storage.put, key, body, "application/json")
        return meta

    async def get(self, file_id: str) -> FileObject:
        try:
            key = self.layout.file_key(file_id, "meta.json")
            data = await self.records.storage_call(self.records.storage.get, key)
        except (ObjectNotFound, ValueError):
            raise NotFound(f"no file with id {file_id!r}", param="file_id") from None
        return FileObject.model_validate_json(data)

    async def content(self, file_id: str) -> bytes:
        await self.get(file_id)
        key = self.layout.file_key(file_id, "content")
        try:
            return await self.records.storage_call(self.records.storage.get, key)
        except ObjectNotFound:
            raise NotFound(f"file {file_id!r} has no content", param="file_id") from None

    async def list(self) -> list[FileObject]:
        prefix = self.layout.files_prefix()
        keys = await self.records.storage_call(self.records.storage.list, prefix)
        files = []
        for key in sorted(k for k in keys if k.endswith("/meta.json")):
            try:
                files.append(await self.get(key.rsplit("/", 2)[-2]))
            except NotFound:
                continue
        return files

    async def delete(self, file_id: str) -> None:
        await self.get(file_id)
        for name in ("meta.json", "content"):
            key = self.layout.file_key(file_id, name)
            await self.records.storage_call(self.records.storage.delete, key)
