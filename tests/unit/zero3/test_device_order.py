"""The engine on a lane that runs its gathers on device streams (NCCL): it waits for a gather by ordering
its compute stream after it (``Handle.order_after``), never on the host, keeps one gather in flight
ahead, and reads every such gather's outcome once, at the end of the pass, where a failure raises.

Checked on the CPU with a lane whose gather handles are device-ordered and settle only when the test
lets them (the device "finishes" late): the data is there when ordered, as the device's stream order
would guarantee. What needs CUDA itself runs in tests/gpu/test_nccl_overlap.py."""

from __future__ import annotations

import threading
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from communication.backend import Codec
from communication.errors import PeerLost
from communication.group import PeerGroup
from communication.handle import Handle
from communication.testing import FakeBackend, FakeHub
from tests.unit.zero3.fixtures import UNITS, TinyNet, make_data
from worker.zero3.plan import plan_model
from worker.zero3.sharded import ShardedModule

pytestmark = pytest.mark.timeout(60)


class DeviceOrderedLane(FakeBackend):
    """The fake lane, its gathers answered as the NCCL lane answers them: issued on a "device stream" at
    once (the consumer's wait is recorded), settled only once `finish` is set (with `error`, if set)."""

    def __init__(self, hub: FakeHub) -> None:
        super().__init__(hub, 0)
        self.finish = threading.Event()
        self.error: BaseException | None = None
        self.ordered: list[int] = []
        self.handles: list[Handle] = []

    def all_gather(
        self,
        group: PeerGroup,
        step: int,
        unit: int,
        shard: torch.Tensor,
        out: torch.Tensor,
        timeout: float,
        *,
        codec: Codec = "none",
    ) -> Handle:
        inner = super().all_gather(group, step, unit, shard, out, timeout, codec=codec)
        outer = Handle()

        def order(stream: Any) -> None:
            inner.result(5)  # what the device's stream order guarantees: the data is there when used
            self.ordered.append(unit)

        outer.on_device(order)

        def settle() -> None:
            self.finish.wait(30)
            if self.error is not None:
                outer.set_exception(self.error)
            else:
                outer.set_result(inner.result(5))

        threading.Thread(target=settle, daemon=True).start()
        self.handles.append(outer)
        return outer


def _engine(lane: DeviceOrderedLane) -> ShardedModule:
    torch.manual_seed(0)
    model = TinyNet()
    group = PeerGroup("job", 0, 0, ("127.0.0.1:9000",))
    return ShardedModule(model, group, lane, plan=plan_model(model, 1, UNITS), timeout=20.0)


def _reference_grads() -> list[torch.Tensor]:
    """The same pass on the plain fake lane (gathers waited on the host)."""
    torch.manual_seed(0)
    model = TinyNet()
    group = PeerGroup("job", 0, 0, ("127.0.0.1:9000",))
    plan = plan_model(model, 1, UNITS)
    engine = ShardedModule(model, group, FakeHub(1).backend(0), plan=plan, timeout=20.0)
    x, y = make_data(8)
    engine.begin(0)
    F.cross_entropy(engine(x), y, reduction="sum").backward()
    engine.finish_backward()
    return [g.clone() for g in engine.grad_shards]


def test_gathers_are_awaited_on_the_device_and_read_once_at_the_end_of_the_pass() -> None:
    lane = DeviceOrderedLane(FakeHub(1))
    engine = _engine(lane)
    x, y = make_data(8)
    try:
        engine.begin(0)
        loss = F.cross_entropy(engine(x), y, reduction="sum")
        loss.backward()
        # the whole pass ran while no gather had settled: nothing waited for one on the host
        assert lane.handles and not any(h.done() for h in lane.handles)
        body = len(UNITS)  # gathered in forward and again in backward (the last ones kept), and the root
        assert len(lane.ordered) == len(lane.handles) >= body + 1
        assert engine.stats.gathers == len(lane.handles)
        lane.finish.set()
        engine.finish_backward()
        for got, want in zip(engine.grad_shards, _reference_grads(), strict=True):
            assert torch.equal(got, want)
    finally:
        lane.finish.set()
        engine.close()


def test_a_failed_gather_awaited_on_the_device_fails_the_pass() -> None:
    lane = DeviceOrderedLane(FakeHub(1))
    engine = _engine(lane)
    x, y = make_data(8)
    try:
        engine.begin(0)
        F.cross_entropy(engine(x), y, reduction="sum").backward()
        lane.error = PeerLost("rank 1 closed its connection")  # found by the lane once the pass was queued
        lane.finish.set()
        with pytest.raises(PeerLost, match="closed its connection"):
            engine.finish_backward()
        # the next pass starts clean
        lane.error = None
        engine.begin(1)
        F.cross_entropy(engine(x), y, reduction="sum").backward()
        engine.finish_backward()
    finally:
        lane.finish.set()
        engine.close()


def test_a_forward_only_pass_reads_its_gathers_before_its_outputs_are_used() -> None:
    lane = DeviceOrderedLane(FakeHub(1))
    engine = _engine(lane)
    x, _ = make_data(8)
    try:
        lane.error = PeerLost("gone")
        engine.begin(0)
        threading.Timer(0.1, lane.finish.set).start()
        with torch.no_grad(), pytest.raises(PeerLost):
            engine(x)
    finally:
        lane.finish.set()
        engine.close()


def test_device_waits_keep_outcomes_not_results() -> None:
    """A gathered unit is freed as soon as it is used: what the pass keeps of its gather is only whether
    it failed, read once at the end."""
    import gc
    import weakref

    from communication.errors import CollectiveTimeout
    from worker.zero3.device_waits import DeviceWaits

    waits = DeviceWaits()
    futs = [Handle() for _ in range(3)]
    results = [torch.empty(1000) for _ in futs]
    alive = [weakref.ref(r) for r in results]
    for fut in futs:
        waits.watch(fut)
    futs[0].set_result(results[0])
    futs[1].set_exception(PeerLost("first"))
    with pytest.raises(CollectiveTimeout):
        waits.settle(0.05)  # one has not settled
    futs[2].set_exception(PeerLost("second"))
    del futs, results
    gc.collect()
    assert [r() for r in alive] == [None, None, None], "the outcomes hold no result"
    with pytest.raises(PeerLost, match="first"):
        waits.settle(1.0)
    waits.settle(1.0)  # read once: nothing left
