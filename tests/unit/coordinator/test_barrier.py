"""The ready barrier's pure answer and its change signal (no polling, bounded waits)."""

from __future__ import annotations

import asyncio
import time

from coordinator import cluster_state as cs
from coordinator import membership as m
from coordinator.barrier import ChangeSignal, ready_answer
from coordinator.credentials import digest


def digest_of(worker_id: str) -> bytes:
    """A stand-in for the digest of the worker's secret (one secret per id in these tests)."""
    return digest(f"secret-of-{worker_id}")


def test_ready_answer_sorted_by_rank_and_identical_within_an_epoch() -> None:
    state = cs.ClusterState()
    for i, wid in enumerate(["c", "a", "b"]):
        info = cs.WorkerInfo(f"10.0.0.{i}", 5000 + i, f"h{i}", "cpu")
        state = m.register(
            state, wid, info, 0.0, 0.0, max_workers=8, fresh_digest=digest_of(wid), proof=digest_of(wid)
        ).state
    first = ready_answer(state, 3, "hash")
    assert first.ready and first.epoch == 3 and first.active_workers == 3
    assert [w.rank for w in first.workers] == [0, 1, 2]
    assert [w.worker_id for w in first.workers] == ["c", "a", "b"]
    assert first.workers[1].ip_address == "10.0.0.1" and first.workers[1].port == 5001
    # a heartbeat changes telemetry, not the answer
    out = m.heartbeat(state, "a", cs.Heartbeat(epoch=3, step=7, loss=0.5), 1.0, 1.0)
    state.workers["a"] = out.record  # type: ignore[index]
    assert ready_answer(state, 3, "hash") == first
    assert not ready_answer(state, 4, "hash").ready


async def test_change_signal_wakes_waiters_and_times_out() -> None:
    signal = ChangeSignal()
    seen = signal.version
    t0 = time.monotonic()
    assert await signal.wait_change(seen, 0.05) is False
    assert time.monotonic() - t0 >= 0.04
    waiter = asyncio.create_task(signal.wait_change(seen, 5.0))
    await asyncio.sleep(0.01)
    signal.notify()
    assert await asyncio.wait_for(waiter, 1.0) is True
    assert await signal.wait_change(seen, 0.0) is True  # already moved: no wait at all
