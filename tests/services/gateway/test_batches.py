"""Batches without Ray: the gateway core over the real stages in this process (tiny preset) and
a local directory. Lines are checked up front (bad ones reported by line number, the rest
run), a tenant's batch videos run a few at a time, a batch is taken up by another replica from
its record without redoing finished lines, and a cancel stops new lines."""

from __future__ import annotations

import asyncio
import json
import time

import pytest

from services.errors import InvalidArgument, NotFound
from services.gateway.core import GatewayCore
from services.jobs import VideoStatus
from services.jobs.batches import BatchStatus
from services.settings import ServeSettings
from services.storage import StorageSettings
from tests.services.fakes import real_stages
from tests.services.harness import run

TENANT = "default"


def core(tmp_path, **settings) -> GatewayCore:
    config = ServeSettings(
        preset="tiny", storage=StorageSettings(local_dir=str(tmp_path / "store")),
        job_lease_s=3, **settings,
    )  # fmt: skip
    return GatewayCore(config, real_stages(tmp_path / "stages").handles)


def request(custom_id: str, prompt: str = "a red fox", **body) -> str:
    body = {"prompt": prompt, "seconds": "1", "size": "96x64", **body}
    return json.dumps({"custom_id": custom_id, "method": "POST", "url": "/v1/videos", "body": body})


async def finished(gateway: GatewayCore, batch_id: str, timeout_s: float = 120) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        batch = await gateway.batches.get(TENANT, batch_id)
        if batch["status"] in ("completed", "cancelled", "failed"):
            return batch
        await asyncio.sleep(0.1)
    raise AssertionError(f"batch {batch_id} did not finish: {batch}")


async def jsonl(gateway: GatewayCore, file_id: str | None) -> list[dict]:
    if file_id is None:
        return []
    data = await gateway.batches.file_content(TENANT, file_id)
    return [json.loads(line) for line in data.decode().splitlines()]


async def start(gateway: GatewayCore, lines: list[str]) -> dict:
    data = ("\n".join(lines) + "\n").encode()
    uploaded = await gateway.batches.upload(TENANT, "prompts.jsonl", "batch", data)
    assert uploaded["object"] == "file" and uploaded["bytes"] == len(data)
    body = {"input_file_id": uploaded["id"], "endpoint": "/v1/videos", "completion_window": "24h"}
    return await gateway.batches.create(TENANT, body)


def test_a_batch_runs_its_good_lines_and_reports_the_bad_ones_by_line_number(tmp_path):
    gateway = core(tmp_path)
    lines = [
        request("fox", seed=1),
        "{not json",
        request("owl", prompt="an owl at dusk", seed=2),
        request("big", size="9999x9999"),
        request("fox"),  # a custom_id used already
        "",
        request("cat", prompt="a cat", seed=3),
    ]

    async def go():
        created = await start(gateway, lines)
        assert created["status"] in ("validating", "in_progress")
        assert created["request_counts"]["total"] == 6  # the blank line is not a request
        done = await finished(gateway, created["id"])
        return (
            done,
            await jsonl(gateway, done["output_file_id"]),
            await jsonl(gateway, done["error_file_id"]),
        )

    done, output, errors = run(go())
    assert done["status"] == "completed" and done["completed_at"] >= done["created_at"]
    assert done["request_counts"] == {"total": 6, "completed": 3, "failed": 3}
    assert [o["custom_id"] for o in output] == ["fox", "owl", "cat"]
    for line in output:
        video = line["response"]["body"]
        assert line["response"]["status_code"] == 200 and video["status"] == "completed"
        assert video["content_url"] == f"/v1/videos/{video['id']}/content"
        assert (video["size"], video["num_frames"]) == ("96x64", 21)
    assert [(e["custom_id"], e["error"]["line"]) for e in errors] == [
        ("line-2", 2), ("big", 4), ("fox", 5)
    ]  # fmt: skip
    assert "not valid JSON" in errors[0]["error"]["message"]
    assert "size" in errors[1]["error"]["message"] and errors[1]["error"]["code"] == "invalid_value"
    assert "used by an earlier line" in errors[2]["error"]["message"]
    assert {e["response"]["status_code"] for e in errors} == {400}


