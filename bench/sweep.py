"""What a gateway replica's job sweep costs as finished videos pile up.

Every `job_lease_s / 3` seconds (10 s by default) each gateway replica's Adopter looks for
unfinished jobs whose replica is gone (services.jobs.leases). This stores N finished video
records and 3 unfinished ones in an S3 endpoint (moto's server, as the tests use) and times one
sweep, counting the storage calls it makes.

    python -m bench.sweep --videos 100 1000 3000     # prints the table
    python -m bench --sections sweep                  # writes it into BENCHMARKS.md
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import time
import uuid
from collections import Counter

from bench.report import table
from services.jobs import RecordStore, VideoRecord, VideoStatus
from services.jobs.leases import Adopter
from services.storage import Layout, S3Storage

KEY = "bench"


class Counting:
    """A storage that counts its calls by method."""

    def __init__(self, inner) -> None:
        self.inner, self.calls = inner, Counter()

    def __getattr__(self, name: str):
        method = getattr(self.inner, name)

        def call(*args, **kwargs):
            self.calls[name] += 1
            return method(*args, **kwargs)

        return call


class Runner:
    """What the Adopter needs of a JobRunner: nothing is taken up here (every lease holds)."""

    owner, lease_s, draining, tasks = "bench", 30.0, False, {}

    async def renew(self) -> None:
        pass


def record(i: int, status: VideoStatus) -> VideoRecord:
    return VideoRecord(
        id=f"video_{i:012x}{uuid.uuid4().hex[:20]}", model="tiny", status=status,
        created_at=int(time.time()), seconds="1", size="128x64", prompt="a cat", seed=i,
        mode="histream+", num_frames=17, tenant="default", owner="bench",
        lease_until=int(time.time()) + 3600,
    )  # fmt: skip


def measure(endpoint: str, videos: int, repeats: int) -> dict:
    storage = Counting(S3Storage(endpoint, f"sweep-{uuid.uuid4().hex[:12]}", KEY, KEY))
    records = RecordStore(storage, Layout())
    unfinished = (VideoStatus.queued, VideoStatus.in_progress, VideoStatus.in_progress)

    async def fill() -> None:
        for i in range(videos):
            await records.put(record(i, VideoStatus.completed))
        for i, status in enumerate(unfinished):
            await records.put(record(videos + i, status))

    asyncio.run(fill())
    adopter = Adopter(RecordStore(storage, Layout()), Runner(), None, max_attempts=3)
    started = time.perf_counter()
    asyncio.run(adopter.tick())  # the first, after a replica starts
    first_s = time.perf_counter() - started
    times, calls = [], Counter()
    for _ in range(repeats):
        storage.calls.clear()
        started = time.perf_counter()
        asyncio.run(adopter.tick())
        times.append(time.perf_counter() - started)
        calls = Counter(storage.calls)
    times.sort()
    return {"videos": videos, "first_s": first_s, "median_s": times[len(times) // 2],
            "calls": dict(calls)}  # fmt: skip


def section(videos=(100, 1000, 3000), repeats: int = 5, log=print) -> str:
    from moto.server import ThreadedMotoServer

    os.environ.update(AWS_ACCESS_KEY_ID=KEY, AWS_SECRET_ACCESS_KEY=KEY)
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one access-log line a request
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    rows = []
    try:
        for n in videos:
            rows.append(measure(f"{host}:{port}", n, repeats))
            log(f"[sweep] {n} videos done")
    finally:
        server.stop()
    cells = [
        [r["videos"], f"{r['first_s'] * 1000:.0f} ms", f"{r['median_s'] * 1000:.0f} ms",
         ", ".join(f"{k} {v}" for k, v in sorted(r["calls"].items()))]
        for r in rows
    ]  # fmt: skip
    headers = ["finished videos", "first sweep", "each later sweep", "storage calls of one"]
    return (
        f"One gateway replica's job sweep over N finished videos and 3 unfinished ones in an "
        f"S3 endpoint (moto's server, in this process); medians of {repeats} sweeps after the "
        "first, which also marks any unfinished record stored without a mark:\n\n"
        + table(headers, cells)
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--videos", type=int, nargs="+", default=[100, 1000, 3000])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    print(section(args.videos, args.repeats))


if __name__ == "__main__":
    main()
