"""The NCCL lane on one GPU, one rank per group (what the CPU stand-ins of
tests/unit/communication/test_nccl_lane.py cannot prove):

- a collective that cannot finish in time (the caller's stream is kept busy by a sleep kernel, so the
  collective's event passes only after it) fails with CollectiveTimeout within its deadline; the group is
  aborted once, the library's watchdog leaves the process alone, and the next epoch's group forms and
  gathers exactly;
- a handle orders a consumer's stream on the device: the host does not wait for the GPU;
- both reduce-scatters (ordered, native) give the input back on one rank;
- a training pass of the engine over the NCCL lane makes no host synchronisation (CUDA's sync debug mode
  raises on one) until the step's single read of its vote;
- the gradient staging pool of CUDA units on a host-memory lane is sized to the plan.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from typing import Any

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA device", allow_module_level=True)

import torch.nn.functional as F

from communication.errors import CollectiveTimeout
from communication.group import PeerGroup
from communication.testing import FakeHub
from communication.torchdist import TorchDistBackend
from communication.torchdist_group import EpochGroup
from tests.conftest import free_port
from tests.unit.zero3.fixtures import UNITS, TinyNet, make_data
from worker.commit import vote_values
from worker.zero3.optim import device_sq_norm
from worker.zero3.plan import plan_model
from worker.zero3.reductions import grad_staging_count
from worker.zero3.sharded import ShardedModule

pytestmark = [pytest.mark.gpu, pytest.mark.timeout(180)]
DEVICE = torch.device("cuda:0")
SLACK_S = 0.5


def _group(epoch: int) -> PeerGroup:
    return PeerGroup("gpu", epoch, 0, ("127.0.0.1:1",))


def _sleep_cycles(seconds: float) -> int:
    """Clock cycles of `torch.cuda._sleep` that keep the current stream busy about `seconds`."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    torch.cuda._sleep(10**7)
    end.record()
    end.synchronize()
    return int(seconds * 1000 * 10**7 / max(start.elapsed_time(end), 1e-3))


@pytest.fixture
def lane() -> Iterator[TorchDistBackend]:
    torch.cuda.set_device(DEVICE)
    backend = TorchDistBackend(device=DEVICE, collective_timeout=30.0, rendezvous_timeout=30.0)
    try:
        yield backend
    finally:
        backend.close()


@pytest.fixture
def ends(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, bool]]:
    """Every group that really ended: (epoch, clean)."""
    seen: list[tuple[int, bool]] = []
    real = EpochGroup.end

    def spy(self: EpochGroup, *, clean: bool) -> bool:
        ended = real(self, clean=clean)
        if ended:
            seen.append((self.epoch, clean))
        return ended

    monkeypatch.setattr(EpochGroup, "end", spy)
    return seen


def _wait_for(cond: Any, limit: float = 30.0) -> None:
    deadline = time.monotonic() + limit
    while not cond():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.01)


def test_a_late_collective_times_out_is_aborted_once_and_the_next_epoch_forms(
    lane: TorchDistBackend, ends: list[tuple[int, bool]]
) -> None:
    shard = torch.arange(1, 5, dtype=torch.float32, device=DEVICE)
    lane.set_group(_group(1), f"127.0.0.1:{free_port()}")
    out = lane.all_gather(_group(1), 0, 0, shard, torch.empty(4, device=DEVICE), 60.0).wait(90)
    assert torch.equal(out, shard)
    assert os.environ["TORCH_NCCL_ASYNC_ERROR_HANDLING"] in ("0", "2")  # never a watchdog that kills
    torch.cuda._sleep(_sleep_cycles(4.0))  # the call's mark passes in 4 s: its event cannot pass in time
    t0 = time.monotonic()
    late = lane.all_gather(_group(1), 1, 0, shard, torch.empty(4, device=DEVICE), 0.5)
    with pytest.raises(CollectiveTimeout):
        late.wait(10)
    assert time.monotonic() - t0 < 0.5 + SLACK_S
    _wait_for(lambda: ends == [(1, False)])
    torch.cuda.synchronize()  # the sleep and whatever the aborted communicator left end
    time.sleep(1.0)
    assert ends == [(1, False)], "aborted exactly once"
    lane.set_group(_group(2), f"127.0.0.1:{free_port()}")
    again = lane.all_gather(_group(2), 0, 0, shard, torch.empty(4, device=DEVICE), 60.0).wait(90)
    assert torch.equal(again, shard)


