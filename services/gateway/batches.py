"""Files and batches as the API sees them (the OpenAI Files and Batch API shapes): upload a
JSONL file of `/v1/videos` requests, create a batch from it, follow it, cancel it, fetch its
output and error files. Every line is checked when the batch is created, with the same checks
as POST /v1/videos; a bad line is reported (with its line number) in the error file and the
others run. The batch then runs as video jobs (services/jobs/batches.py)."""

from __future__ import annotations

import json
import time

from services.errors import InvalidArgument, NotFound, ServiceError, TooLarge
from services.gateway.bodies import decode_utf8
from services.gateway.quotas import QuotaKeeper
from services.gateway.requests import VideoCreate, resolve_video
from services.jobs.batches import (
    BatchLine,
    BatchRecord,
    BatchRunner,
    BatchStatus,
    BatchStore,
    new_batch_id,
)
from services.jobs.files import FileObject, FileStore
from services.jobs.records import VideoError
from services.settings import ServeSettings

ENDPOINT = "/v1/videos"
COMPLETION_WINDOWS = ("24h",)


def page(items: list[dict], limit: int, after: str | None) -> dict:
    """An OpenAI list page of `items` (newest first) after the id `after`."""
    if not 1 <= limit <= 100:
        raise InvalidArgument(f"limit={limit} must be in [1, 100]", param="limit")
    if after is not None:
        at = [i for i, item in enumerate(items) if item["id"] == after]
        if not at:
            raise NotFound(f"no object with id {after!r} to list after", param="after")
        items = items[at[0] + 1 :]
    data = items[:limit]
    return {
        "object": "list",
        "data": data,
        "has_more": len(items) > limit,
        "first_id": data[0]["id"] if data else None,
        "last_id": data[-1]["id"] if data else None,
    }


