"""Prometheus metrics of a gateway replica (served as text at GET /metrics)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Protocol

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)

from services.jobs import VideoStatus
from services.protocol import ChunkReady, StageName, StreamKind

disable_created_metrics()  # the *_created series add nothing a scraper needs


CHUNK_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class Tracked(Protocol):
    @property
    def cache_bytes(self) -> int:
        """KV bytes the session holds on the denoising stages now."""
        ...


class Metrics:
    """One registry per replica, so replicas (and tests) never share counters."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "histream_requests",
            "API requests by route, method and status code",
            ["route", "method", "code"],
            registry=self.registry,
        )
        self.chunk_seconds = Histogram(
            "histream_chunk_seconds",
            "Per-chunk latency by phase (denoise: structure + refine; decode: VAE + encode)",
            ["phase"],
            buckets=CHUNK_BUCKETS,
            registry=self.registry,
        )
        self.active_sessions = Gauge(
            "histream_active_sessions",
            "Sessions being generated (kind: video job or streaming session)",
            ["kind"],
            registry=self.registry,
        )
        self.cache_bytes = Gauge(
            "histream_cache_bytes",
            "KV cache bytes held on the denoising stages by this replica's active sessions",
            registry=self.registry,
        )
        self.restore_seconds = Histogram(
            "histream_restore_seconds",
            "Rebuilds of a session's share on a stage that lost it (a replica lost or replaced)",
            ["stage"],
            buckets=CHUNK_BUCKETS,
            registry=self.registry,
        )
        self.videos = Counter(
            "histream_videos", "Finished video jobs by status", ["status"], registry=self.registry
        )
        self._live: dict[int, tuple[StreamKind, Tracked]] = {}  # id(driver) -> (kind, driver)

    @contextlib.contextmanager
    def track(self, kind: StreamKind, driver: Tracked) -> Iterator[None]:
        """Count `driver` as an active session of `kind` while the block runs."""
        self._live[id(driver)] = (kind, driver)
        try:
            yield
        finally:
            self._live.pop(id(driver), None)

    def active(self, kind: StreamKind) -> int:
        return sum(1 for k, _ in self._live.values() if k == kind)

    def chunk(self, chunk: ChunkReady) -> None:
        self.chunk_seconds.labels(phase="denoise").observe(chunk.denoise_seconds)
        self.chunk_seconds.labels(phase="decode").observe(chunk.decode_seconds)

    # -- the video jobs' observer (services.jobs.runner.JobObserver) ---------------------------

    def running(self, driver: Tracked) -> contextlib.AbstractContextManager:
        return self.track(StreamKind.VIDEO, driver)

    def finished(self, status: VideoStatus) -> None:
        self.videos.labels(status=str(status)).inc()

    def restored(self, stage: StageName, seconds: float) -> None:
        self.restore_seconds.labels(stage=str(stage)).observe(seconds)

    def render(self) -> bytes:
        for kind in StreamKind:
            self.active_sessions.labels(kind=str(kind)).set(self.active(kind))
        self.cache_bytes.set(sum(d.cache_bytes for _, d in self._live.values()))
        return generate_latest(self.registry)
