"""A small HTTP client of the video API (`histream submit`): create, wait, download."""

from __future__ import annotations

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
