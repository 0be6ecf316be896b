"""The ready barrier: a pure answer computed from the membership state, and a change signal to wait on."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from coordinator.cluster_state import ClusterState


@dataclass(frozen=True, slots=True)
class RankedWorker:
    worker_id: str
    ip_address: str
    port: int
    rank: int
    host_id: str
    store_port: int | None


@dataclass(frozen=True, slots=True)
class ReadyAnswer:
    ready: bool
    epoch: int
    active_workers: int
    min_workers: int
    job_hash: str
    workers: tuple[RankedWorker, ...]


def ready_answer(state: ClusterState, min_workers: int, job_hash: str) -> ReadyAnswer:
    """Identical for every caller in the same epoch (given the same min_workers): live workers by rank."""
    ranked = sorted(
        (
            RankedWorker(w.worker_id, w.info.host, w.info.port, w.rank, w.info.host_id, w.info.store_port)
            for w in state.workers.values()
            if w.status == "alive" and w.rank is not None
        ),
        key=lambda r: r.rank,
    )
    n = len(ranked)
    return ReadyAnswer(n >= min_workers, state.epoch, n, min_workers, job_hash, tuple(ranked))


class ChangeSignal:
    """Wakes every waiter on a membership change. Waiters never poll: they sleep on an Event that is
    set (and replaced) by each change."""

    def __init__(self) -> None:
        self._event = asyncio.Event()
        self.version = 0

    def notify(self) -> None:
        self.version += 1
        event, self._event = self._event, asyncio.Event()
        event.set()

    async def wait_change(self, seen_version: int, wait_s: float) -> bool:
        """Sleep until the version moves past `seen_version` or `wait_s` passes. True if it moved."""
        if self.version != seen_version:
            return True
        if wait_s <= 0:
            return False
        try:
            await asyncio.wait_for(self._event.wait(), wait_s)
        except TimeoutError:
            return False
        return True
