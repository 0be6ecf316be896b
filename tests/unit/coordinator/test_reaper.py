"""The reaper task: it expires and checks progress on every tick, and treats its own late wake-ups as a
coordinator stall."""

from __future__ import annotations

import asyncio
import time
from typing import Any, cast

from coordinator.reaper import run_reaper


class RecordingService:
    def __init__(self) -> None:
        self.expiries = 0
        self.liveness_checks = 0
        self.stalls: list[float] = []
        self.state: Any = None

    def absorb_stall(self, stall_s: float) -> None:
        self.stalls.append(stall_s)

    async def expire(self) -> bool:
        self.expiries += 1
        return False

    async def check_liveness(self) -> bool:
        self.liveness_checks += 1
        return False


async def test_reaper_ticks_and_absorbs_a_stall() -> None:
    service = RecordingService()
    task = asyncio.create_task(run_reaper(cast(Any, service), 0.02))
    try:
        await asyncio.sleep(0.15)
        assert service.expiries >= 2 and service.liveness_checks >= 2
        time.sleep(0.3)  # noqa: ASYNC251 - block the event loop: the coordinator itself stalls
        await asyncio.sleep(0.05)
        assert any(stall >= 0.25 for stall in service.stalls)  # (a loaded machine may add smaller ones)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
