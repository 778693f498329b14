"""A small HTTP client of the video API: one video (`histream submit`: create, wait,
download) or a batch of them (`histream batch`)."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import httpx
from tqdm import tqdm


class ApiError(ValueError):
    """The server refused a request; the message is the server's."""


def _check(response: httpx.Response) -> dict:
    if response.status_code >= 400:
        try:
            message = response.json()["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = response.text
        raise ApiError(f"HTTP {response.status_code}: {message}")
    return response.json()


def wait_ready(client: httpx.Client, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if client.get("/healthz").status_code == 200:
                return
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            raise ApiError(f"the server at {client.base_url} was not ready after {timeout_s:.0f} s")
        time.sleep(0.5)


def submit_video(
    url: str,
    prompt: str,
    out: str | Path,
    size: str | None = None,
    seconds: str | None = None,
    mode: str | None = None,
    seed: int | None = None,
    wait_ready_s: float = 0,
    timeout_s: float = 1800,
    api_key: str | None = None,
) -> Path:
    """POST /v1/videos, show progress until completed, save the MP4; returns its path.
    `api_key`: the tenant's key, when the server has a tenants file."""
    body = {"prompt": prompt, "size": size, "seconds": seconds, "mode": mode, "seed": seed}
    body = {k: v for k, v in body.items() if v is not None}
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else None
    with httpx.Client(base_url=url, timeout=60, follow_redirects=True, headers=headers) as client:
        if wait_ready_s:
            wait_ready(client, wait_ready_s)
        video = _check(client.post("/v1/videos", json=body))
        deadline = time.monotonic() + timeout_s
        with tqdm(total=100, desc=f"video …{video['id'][-10:]}", unit="%") as bar:
            while video["status"] not in ("completed", "failed"):
                if time.monotonic() > deadline:
                    raise ApiError(f"video {video['id']} not done after {timeout_s:.0f} s")
                time.sleep(0.5)
                video = _check(client.get(f"/v1/videos/{video['id']}"))
                bar.update(video["progress"] - bar.n)
            bar.update(video["progress"] - bar.n)
        if video["status"] == "failed":
            error = video.get("error") or {}
            raise ApiError(
                f"video {video['id']} failed: {error.get('code')}: {error.get('message')}"
            )
        response = client.get(f"/v1/videos/{video['id']}/content")
        if response.status_code >= 400:
            _check(response)
        path = Path(out)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(response.content)
        return path


def run_batch(
    url: str,
    requests_path: str | Path,
    out_dir: str | Path,
    wait_ready_s: float = 0,
    timeout_s: float = 24 * 3600,
    api_key: str | None = None,
) -> dict:
    """Upload a JSONL of /v1/videos requests, create a batch, show its progress, then write
    `output.jsonl`, `errors.jsonl` and each completed video as `<custom_id>.mp4` into
    `out_dir`. Returns the finished batch object."""
    data = Path(requests_path).read_bytes()
    out = Path(out_dir)
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else None
    with httpx.Client(base_url=url, timeout=120, follow_redirects=True, headers=headers) as client:
        if wait_ready_s:
            wait_ready(client, wait_ready_s)
        files = {"file": (Path(requests_path).name, data, "application/jsonl")}
        uploaded = _check(client.post("/v1/files", data={"purpose": "batch"}, files=files))
        body = {"input_file_id": uploaded["id"], "endpoint": "/v1/videos",
                "completion_window": "24h"}  # fmt: skip
        batch = _check(client.post("/v1/batches", json=body))
        deadline = time.monotonic() + timeout_s
        total = batch["request_counts"]["total"]
        with tqdm(total=total, desc=f"batch …{batch['id'][-10:]}", unit="video") as bar:
            while batch["status"] not in ("completed", "failed", "cancelled", "expired"):
                if time.monotonic() > deadline:
                    raise ApiError(f"batch {batch['id']} not done after {timeout_s:.0f} s")
                time.sleep(1.0)
                batch = _check(client.get(f"/v1/batches/{batch['id']}"))
                counts = batch["request_counts"]
                bar.update(counts["completed"] + counts["failed"] - bar.n)
        out.mkdir(parents=True, exist_ok=True)
        for name, key in (("output.jsonl", "output_file_id"), ("errors.jsonl", "error_file_id")):
            if batch.get(key):
                response = client.get(f"/v1/files/{batch[key]}/content")
                if response.status_code >= 400:
                    _check(response)
                (out / name).write_bytes(response.content)
        if (out / "output.jsonl").exists():
            for line in (out / "output.jsonl").read_text().splitlines():
                result = json.loads(line)
                video = result["response"]["body"]
                response = client.get(f"/v1/videos/{video['id']}/content")
                if response.status_code >= 400:
                    _check(response)
                (out / f"{safe_name(result['custom_id'])}.mp4").write_bytes(response.content)
        return batch


def safe_name(custom_id: str) -> str:
    """A file name from a custom_id: characters other than [A-Za-z0-9._-] become '_'."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", custom_id)[:200] or "_"
