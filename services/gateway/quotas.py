"""Per-tenant quotas (services/tenants.py `Quotas`), checked when a video or a session is
admitted, before anything is stored or reaches a stage.

- `max_frames`, `max_size`: the request itself; over them waiting does not help (no
  Retry-After).
- `max_videos`: the tenant's video jobs queued or running, counted from their records in
  storage, so across every gateway replica.
- `max_sessions`: the tenant's streaming sessions open on this gateway replica.
- `frames_per_hour`: frames the tenant asked for in the last hour on this gateway replica
  (videos and sessions); Retry-After says when enough of them have aged out.
- `requests_per_minute`: API calls of the tenant on this gateway replica (a token bucket: a
  burst of a minute's worth, refilled evenly); checked with the key, before any work.
"""

from __future__ import annotations

import collections
import math
import time
from collections.abc import Callable

from services.errors import QuotaExceeded
from services.jobs import RecordStore
from services.protocol import Generation
from services.tenants import Quotas, Tenancy

HOUR_S = 3600.0


class TokenBucket:
    """`rate_per_s` on average, bursts up to `burst`."""

    def __init__(self, rate_per_s: float, burst: float) -> None:
        self.rate_per_s, self.burst = rate_per_s, burst
        self.tokens, self.at = burst, time.monotonic()

    def take(self) -> float:
        """0 if a token was taken; else the seconds until one will be there."""
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self.at) * self.rate_per_s)
        self.at = now
        if self.tokens >= 1:
            self.tokens -= 1
            return 0.0
        return (1 - self.tokens) / self.rate_per_s


class QuotaKeeper:
    def __init__(
        self,
        tenancy: Tenancy,
        records: RecordStore,
        open_sessions: Callable[[str], int],
        retry_after_s: int,
    ) -> None:
        self.tenancy = tenancy
        self.records = records
        self.open_sessions = open_sessions  # tenant -> its sessions open on this replica
        self.retry_after_s = retry_after_s
        self._asked: dict[str, collections.deque] = collections.defaultdict(collections.deque)
        self._buckets: dict[tuple[str, int], TokenBucket] = {}

    def admit_request(self, tenant: str) -> None:
        """One API call of `tenant` (its requests_per_minute quota)."""
        limit = self.tenancy.quotas(tenant).requests_per_minute
        if limit is None:
            return
        key = (tenant, limit)  # a changed quota starts a new bucket
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = self._buckets[key] = TokenBucket(limit / 60.0, limit)
        wait = bucket.take()
        if wait:
            retry = max(1, math.ceil(wait))
            raise QuotaExceeded(
                f"tenant {tenant!r} is at its requests_per_minute quota ({limit}); retry "
                f"after {retry} s",
                retry_after_s=retry,
            )

    async def admit_video(self, tenant: str, generation: Generation) -> None:
        quotas = self.tenancy.quotas(tenant)
        self._check_request(tenant, quotas, generation)
        if quotas.max_videos is not None:
            active = await self.active_videos(tenant)
            if active >= quotas.max_videos:
                raise QuotaExceeded(
                    f"tenant {tenant!r} is at its max_videos quota: {active} of "
                    f"{quotas.max_videos} video jobs queued or running; retry after "
                    f"{self.retry_after_s} s",
                    retry_after_s=self.retry_after_s,
                )
        self._take_frames(tenant, quotas, generation.shape.num_frames)

    def endless_limits(self, tenant: str) -> tuple[int | None, int | None]:
        """What caps `tenant`'s endless sessions: (its max_session_seconds, the frames it may
        still ask for: max_frames, and what is left of its frames_per_hour)."""
        quotas = self.tenancy.quotas(tenant)
        frames = [quotas.max_frames] if quotas.max_frames is not None else []
        if quotas.frames_per_hour is not None:
            frames.append(max(0, quotas.frames_per_hour - self.frames_last_hour(tenant)))
        return quotas.max_session_seconds, min(frames) if frames else None

    def admit_session(self, tenant: str, generation: Generation) -> None:
        quotas = self.tenancy.quotas(tenant)
        self._check_request(tenant, quotas, generation)
        if quotas.max_sessions is not None:
            open_now = self.open_sessions(tenant)
            if open_now >= quotas.max_sessions:
                raise QuotaExceeded(
                    f"tenant {tenant!r} is at its max_sessions quota: {open_now} of "
                    f"{quotas.max_sessions} sessions open; retry after {self.retry_after_s} s",
                    retry_after_s=self.retry_after_s,
                )
        self._take_frames(tenant, quotas, generation.shape.num_frames)

    async def usage(self, tenant: str) -> dict:
        """What `GET /v1/usage` answers: the caller's quotas and its use of each."""
        return {
            "object": "usage",
            "tenant": tenant,
            "quotas": self.tenancy.quotas(tenant).model_dump(),
            "usage": {
                "sessions": self.open_sessions(tenant),
                "videos": await self.active_videos(tenant),
                "frames_last_hour": self.frames_last_hour(tenant),
            },
        }

    async def active_videos(self, tenant: str) -> int:
        return len(await self.records.for_tenant(tenant).unfinished())

    def frames_last_hour(self, tenant: str) -> int:
        asked = self._asked[tenant]
        while asked and asked[0][0] <= time.monotonic() - HOUR_S:
            asked.popleft()
        return sum(frames for _, frames in asked)

    def _check_request(self, tenant: str, quotas: Quotas, generation: Generation) -> None:
        shape = generation.shape
        if quotas.max_frames is not None and shape.num_frames > quotas.max_frames:
            raise QuotaExceeded(
                f"tenant {tenant!r} may ask for at most {quotas.max_frames} frames "
                f"(max_frames quota); this request asks for {shape.num_frames}",
                param="num_frames",
            )
        size = quotas.size_limit()
        if size is not None and (shape.width > size[0] or shape.height > size[1]):
            raise QuotaExceeded(
                f"tenant {tenant!r} may ask for at most {quotas.max_size} (max_size quota); "
                f"this request asks for {shape.width}x{shape.height}",
                param="size",
            )

    def _take_frames(self, tenant: str, quotas: Quotas, frames: int) -> None:
        used = self.frames_last_hour(tenant)
        limit = quotas.frames_per_hour
        if limit is not None and used + frames > limit:
            asked = self._asked[tenant]
            # when enough of the oldest requests will have aged out for this one to fit
            freed, wait = used + frames - limit, HOUR_S
            for at, count in asked:
                freed -= count
                if freed <= 0:
                    wait = at + HOUR_S - time.monotonic()
                    break
            retry = max(1, math.ceil(wait))
            raise QuotaExceeded(
                f"tenant {tenant!r} is at its frames_per_hour quota: {used} of {limit} frames "
                f"asked for in the last hour, and this request asks for {frames}; retry "
                f"after {retry} s",
                retry_after_s=retry if frames <= limit else None,
            )
        self._asked[tenant].append((time.monotonic(), frames))
