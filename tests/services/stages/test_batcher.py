"""The denoising replicas' micro-batcher: batches by key, bounded, continuous, failures shared."""

from __future__ import annotations

import asyncio
import threading

import pytest

from services.stages.batcher import PhaseBatcher


def test_waiting_jobs_batch_by_key_up_to_the_limit_and_keys_run_side_by_side():
    ran: list[list[str]] = []
    gate = threading.Event()

    def run(jobs: list[str]) -> list[str]:
        if jobs[0] in ("a", "b"):
            gate.wait(5)  # hold each key's first batch so that the others queue up behind it
        ran.append(jobs)
        return [j.upper() for j in jobs]

    batcher: PhaseBatcher[str, str] = PhaseBatcher(run, max_size=2)

    async def main() -> list[str]:
        first = [asyncio.create_task(batcher.submit(k, j)) for k, j in [("k1", "a"), ("k2", "b")]]
        await asyncio.sleep(0.05)  # "a" and "b" are running, each alone, side by side
        rest = [asyncio.create_task(batcher.submit(k, j)) for k, j in
                [("k1", "c"), ("k2", "d"), ("k2", "e"), ("k1", "f"), ("k2", "g")]]  # fmt: skip
        await asyncio.sleep(0.05)
        assert ran == []  # both were running at once
        gate.set()
        return await asyncio.gather(*first, *rest)

    assert asyncio.run(main()) == ["A", "B", "C", "D", "E", "F", "G"]
    # the two keys' threads interleave freely once released, so order is checked per key
    k1 = [batch for batch in ran if batch[0] in "acf"]
    k2 = [batch for batch in ran if batch[0] in "bdeg"]
    assert k1 == [["a"], ["c", "f"]] and k2 == [["b"], ["d", "e"], ["g"]]  # oldest first, at most 2
    assert batcher.stats.as_dict() == {"batches": 5, "batched_phases": 7, "largest_batch": 2}


def test_a_failed_batch_fails_each_of_its_jobs_and_the_next_batch_still_runs():
    def run(jobs: list[int]) -> list[int]:
        if 0 in jobs:
            raise RuntimeError("out of memory")
        return [j * 10 for j in jobs]

    batcher: PhaseBatcher[int, int] = PhaseBatcher(run, max_size=4)

    async def main():
        return await asyncio.gather(
            batcher.submit("a", 0), batcher.submit("a", 1), batcher.submit("b", 2),
            return_exceptions=True,
        )  # fmt: skip

    a0, a1, b2 = asyncio.run(main())
    assert isinstance(a0, RuntimeError) and isinstance(a1, RuntimeError) and b2 == 20


def test_a_batch_size_below_one_is_refused():
    with pytest.raises(ValueError, match="max_size=0 must be >= 1"):
        PhaseBatcher(lambda jobs: jobs, max_size=0)
