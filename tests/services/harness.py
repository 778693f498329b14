"""Asyncio helpers for the Ray-free tests: a fake clock, deterministic settling, a runner with
a hang guard, and small probes into a session driver."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any

from histream_model.config import get_preset
from services.protocol import StreamKind, video_shape
from services.sessions import SessionPlan
from tests.services.fakes import Journal


class FakeClock:
    """Stands in for `time` and `asyncio.sleep` in one module: sleeping advances the clock at
    once and records the delay, so backoff and deadlines are checked without waiting."""

    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []

    def monotonic(self) -> float:
        return self.now

    perf_counter = monotonic

    async def sleep(self, delay: float) -> None:
        self.sleeps.append(delay)
        self.now += delay
        await _yield()

    def install(self, monkeypatch: Any, module: Any) -> FakeClock:
        import time

        monkeypatch.setattr(module, "time", Overlay(time, monotonic=self.monotonic))
        monkeypatch.setattr(module, "asyncio", Overlay(asyncio, sleep=self.sleep))
        return self


class Overlay:
    """A module with some attributes replaced (e.g. `asyncio` with a fake `sleep`), to
    monkeypatch into a module under test."""

    def __init__(self, module: Any, **replaced: Any) -> None:
        self._module = module
        self.__dict__.update(replaced)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._module, name)


_real_sleep = asyncio.sleep


async def _yield() -> None:
    await _real_sleep(0)


async def settle(rounds: int = 100) -> None:
    """Let every ready task run until all of them wait on something. Deterministic with fake
    stages (which never wait unless gated): loop iterations, not wall-clock time."""
    for _ in range(rounds):
        await _real_sleep(0)


def run(coro: Coroutine[Any, Any, Any], timeout_s: float = 30.0) -> Any:
    """Run a test's coroutine; the timeout only turns a hang into a failure."""
    return asyncio.run(asyncio.wait_for(coro, timeout_s))


def session_plan(
    kind: StreamKind = StreamKind.VIDEO,
    mode: str = "histream+",
    frames: int = 33,
    object_id: str = "video_1",
    prompt: str = "a cat",
    seed: int = 3,
) -> SessionPlan:
    """A `SessionPlan` at the tiny preset, 96x64 (33 frames: 3 chunks; 69 frames: 6)."""
    return SessionPlan(
        object_id=object_id,
        kind=kind,
        tenant="default",
        shape=video_shape(get_preset("tiny"), mode, 64, 96, frames),
        seed=seed,
        prompt=prompt,
        fps=16,
    )


def record_statuses(driver: Any) -> list:
    """Every status `driver` takes from now on, its current one first."""
    seen = [driver.status]
    move = driver.lifecycle.to

    def to(status: Any) -> None:
        move(status)
        seen.append(status)

    driver.lifecycle.to = to
    return seen


def watch_prompts(driver: Any, journal: Journal) -> None:
    """Wake `journal.until` waiters whenever `driver` queues a prompt update."""
    submit = driver.prompts.submit

    def submitted(context: Any, text: str = "") -> Any:
        future = submit(context, text)
        journal.notify()
        return future

    driver.prompts.submit = submitted
