"""Prompt updates of a running session, against fake stages: which chunk a new prompt applies
from, superseded updates, refusals, and updates the session ends before."""

from __future__ import annotations

import asyncio

import pytest

from services.errors import InvalidArgument, ServiceError, Unavailable
from services.protocol import EndReason
from services.sessions import SessionDriver
from tests.services.fakes import fake_stages
from tests.services.harness import run, session_plan, settle, watch_prompts


def started(stages, frames: int = 33) -> SessionDriver:
    driver = SessionDriver(stages.handles, session_plan(frames=frames, prompt="a cat"))
    watch_prompts(driver, stages.journal)
    return driver


async def collect(driver: SessionDriver, into: list) -> None:
    async for chunk in driver.chunks():
        into.append(chunk)


def versions(chunks) -> list[tuple[int, int, str]]:
    """(index, prompt version, prompt the fake refine stage denoised it under) of each chunk."""
    return [(c.index, c.prompt_version, c.latents.data.decode().split("/")[2]) for c in chunks]


def test_an_update_applies_from_the_next_chunk_not_started():
    stages = fake_stages()
    journal = stages.journal
    gate = stages.refine.gate("RunPhase", when=lambda r: r.chunk_index == 0)
    driver = started(stages)
    chunks: list = []

    async def go():
        await driver.open()
        consumer = asyncio.create_task(collect(driver, chunks))
        await journal.reached("RunPhase", stage="refine", chunk=0)  # chunk 0 is being denoised
        assert driver.next_chunk == 1
        update = asyncio.create_task(driver.update_prompt("a dog"))
        await journal.until(lambda: driver.prompts.issued == 1)
        assert not update.done()  # answered once the stages condition on it
        gate.set()
        result = await update
        await consumer
        return result

    assert run(go()) == (1, 1)
    assert versions(chunks) == [(0, 0, "a cat"), (1, 1, "a dog"), (2, 1, "a dog")]
    sid = driver.session_id
    set_prompt = [(s, r, a[0].context.data) for s, m, r, a in stages.calls() if m == "SetPrompt"]
    assert set_prompt == [("structure", sid, b"a dog"), ("refine", sid, b"a dog")]
    # applied between chunk 0's last phase and chunk 1's first
    applied = journal.position("SetPrompt", what="exit")
    assert journal.position("RunPhase", what="exit", stage="refine", chunk=0) < applied
    assert applied < journal.position("RunPhase", chunk=1)


def test_updates_before_a_chunk_starts_both_get_the_newest_version():
    stages = fake_stages()
    journal = stages.journal
    gate = stages.structure.gate("RunPhase", when=lambda r: r.chunk_index == 1)
    driver = started(stages)
    chunks: list = []

    async def go():
        await driver.open()
        consumer = asyncio.create_task(collect(driver, chunks))
        await journal.reached("RunPhase", stage="structure", chunk=1)
        first = asyncio.create_task(driver.update_prompt("a dog"))
        second = asyncio.create_task(driver.update_prompt("a bird"))
        await journal.until(lambda: driver.prompts.issued == 2)
        gate.set()
        results = await asyncio.gather(first, second)
        await consumer
        return results

    assert run(go()) == [(2, 2), (2, 2)]
    assert versions(chunks) == [(0, 0, "a cat"), (1, 0, "a cat"), (2, 2, "a bird")]
    applied = [a[0].context.data for _, m, _, a in stages.calls() if m == "SetPrompt"]
    assert applied == [b"a bird", b"a bird"]  # the superseded prompt never reached a stage


def test_an_update_after_every_chunk_started_is_refused():
    stages = fake_stages()
    gate = stages.structure.gate("RunPhase", when=lambda r: r.chunk_index == 2)
    driver = started(stages)
    chunks: list = []

    async def go():
        await driver.open()
        consumer = asyncio.create_task(collect(driver, chunks))
        await stages.journal.reached("RunPhase", stage="structure", chunk=2)
        with pytest.raises(InvalidArgument, match="all 3 chunks are already generated") as err:
            await driver.update_prompt("too late")
        assert err.value.param == "prompt"
        gate.set()
        await consumer
        await driver.finish()
        with pytest.raises(InvalidArgument, match="the session is ended; no prompt") as err:
            await driver.update_prompt("later still")
        assert err.value.param == "prompt"

    run(go())
    assert [c.prompt_version for c in chunks] == [0, 0, 0]
    assert len(stages.handles.structure.called("EncodePrompt")) == 1  # refused before encoding


def test_an_update_still_pending_when_the_session_ends_is_refused():
    stages = fake_stages()
    journal = stages.journal
    stages.structure.gate("RunPhase", when=lambda r: r.chunk_index == 1)
    driver = started(stages)

    async def go():
        await driver.open()
        chunks = driver.chunks()
        await anext(chunks)
        await journal.reached("RunPhase", stage="structure", chunk=1)
        update = asyncio.create_task(driver.update_prompt("a dog"))
        await journal.until(lambda: driver.prompts.issued == 1)
        await chunks.aclose()  # the session stops before chunk 2
        await driver.close(EndReason.CLOSED)
        with pytest.raises(InvalidArgument, match="the session ended before the new prompt"):
            await update

    run(go())
    assert not stages.handles.structure.called("SetPrompt")


async def _outcome(task: asyncio.Task) -> BaseException | tuple | None:
    """What `task` ended with once every ready task has run; None while it still waits."""
    await settle()
    if not task.done():
        task.cancel()
        return None
    return task.exception() or task.result()


def test_an_update_whose_set_prompt_fails_is_answered():
    stages = fake_stages()
    journal = stages.journal
    gate = stages.refine.gate("RunPhase", when=lambda r: r.chunk_index == 0)
    stages.structure.fail("SetPrompt", lambda: Unavailable("structure lost its GPU"))
    driver = started(stages)

    async def go():
        await driver.open()
        consumer = asyncio.create_task(collect(driver, []))
        await journal.reached("RunPhase", stage="refine", chunk=0)
        update = asyncio.create_task(driver.update_prompt("a dog"))
        await journal.until(lambda: driver.prompts.issued == 1)
        gate.set()
        with pytest.raises(Unavailable):
            await consumer
        await driver.close(EndReason.FAILED)
        return await _outcome(update)

    assert isinstance(run(go()), ServiceError)


def test_an_update_encoded_while_the_last_chunks_run_is_answered():
    stages = fake_stages()
    encoded = stages.structure.gate("EncodePrompt", when=lambda r: r.prompt == "a dog")
    driver = started(stages)

    async def go():
        await driver.open()
        update = asyncio.create_task(driver.update_prompt("a dog"))
        await stages.journal.until(lambda: len(stages.journal.find("EncodePrompt")) == 2)
        chunks: list = []
        await collect(driver, chunks)  # every chunk, while the update is being encoded
        assert [c.prompt_version for c in chunks] == [0, 0, 0]
        encoded.set()
        await driver.finish()
        return await _outcome(update)

    assert isinstance(run(go()), InvalidArgument)
