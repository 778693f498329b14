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


def test_a_batched_phase_runs_under_its_sessions_lock(tmp_path):
    """README, *Batching*: each batched phase still runs under its session's lock inside
    RunPhase: while something else holds session "a" (a prompt being set, a restore), its phase
    waits outside the batcher and "b"'s runs without it."""
    from protos.histream.v1 import stages_pb2
    from services.settings import ServeSettings
    from services.stages import StructureStage
    from services.storage import StorageSettings

    settings = ServeSettings(
        preset="tiny", phase_batch_size=4, max_sessions_per_replica=2,
        storage=StorageSettings(local_dir=str(tmp_path)),
    )  # fmt: skip
    structure = StructureStage(settings)

    def phase(sid: str) -> stages_pb2.PhaseRequest:
        return stages_pb2.PhaseRequest(session_id=sid, chunk_index=0, phase=0)

    async def main() -> tuple[dict, dict]:
        request = stages_pb2.EncodePromptRequest(prompt="x")
        context = (await structure.EncodePrompt(request)).context
        for sid in ("a", "b"):
            spec = stages_pb2.SessionSpec(
                session_id=sid, tenant="default", preset="tiny", mode="histream",
                height=64, width=96, num_frames=21, seed=4,
            )  # fmt: skip
            await structure.OpenSession(stages_pb2.OpenSessionRequest(spec=spec, context=context))
        lock = structure.sessions.get("a").lock
        await lock.acquire()
        held = asyncio.create_task(structure.RunPhase(phase("a")))
        await structure.RunPhase(phase("b"))
        while_held = structure.stats()
        assert not held.done()
        lock.release()
        await held
        return while_held, structure.stats()

    while_held, after = asyncio.run(main())
    assert (while_held["batches"], while_held["batched_phases"]) == (1, 1)  # "b" alone
    assert (after["batches"], after["batched_phases"]) == (2, 2)  # then "a", once let in
