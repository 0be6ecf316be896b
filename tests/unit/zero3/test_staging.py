"""The engine's bounded pool of host staging buffers (accelerator units), and the bound on outstanding
gathers it relies on, checked on the CPU (the engine's gather schedule does not depend on the device)."""

from __future__ import annotations

import pytest
import torch

from communication.group import PeerGroup
from communication.testing import FakeHub
from jobspec import JobSpec
from tests.unit.zero3.fixtures import UNITS, TinyNet, make_data, sharded_run
from worker.zero3.flat_unit import FlatUnit, UnitState
from worker.zero3.gathers import Gathers
from worker.zero3.sharded import STAGING_BUFFERS, ShardedModule
from worker.zero3.staging import StagingPool, cuda_fence

pytestmark = pytest.mark.timeout(60)


def test_pool_lends_at_most_count_buffers_and_reuses_them() -> None:
    pool = StagingPool(100, 2, pin=False)
    a, b = pool.acquire(100), pool.acquire(40)
    assert (a.numel(), b.numel()) == (100, 40) and a.dtype == torch.float32
    assert pool.allocated == 2 and pool.lent == 2 and pool.overflows == 0
    c = pool.acquire(70)  # all lent: a fresh buffer outside the pool, not a shared one
    assert pool.overflows == 1 and pool.allocated == 2
    assert c.numel() == 70 and c.data_ptr() not in (a.data_ptr(), b.data_ptr())
    pool.release(c)  # dropped
    assert pool.allocated == 2 and pool.lent == 2
    ptr = b.data_ptr()
    pool.release(b)
    assert pool.lent == 1 and pool.allocated == 2
    d = pool.acquire(90)
    assert d.data_ptr() == ptr and pool.allocated == 2  # reused, not allocated again
    pool.release(a)
    pool.release(d)
    assert pool.lent == 0 and pool.allocated == 2


def test_buffer_released_unreusable_leaves_the_pool() -> None:
    pool = StagingPool(10, 1, pin=False)
    a = pool.acquire(10)
    pool.release(a, reusable=False)  # the wire may still write it
    assert pool.allocated == 0 and pool.lent == 0
    b = pool.acquire(10)
    assert b.data_ptr() != a.data_ptr() and pool.allocated == 1 and pool.overflows == 0


class _Fence:
    """A device copy's fence: passed once ``done``; ``synchronize`` waits for it (here: completes it)."""

    def __init__(self) -> None:
        self.done = False
        self.waited = 0

    def query(self) -> bool:
        return self.done

    def synchronize(self) -> None:
        self.waited += 1
        self.done = True


def test_buffer_with_a_copy_in_flight_is_lent_only_once_its_fence_passed() -> None:
    pool = StagingPool(10, 2, pin=False)
    a = pool.acquire(10)
    fence_a = _Fence()
    pool.release(a, fence=fence_a)  # a device copy still reads a
    b = pool.acquire(10)  # the pool may grow: a new buffer rather than waiting
    assert b.data_ptr() != a.data_ptr() and pool.allocated == 2 and fence_a.waited == 0
    fence_b = _Fence()
    pool.release(b, fence=fence_b)
    fence_b.done = True  # b's copy completed, a's has not: b is lent, without waiting
    assert pool.acquire(10).data_ptr() == b.data_ptr() and fence_a.waited == 0
    # the pool is full and its only idle buffer is still read: lent once its fence was waited for
    c = pool.acquire(10)
    assert c.data_ptr() == a.data_ptr() and fence_a.waited == 1 and pool.overflows == 0


def test_pool_rejects_bad_sizes() -> None:
    with pytest.raises(ValueError, match="count"):
        StagingPool(10, 0, pin=False)
    pool = StagingPool(10, 1, pin=False)
    with pytest.raises(ValueError, match="pool of 10"):
        pool.acquire(11)
    with pytest.raises(ValueError, match="pool of 10"):
        pool.acquire(0)
    assert pool.allocated == 0


def test_cpu_engine_has_no_pool() -> None:
    seen: list[object] = []

    def probe(rank: int, engine: ShardedModule) -> None:
        seen.append(engine.staging)
        assert all(u.staging_pool is None and u._staging is None for u in engine.units)

    job = JobSpec.model_validate(dict(steps=1, global_batch=8, warmup_steps=0))
    sharded_run(TinyNet, job, 1, make_data(), units=UNITS, probe=probe)
    assert seen == [None]


def test_outstanding_gathers_fit_the_pool() -> None:
    """Gathers claimed but not yet used (landed or in flight) never exceed STAGING_BUFFERS - 1 in training,
    evaluation-style forward passes and state gathering: the pool never has to fall back."""
    peaks: list[int] = []
    original = Gathers.issue

    def issue(self: Gathers, unit: FlatUnit) -> None:
        original(self, unit)
        peaks.append(sum(u.state is UnitState.GATHERING for u in self.units))

    evals: dict[int, int] = {}

    def probe(rank: int, engine: ShardedModule) -> None:
        evals[rank] = evals.get(rank, 0) + 1
        with torch.no_grad():  # an evaluation pass, same key on every rank
            engine.begin(1000 + evals[rank])
            engine(make_data(4)[0])

    Gathers.issue = issue  # type: ignore[method-assign]
    try:
        job = JobSpec.model_validate(dict(steps=3, global_batch=12, warmup_steps=0))
        for world in (1, 2):
            sharded_run(TinyNet, job, world, make_data(), units=UNITS, probe=probe)
            evals.clear()
    finally:
        Gathers.issue = original  # type: ignore[method-assign]
    assert len(peaks) > 20 and 1 <= max(peaks) <= STAGING_BUFFERS - 1, max(peaks)


def test_a_fence_is_recorded_on_the_stream_of_the_tensors_device(monkeypatch: pytest.MonkeyPatch) -> None:
    """A copy to a unit on cuda:1 is enqueued on cuda:1's current stream: its fence must be recorded there,
    not on the current device's stream (cuda:0 by default), or it passes before the copy is done."""
    calls: list[object] = []

    class Event:
        def record(self, stream: object = None) -> None:
            calls.append(("record", stream))

    def current_stream(device: object = None) -> str:
        calls.append(("stream of", device))
        return f"stream of {device}"

    monkeypatch.setattr(torch.cuda, "Event", Event)
    monkeypatch.setattr(torch.cuda, "current_stream", current_stream)
    cuda_fence(torch.device("cuda", 1))
    assert calls == [("stream of", torch.device("cuda", 1)), ("record", "stream of cuda:1")]


def test_the_wire_copy_of_a_shard_is_made_once_per_change() -> None:
    """A unit whose lane takes host memory while its shard lives elsewhere (a GPU; stood in for here by a
    host shard and a lane said to take another device) copies the shard once per change, not per gather."""
    model = TinyNet()
    engine_units = ShardedModule(model, PeerGroup("j", 0, 0, ("127.0.0.1:1",)), FakeHub(1).backend(0)).units
    unit = engine_units[0]
    unit.comm_device = torch.device("meta")  # "not the shard's device": every gather needs a copy
    first = unit.shard_for_wire()
    assert first is not unit.shard and torch.equal(first, unit.shard)
    assert unit.shard_for_wire() is first  # forward, backward, a prefetch: the same copy
    unit.shard.add_(1.0)  # the optimizer's step changes the shard in place
    second = unit.shard_for_wire()
    assert second is not first and torch.equal(second, unit.shard) and not torch.equal(second, first)
    unit.shard = unit.shard.clone()  # a restore or a hand-over replaces it
    assert unit.shard_for_wire() is not second
