"""Background work a gateway replica repeats: `Periodic.tick` every `period_s` on the replica's
event loop, from `start()` on (idempotent: a second start, or one after the loop died, starts
it once more). A tick that fails is logged and tried again a period later (storage may be
down for a while)."""

from __future__ import annotations

import asyncio
import logging

log = logging.getLogger("histream.sessions")


class Periodic:
    period_s: float = 1.0

    _task: asyncio.Task | None = None

    def start(self) -> None:
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._forever())

    async def _forever(self) -> None:
        while True:
            await asyncio.sleep(self.period_s)
            try:
                await self.tick()
            except Exception:
                name = type(self).__name__
                log.exception("%s failed; trying again in %.1f s", name, self.period_s)

    async def tick(self) -> None:
        raise NotImplementedError