def test_a_tenants_batch_videos_run_at_most_batch_concurrency_at_once(tmp_path):
    gateway = core(tmp_path, batch_concurrency=1)
    seen: list[int] = []

    async def go():
        created = await start(gateway, [request(f"r{i}", seed=i) for i in range(3)])
        while (await gateway.batches.get(TENANT, created["id"]))["status"] != "completed":
            records = await gateway.records.list()
            seen.append(sum(r.status != VideoStatus.completed for r in records))
            await asyncio.sleep(0.05)
        return await gateway.batches.get(TENANT, created["id"])

    done = run(go())
    assert done["request_counts"]["completed"] == 3
    assert max(seen) == 1  # never two of its videos queued or running together


def test_another_replica_takes_up_a_batch_without_redoing_finished_lines(tmp_path):
    first = core(tmp_path, batch_concurrency=1)

    async def go():
        created = await start(first, [request(f"r{i}", seed=i) for i in range(3)])
        while (await first.batches.get(TENANT, created["id"]))["request_counts"]["completed"] < 1:
            await asyncio.sleep(0.05)
        for task in list(first.batch_runner.tasks.values()):  # the replica dies
            task.cancel()
        first.batch_runner.stop()
        await asyncio.sleep(0.1)
        second = core(tmp_path, batch_concurrency=1)
        while not await second.batch_runner.adopt():  # once the lease (3 s) has run out
            await asyncio.sleep(0.5)
        done = await finished(second, created["id"])
        return done, await second.records.list()

    done, videos = run(go())
    assert done["status"] == "completed" and done["request_counts"]["completed"] == 3
    assert len(videos) == 3  # one video per line: the finished one was not made again


def test_a_replica_dying_right_after_queueing_a_lines_video_leaves_no_second_video(tmp_path):
    """Fault injection: the first replica queues line 2's video, then dies before it can record
    that in the batch. The replica taking the batch up finds that video (its id was saved
    first) instead of making the line's video again."""
    first = core(tmp_path, batch_concurrency=1)
    real_submit = first.batch_runner.submit
    died = asyncio.Event()

    async def submit_then_die(body: dict, tenant: str, video_id: str):
        video = await real_submit(body, tenant, video_id)
        if body["seed"] == 1:
            for task in list(first.batch_runner.tasks.values()):
                task.cancel()
            first.batch_runner.stop()
            died.set()
            await asyncio.sleep(3600)  # cancelled with the rest of the replica
        return video

    first.batch_runner.submit = submit_then_die

    async def go():
        created = await start(first, [request(f"r{i}", seed=i) for i in range(3)])
        await asyncio.wait_for(died.wait(), 60)
        second = core(tmp_path, batch_concurrency=1)
        while not await second.batch_runner.adopt():
            await asyncio.sleep(0.5)
        done = await finished(second, created["id"])
        return done, await second.records.list()

    done, videos = run(go())
    assert done["status"] == "completed" and done["request_counts"]["completed"] == 3
    assert sorted(v.seed for v in videos) == [0, 1, 2]  # line 2's video made once