def test_a_handle_orders_the_consumers_stream_not_the_host(lane: TorchDistBackend) -> None:
    shard = torch.arange(1, 9, dtype=torch.float32, device=DEVICE)
    lane.set_group(_group(1), f"127.0.0.1:{free_port()}")
    lane.all_gather(_group(1), 0, 0, shard, torch.empty(8, device=DEVICE), 60.0).wait(90)
    torch.cuda._sleep(_sleep_cycles(2.0))
    out = torch.empty(8, device=DEVICE)
    t0 = time.monotonic()
    handle = lane.all_gather(_group(1), 1, 0, shard, out, 30.0)
    assert handle.order_after(torch.cuda.current_stream(DEVICE), 10.0) is True
    doubled = out * 2  # queued behind the gather on the compute stream
    assert time.monotonic() - t0 < 1.0 and not handle.done(), "the host waited for the GPU"
    assert torch.equal(handle.wait(30), shard)
    assert torch.equal(doubled, shard * 2)


@pytest.mark.parametrize("reduce", ["ordered", "native"])
def test_both_reduce_scatters_on_one_rank(reduce: str) -> None:
    lane = TorchDistBackend(device=DEVICE, collective_timeout=30.0, rendezvous_timeout=30.0, reduce=reduce)
    try:
        lane.set_group(_group(1), f"127.0.0.1:{free_port()}")
        full = torch.randn(1000, device=DEVICE)
        out = lane.reduce_scatter(_group(1), 0, 0, full, torch.empty(1000, device=DEVICE), 60.0).wait(90)
        assert torch.equal(out, full)
        host = lane.reduce_scatter(_group(1), 1, 0, full.cpu(), torch.empty(1000), 60.0).wait(90)
        assert torch.equal(host, full.cpu())  # host tensors: staged in, copied out once completed
    finally:
        lane.close()


def test_a_training_pass_over_nccl_does_not_synchronise_the_host(lane: TorchDistBackend) -> None:
    lane.set_group(_group(1), f"127.0.0.1:{free_port()}")
    torch.manual_seed(0)
    model = TinyNet()
    engine = ShardedModule(
        model, _group(1), lane, device=DEVICE, plan=plan_model(model, 1, UNITS), timeout=60
    )
    assert {u.comm_device.type for u in engine.units} == {"cuda"}
    x, y = (t.to(DEVICE) for t in make_data(16))

    def step(s: int) -> tuple[torch.Tensor, torch.Tensor, Any]:
        engine.begin(s)
        loss = F.cross_entropy(engine(x), y, reduction="sum")
        loss.backward()
        engine.finish_backward()
        return loss, device_sq_norm(engine.grad_shards), engine.finite()

    step(0)  # formed, warmed up
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss, sq, finite = step(1)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert isinstance(finite, torch.Tensor) and finite.device == DEVICE
    vote = vote_values(loss, sq, finite)  # the step's one read of the device
    assert vote[2] == 1.0 and vote[0] > 0
    engine.close()


def test_gradient_staging_of_cuda_units_is_sized_to_the_plan() -> None:
    """On a lane that takes host memory (the fake lane) CUDA units stage their gradients in pinned
    buffers: one per unit here (a small model, far within the byte budget)."""
    torch.manual_seed(0)
    model = TinyNet()
    group = PeerGroup("gpu", 0, 0, ("127.0.0.1:9000",))
    backend = FakeHub(1).backend(0)
    engine = ShardedModule(model, group, backend, device=DEVICE, plan=plan_model(model, 1, UNITS), timeout=30)
    try:
        staging = engine.reductions.staging
        assert staging is not None and staging.pool.pin
        largest = max(u.plan.padded_numel for u in engine.units)
        assert staging.pool.count == grad_staging_count(len(engine.units), 4 * largest) == len(engine.units)
        x, y = (t.to(DEVICE) for t in make_data(16))
        engine.begin(0)
        F.cross_entropy(engine(x), y, reduction="sum").backward()
        engine.finish_backward()
        assert engine.staging_overflows == 0  # every unit in flight found a pooled buffer
    finally:
        engine.close()
        backend.close()
