"""Gradients on their way from an accelerator to a lane that takes host memory: copied into pooled host
buffers, checked for non-finite values before they leave the device, and reduced once the copy's fence
has passed, every call of the pass in the engine's order. Checked on the CPU with fences that pass late:
the schedule and the arithmetic do not depend on the device."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from tests.unit.zero3.fixtures import UNITS, TinyNet, assert_bit_identical, make_data, sharded_run
from worker.job import JobSpec
from worker.zero3.reductions import GRAD_STAGING_BUFFERS, HostStaging, finite_flag
from worker.zero3.sharded import ShardedModule
from worker.zero3.staging import Fence, StagingPool

pytestmark = pytest.mark.timeout(90)


class _LateFence:
    """Passes ``delay`` seconds after the copy was enqueued, like a device copy still in flight."""

    def __init__(self, delay: float) -> None:
        self.at = time.monotonic() + delay
        self.queries = 0

    def query(self) -> bool:
        self.queries += 1
        return time.monotonic() >= self.at

    def synchronize(self) -> None:
        time.sleep(max(0.0, self.at - time.monotonic()))


def test_staged_gradients_give_the_same_bits_and_return_every_buffer() -> None:
    job = JobSpec.model_validate(dict(steps=3, global_batch=12, warmup_steps=0))
    fences: list[_LateFence] = []
    pools: list[StagingPool] = []
    lock = threading.Lock()
    checked: list[int] = []

    def staging() -> HostStaging:
        pool = StagingPool(64 * 64, GRAD_STAGING_BUFFERS, pin=False)

        def fence() -> Fence:
            f = _LateFence(0.003)
            with lock:
                fences.append(f)
            return f

        with lock:
            pools.append(pool)
        return HostStaging(pool, fence)

    def probe(rank: int, engine: ShardedModule) -> None:
        assert engine.launcher is not None and engine.launcher.fence_wait_s > 0
        assert engine.reductions.staging is not None and engine.reductions.staging.pool.lent == 0
        checked.append(rank)

    for world in (1, 2):
        plain = sharded_run(TinyNet, job, world, make_data(), units=UNITS)
        staged = sharded_run(TinyNet, job, world, make_data(), units=UNITS, host_staging=staging, probe=probe)
        for a, b in zip(plain, staged, strict=True):
            assert_bit_identical(a, b)
    assert len(checked) == 3 * job.steps
    units_per_pass = len(UNITS) + 1  # and the root
    assert len(fences) == 3 * job.steps * units_per_pass and all(f.queries >= 1 for f in fences)
    for pool in pools:  # bounded: the pool's own buffers served every gradient
        assert pool.allocated <= GRAD_STAGING_BUFFERS and pool.lent == 0 and pool.overflows == 0


@pytest.mark.parametrize(
    ("values", "finite"),
    [
        ([1.0, -2.0, 3.0], True),
        ([3e38, 3e38, -3e38], True),  # a sum would overflow; the values are finite
        ([1.0, float("nan"), 3.0], False),
        ([float("nan")] + [1.0] * 1000, False),
        ([1.0] * 1000 + [float("inf")], False),
        ([-float("inf"), 0.0], False),
    ],
)
def test_the_device_side_finite_flag(values: list[float], finite: bool) -> None:
    flag = finite_flag(torch.tensor(values))
    assert flag.dtype == torch.bool and flag.dim() == 0 and bool(flag) is finite