def test_a_cancelled_batch_starts_no_more_lines(tmp_path):
    gateway = core(tmp_path, batch_concurrency=1)

    async def go():
        created = await start(gateway, [request(f"r{i}", seed=i) for i in range(4)])
        while not await gateway.records.list():  # the first line's video is queued
            await asyncio.sleep(0.02)
        cancelling = await gateway.batches.cancel(TENANT, created["id"])
        done = await finished(gateway, created["id"])
        return cancelling, done, await gateway.records.list()

    cancelling, done, videos = run(go())
    assert cancelling["status"] == "cancelling" and cancelling["cancelling_at"]
    assert done["status"] == "cancelled" and done["cancelled_at"] >= done["cancelling_at"]
    assert len(videos) == 1 and done["request_counts"]["completed"] == 1


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("endpoint", "/v1/chat/completions", "endpoint '/v1/chat/completions' is not served"),
        ("completion_window", "1h", "completion_window '1h' must be one of"),
        ("input_file_id", "file-nope", "no file with id 'file-nope'"),
        ("metadata", {"k": 1}, "metadata must be"),
    ],
)
def test_a_bad_batch_request_is_refused_naming_the_field(tmp_path, field, value, message):
    gateway = core(tmp_path)

    async def go():
        data = (request("a") + "\n").encode()
        uploaded = await gateway.batches.upload(TENANT, "in.jsonl", "batch", data)
        body = {"input_file_id": uploaded["id"], "endpoint": "/v1/videos",
                "completion_window": "24h", field: value}  # fmt: skip
        await gateway.batches.create(TENANT, body)

    with pytest.raises((InvalidArgument, NotFound), match=message) as err:
        run(go())
    assert err.value.param == field


@pytest.mark.parametrize(
    ("purpose", "data", "message"),
    [
        ("fine-tune", b"{}\n", "purpose 'fine-tune' is not accepted"),
        ("batch", b"\n  \n", "the file is empty"),
        ("batch", b"\xff\xfe", "not valid UTF-8"),
    ],
)
def test_a_bad_upload_is_refused(tmp_path, purpose, data, message):
    with pytest.raises(InvalidArgument, match=message):
        run(core(tmp_path).batches.upload(TENANT, "x.jsonl", purpose, data))


def test_files_are_listed_fetched_and_deleted_and_other_tenants_see_none(tmp_path):
    gateway = core(tmp_path)

    async def go():
        a = await gateway.batches.upload(TENANT, "a.jsonl", "batch", b"{}\n")
        b = await gateway.batches.upload(TENANT, "b.jsonl", "batch", b"{}\n")
        listed = await gateway.batches.list_files(TENANT, 20, None)
        got = await gateway.batches.file(TENANT, a["id"])
        with pytest.raises(NotFound):
            await gateway.batches.file("other", a["id"])
        deleted = await gateway.batches.delete_file(TENANT, a["id"])
        with pytest.raises(NotFound):
            await gateway.batches.file_content(TENANT, a["id"])
        return listed, got, deleted, b

    listed, got, deleted, b = run(go())
    assert [f["filename"] for f in listed["data"]] == ["b.jsonl", "a.jsonl"]  # newest first
    assert got["purpose"] == "batch" and deleted == {"id": got["id"], "object": "file",
                                                      "deleted": True}  # fmt: skip
    assert BatchStatus.completed == "completed" and b["status"] == "processed"


def test_a_batch_finds_its_videos_done_by_polling_their_records_every_second(tmp_path, monkeypatch):
    """BENCHMARKS *Batch throughput*: a line's video is found finished by reading its record once a
    second (the waits here are shortened, and recorded)."""
    from services.jobs import batches as batches_module
    from tests.services.harness import Overlay

    waits: list[float] = []
    real_sleep = asyncio.sleep

    async def sleep(delay: float) -> None:
        waits.append(delay)
        await real_sleep(min(delay, 0.01))

    monkeypatch.setattr(batches_module, "asyncio", Overlay(asyncio, sleep=sleep))
    gateway = core(tmp_path)
    assert gateway.batch_runner.poll_s == 1.0

    async def go():
        done = await finished(gateway, (await start(gateway, [request("one")]))["id"])
        await gateway.drain(timeout_s=5)
        return done

    assert run(go(), 120)["request_counts"]["completed"] == 1
    assert waits.count(1.0) >= 1  # it polled, at 1 s
    assert {w for w in waits if w != 1.0} <= {batches_module.CLAIM_SETTLE_S}