class Batches:
    def __init__(
        self,
        settings: ServeSettings,
        files: FileStore,
        runner: BatchRunner,
        quotas: QuotaKeeper | None = None,
    ) -> None:
        self.settings = settings
        self.files = files
        self.runner = runner
        self.batches = BatchStore(files.records)
        self.quotas = quotas

    # -- files ------------------------------------------------------------------------------------

    async def upload(self, tenant: str, filename: str, purpose: str, data: bytes) -> dict:
        if purpose != "batch":
            raise InvalidArgument(
                f"purpose {purpose!r} is not accepted; upload batch input with purpose 'batch'",
                param="purpose",
            )
        if len(data) > self.settings.max_file_bytes:
            raise TooLarge(
                f"the file has {len(data)} bytes; the limit is {self.settings.max_file_bytes}"
            )
        text = decode_utf8(data, "the file", param="file")
        if not text.strip():
            raise InvalidArgument("the file is empty; one JSON request per line", param="file")
        made = await self.files.for_tenant(tenant).create(filename or "upload.jsonl", purpose, data)
        return made.public()

    async def file(self, tenant: str, file_id: str) -> dict:
        return (await self.files.for_tenant(tenant).get(file_id)).public()

    async def file_content(self, tenant: str, file_id: str) -> bytes:
        return await self.files.for_tenant(tenant).content(file_id)

    async def list_files(self, tenant: str, limit: int, after: str | None) -> dict:
        files = await self.files.for_tenant(tenant).list()
        return page([f.public() for f in reversed(files)], limit, after)

    async def delete_file(self, tenant: str, file_id: str) -> dict:
        await self.files.for_tenant(tenant).delete(file_id)
        return {"id": file_id, "object": "file", "deleted": True}

    # -- batches ----------------------------------------------------------------------------------

    async def create(self, tenant: str, body: dict) -> dict:
        endpoint = body.get("endpoint")
        if endpoint != ENDPOINT:
            raise InvalidArgument(
                f"endpoint {endpoint!r} is not served; batches run {ENDPOINT!r}", "endpoint"
            )
        window = body.get("completion_window")
        if window not in COMPLETION_WINDOWS:
            raise InvalidArgument(
                f"completion_window {window!r} must be one of {list(COMPLETION_WINDOWS)}",
                "completion_window",
            )
        metadata = body.get("metadata")
        if metadata is not None and not (
            isinstance(metadata, dict)
            and len(metadata) <= 16
            and all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items())
        ):
            raise InvalidArgument("metadata must be at most 16 string keys and values", "metadata")
        file_id = body.get("input_file_id")
        if not isinstance(file_id, str) or not file_id:
            raise InvalidArgument("input_file_id is required", "input_file_id")
        files = self.files.for_tenant(tenant)
        try:
            meta: FileObject = await files.get(file_id)
        except NotFound as err:
            raise NotFound(err.message, param="input_file_id") from None
        if meta.purpose != "batch":
            raise InvalidArgument(
                f"file {file_id!r} has purpose {meta.purpose!r}, not 'batch'", "input_file_id"
            )
        lines = self.parse_lines(await files.content(file_id))
        now = int(time.time())
        batch = BatchRecord(
            id=new_batch_id(), endpoint=ENDPOINT, input_file_id=file_id, completion_window=window,
            created_at=now, expires_at=now + 24 * 3600, metadata=metadata, tenant=tenant,
            owner=self.runner.owner, lease_until=int(now + self.runner.lease_s), lines=lines,
        )  # fmt: skip
        batch.count()
        await self.batches.for_tenant(tenant).put(batch)
        self.runner.start_batch(batch)
        return batch.public()

    def parse_lines(self, data: bytes) -> list[BatchLine]:
        """Every request of a JSONL input file, each checked as POST /v1/videos checks its body;
        a bad one is a failed line naming what is wrong (the others run)."""
        text = decode_utf8(data, "the input file", param="input_file_id")
        rows = [(n, raw) for n, raw in enumerate(text.splitlines(), start=1) if raw.strip()]
        if not rows:
            raise InvalidArgument("the input file has no requests", "input_file_id")
        limit = self.settings.max_batch_lines
        if len(rows) > limit:
            raise InvalidArgument(
                f"the input file has {len(rows)} requests; the limit is {limit} (max_batch_lines)",
                "input_file_id",
            )
        lines, seen = [], set()
        for number, raw in rows:
            custom_id = f"line-{number}"
            try:
                request = json.loads(raw)
                if not isinstance(request, dict):
                    raise InvalidArgument("the line is not a JSON object")
                given = request.get("custom_id")
                if not isinstance(given, str) or not given or len(given) > 512:
                    raise InvalidArgument("custom_id must be a string of 1-512 characters")
                custom_id = given
                if custom_id in seen:
                    raise InvalidArgument(f"custom_id {custom_id!r} is used by an earlier line")
                seen.add(custom_id)
                if request.get("method", "POST") != "POST" or request.get("url") != ENDPOINT:
                    raise InvalidArgument(f'a line needs "method": "POST", "url": "{ENDPOINT}"')
                body = request.get("body")
                if not isinstance(body, dict):
                    raise InvalidArgument("body must be a JSON object: a POST /v1/videos body")
                self.check_body(body)
                lines.append(BatchLine(line=number, custom_id=custom_id, body=body))
            except json.JSONDecodeError as err:
                lines.append(bad_line(number, custom_id, f"not valid JSON: {err.msg}"))
            except ServiceError as err:
                lines.append(bad_line(number, custom_id, err.message, err.code, err.http_status))
        return lines

    def check_body(self, body: dict) -> None:
        """POST /v1/videos' checks of a body (raises InvalidArgument naming the field)."""
        s = self.settings
        resolve_video(
            VideoCreate.parse(body), s.get_preset(), s.served_model, s.frame_rate,
            s.max_prompt_chars,
        )  # fmt: skip

    async def get(self, tenant: str, batch_id: str) -> dict:
        return (await self.batches.for_tenant(tenant).get(batch_id)).public()

    async def list(self, tenant: str, limit: int, after: str | None) -> dict:
        store = self.batches.for_tenant(tenant)
        batches = [await store.get(i) for i in reversed(await store.ids())]
        return page([b.public() for b in batches], limit, after)

    async def cancel(self, tenant: str, batch_id: str) -> dict:
        store = self.batches.for_tenant(tenant)
        batch = await store.get(batch_id)
        if batch.status in (BatchStatus.validating, BatchStatus.in_progress):
            batch.status, batch.cancelling_at = BatchStatus.cancelling, int(time.time())
            await store.put(batch)
            self.runner.cancel_here(batch_id)
        return batch.public()


def bad_line(
    number: int, custom_id: str, message: str, code: str = "invalid_value", status: int = 400
) -> BatchLine:
    return BatchLine(
        line=number, custom_id=custom_id, status="failed", status_code=status,
        error=VideoError(code=code, message=f"line {number}: {message}"),
    )  # fmt: skip
