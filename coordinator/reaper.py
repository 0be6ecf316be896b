"""Background tasks of the coordinator: heartbeat expiry and progress checks (the reaper), the heartbeat
flusher, and the purge of old dead and left worker records."""

from __future__ import annotations

import asyncio
import logging

from coordinator.service import CoordinatorService

log = logging.getLogger(__name__)


async def run_reaper(service: CoordinatorService, tick_s: float) -> None:
    """Declares silent workers dead (within heartbeat timeout + one tick) and evicts members that make no
    progress (coordinator/liveness.py). A wake-up late by more than a tick means the coordinator itself
    stalled: that lateness is granted to every worker before anyone expires (heartbeats may be waiting
    unread)."""
    loop = asyncio.get_running_loop()
    while True:
        due = loop.time() + tick_s
        await asyncio.sleep(tick_s)
        late = loop.time() - due  # the sleep's own lateness: time the event loop could not run us
        try:
            if late > tick_s:
                service.absorb_stall(late)
            await service.expire()
            await service.check_liveness()
        except Exception:  # keep reaping: a failed write must not stop failure detection
            log.exception("reaper tick failed at epoch %d", service.state.epoch)


FLUSH_CHUNK = 200  # rows per transaction: bounds how long one write holds the event loop (~1-2 ms)


async def run_flusher(service: CoordinatorService, period_s: float) -> None:
    """Writes coalesced heartbeat fields to SQLite once per period, in chunks, yielding in between."""
    while True:
        await asyncio.sleep(period_s)
        try:
            chunks = service.pending_heartbeats // FLUSH_CHUNK + 1  # bounded: later beats wait a period
            for _ in range(chunks):
                if not service.flush_heartbeats(FLUSH_CHUNK):
                    break
                await asyncio.sleep(0)
        except Exception:
            log.exception("heartbeat flush failed at epoch %d", service.state.epoch)


async def run_purger(service: CoordinatorService, period_s: float) -> None:
    """Forgets dead and left worker records older than the retention, once per period."""
    while True:
        await asyncio.sleep(period_s)
        try:
            service.purge()
        except Exception:
            log.exception("purging old worker records failed at epoch %d", service.state.epoch)


def start_background(service: CoordinatorService) -> list[asyncio.Task[None]]:
    s = service.settings
    return [
        asyncio.create_task(run_reaper(service, s.reaper_tick_s), name="zerowire-reaper"),
        asyncio.create_task(run_flusher(service, s.heartbeat_flush_interval), name="zerowire-flusher"),
        asyncio.create_task(run_purger(service, s.purge_every_s), name="zerowire-purger"),
    ]


async def stop_background(tasks: list[asyncio.Task[None]]) -> None:
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
