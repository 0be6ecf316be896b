"""Gradients on their way from an accelerator to a lane that takes host memory: copied into pooled host
buffers, checked for non-finite values before they leave the device, and reduced once the copy's fence
has passed, every call of the pass in the engine's order. Checked on the CPU with fences that pass late:
the schedule and the arithmetic do not depend on the device."""

from __future__ import annotations

import threading
import time

import pytest
import torch
import torch.nn.functional as F

from communication.group import PeerGroup
from jobspec import JobSpec
from tests.unit.zero3.fixtures import UNITS, TinyNet, assert_bit_identical, make_data, sharded_run
from worker.zero3.reductions import HostStaging, finite_flag
from worker.zero3.sharded import ShardedModule
from worker.zero3.staging import Fence, StagingPool

pytestmark = pytest.mark.timeout(90)
POOL_BUFFERS = 4


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
        pool = StagingPool(64 * 64, POOL_BUFFERS, pin=False)

        def fence(device: torch.device) -> Fence:
            assert device == torch.device("cpu")  # the gradient's own device
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
    for pool in pools:  # bounded, every buffer back (beyond the pool, a gradient gets a buffer of its own)
        assert 1 <= pool.allocated <= POOL_BUFFERS and pool.lent == 0


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


def _hierarchical_run(staged: bool) -> list[dict[str, torch.Tensor]]:
    """JOB's steps on 2 simulated hosts x 2 ranks (threads, each a GrpcBackend on loopback and a gloo
    local lane, which runs collectives in call order); every rank's full parameters."""
    from communication.grpc_backend import GrpcBackend
    from communication.hierarchical import HierarchicalBackend
    from communication.rendezvous_store import RendezvousStore
    from communication.torchdist import TorchDistBackend
    from tests.unit.zero3.fixtures import batch_indices, rank_slices
    from worker.zero3.optim import ShardedOptimizer
    from worker.zero3.plan import plan_model
    from worker.zero3.state import full_parameters

    job = JobSpec.model_validate(dict(steps=2, global_batch=16, warmup_steps=0))
    ids = ("a", "a", "b", "b")
    stores = [RendezvousStore() for _ in ids]
    backends = [
        HierarchicalBackend(
            GrpcBackend("tok"), TorchDistBackend(collective_timeout=20, rendezvous_timeout=20)
        )
        for _ in ids
    ]
    addresses = tuple(f"127.0.0.1:{b.remote.start()}" for b in backends)
    x, y = make_data()
    lock = threading.Lock()
    results: list[object] = [None] * len(ids)

    def rank_main(rank: int) -> None:
        try:
            group = PeerGroup(
                "job", 1, rank, addresses, ids, store_addresses=tuple(s.address for s in stores)
            )
            backend = backends[rank]
            backend.set_group(group)
            with lock:
                torch.manual_seed(job.seed)
                model = TinyNet()
            plan = plan_model(model, len(ids), UNITS)
            pool = StagingPool(64 * 64, 2, pin=False)
            staging = HostStaging(pool, lambda device: _LateFence(0.002)) if staged else None
            engine = ShardedModule(model, group, backend, plan=plan, timeout=20.0, host_staging=staging)
            opt = ShardedOptimizer(engine.shards, job)
            for step in range(job.steps):
                idx = batch_indices(step, x.shape[0], job.global_batch)[
                    rank_slices(job.global_batch, 4)[rank]
                ]
                engine.begin(step)
                F.cross_entropy(engine(x[idx]), y[idx], reduction="sum").backward()
                engine.finish_backward()
                opt.step([g.div(job.global_batch) for g in engine.grad_shards], step)
                backend.release(group, step)
            results[rank] = full_parameters(engine, job.steps)
            engine.close()
        except BaseException as exc:
            results[rank] = exc

    threads = [threading.Thread(target=rank_main, args=(r,), daemon=True) for r in range(len(ids))]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
    finally:
        for b in backends:
            b.close()
        for s in stores:
            s.close()
    for r in results:
        if isinstance(r, BaseException):
            raise r
    assert all(isinstance(r, dict) for r in results), "a rank did not finish"
    return results  # type: ignore[return-value]


def test_staged_gradients_keep_the_call_order_of_a_lane_that_needs_it() -> None:
    """Through the launcher every call of the pass (gathers too) reaches the hierarchical backend in the
    engine's order, from another thread: the gloo lane inside each host matches its calls, and the run
    gives the same bits as one whose calls come straight from the training thread."""
    plain = _hierarchical_run(staged=False)
    staged = _hierarchical_run(staged=True)
    for a, b in zip(plain, staged, strict=True):
        assert_bit_identical(a, b)
