"""Meta-device construction: the shards a rank materializes equal, bit for bit, the ones it cut from an
eagerly built model with the same seed, and building them never holds the whole model."""

from __future__ import annotations

import threading
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch._C._autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from communication.group import PeerGroup
from communication.testing import FakeHub
from jobspec import JobSpec
from tests.unit.zero3.fixtures import (
    UNITS,
    TinyNet,
    assert_bit_identical,
    batch_indices,
    make_data,
    rank_slices,
    reference_run,
    run_ranks,
)
from worker.models import MODEL_NAMES, build_model
from worker.zero3.flat_unit import FlatUnit
from worker.zero3.materialize import build_sharded, materialize
from worker.zero3.optim import ShardedOptimizer
from worker.zero3.plan import PartitionPlan, plan_model
from worker.zero3.sharded import ShardedModule
from worker.zero3.state import full_parameters

pytestmark = pytest.mark.timeout(240)


def _eager(build: Callable[[], nn.Module], seed: int) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(seed)
    model = build()
    return model, torch.get_rng_state()


def _eager_shards(model: nn.Module, plan: PartitionPlan, rank: int) -> list[torch.Tensor]:
    """Today's path: every unit cuts its shard from the built model's parameters (copies of them: a unit
    empties the parameters it is given)."""
    params = {n: nn.Parameter(p.detach().clone()) for n, p in model.named_parameters()}
    cpu = torch.device("cpu")
    return [FlatUnit(u, [params[s.name] for s in u.params], rank, cpu).shard for u in plan.units]


def _assert_same_init(build: Callable[[], nn.Module], seed: int, worlds: tuple[int, ...]) -> None:
    model, rng_after = _eager(build, seed)
    buffers = dict(model.named_buffers())
    for world in worlds:
        plan = plan_model(model, world)
        for rank in range(world):
            torch.manual_seed(seed)
            made = materialize(build, world, rank)
            assert made.plan == plan
            assert torch.equal(torch.get_rng_state(), rng_after), "the generator must end where eager ends"
            want = _eager_shards(model, plan, rank)
            assert len(made.shards) == len(want)
            for unit, got, ref in zip(plan.units, made.shards, want, strict=True):
                assert got.dtype == ref.dtype == torch.float32
                assert torch.equal(got, ref), f"world {world} rank {rank} unit {unit.module!r}"
            got_buffers = dict(made.model.named_buffers())
            assert sorted(got_buffers) == sorted(buffers)
            for name, b in buffers.items():
                assert got_buffers[name].dtype == b.dtype and torch.equal(got_buffers[name], b), name
            assert all(p.numel() == 0 and p.device.type == "cpu" for p in made.model.parameters())


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_registry_models_shard_bit_identical(name: str) -> None:
    _assert_same_init(lambda: build_model(name, 10, 3), seed=1234, worlds=(1, 2, 3))


def test_custom_factories_and_root_parameters() -> None:
    """TinyNet: a root parameter from ``torch.ones``, a Linear with a bias, other seed and class count."""
    _assert_same_init(TinyNet, seed=5, worlds=(1, 2, 3))
    _assert_same_init(lambda: build_model("resnet8", 7, 1), seed=99, worlds=(2,))


def test_a_different_seed_gives_different_shards() -> None:
    """The comparison is sharp: the replay really depends on the generator state."""
    model, _ = _eager(lambda: build_model("resnet8"), 1)
    plan = plan_model(model, 2)
    torch.manual_seed(2)
    made = materialize(lambda: build_model("resnet8"), 2, 0)
    assert not torch.equal(made.shards[0], _eager_shards(model, plan, 0)[0])


class _DrawsOnCpu(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(3, device="cpu"))


class _UninitializedBuffer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(3))
        self.register_buffer("b", torch.tensor([1.0, 2.0]))


class _PartlyOnCpu(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 3)
        self.b = nn.Parameter(torch.arange(5.0, device="cpu"))
        self.register_buffer("c", torch.full((2,), 3.0, device="cpu"))


def test_tensors_built_off_the_meta_device_keep_their_values() -> None:
    _assert_same_init(_PartlyOnCpu, seed=3, worlds=(1, 2))


def test_unreplayable_builders_fail_clearly() -> None:
    with pytest.raises(RuntimeError, match="drew from the CPU generator"):
        materialize(_DrawsOnCpu, 1, 0)
    with pytest.raises(RuntimeError, match=r"\['b'\] never initialised"):
        materialize(_UninitializedBuffer, 1, 0)
    with pytest.raises(ValueError, match="ranks"):
        materialize(TinyNet, 2, 0, plan=plan_model(TinyNet(), 3))


def test_bad_shards_are_refused() -> None:
    made = materialize(TinyNet, 2, 0)
    hub = FakeHub(2)
    group = PeerGroup("job", 0, 0, ("127.0.0.1:9000", "127.0.0.1:9001"))
    with pytest.raises(ValueError, match="plan"):
        ShardedModule(made.model, group, hub.backend(0), shards=made.shards)
    bad = [s.double() for s in made.shards]
    with pytest.raises(ValueError, match=r"shard is torch\.float64"):
        ShardedModule(made.model, group, hub.backend(0), plan=made.plan, shards=bad)


def test_meta_built_engine_trains_bit_identical_to_plain_loop() -> None:
    job = JobSpec.model_validate(dict(steps=3, global_batch=13, lr=0.05, momentum=0.9, warmup_steps=1))
    data = make_data()
    ref = reference_run(TinyNet, job, 2, data)
    x, y = data
    init_lock = threading.Lock()

    def worker(rank: int, hub: FakeHub, group: PeerGroup) -> dict[str, torch.Tensor]:
        backend = hub.backend(rank)
        with init_lock:
            plan = plan_model(TinyNet(), 2, UNITS)  # draws from the generator: before seeding
            torch.manual_seed(job.seed)
            engine = build_sharded(TinyNet, group, backend, plan=plan, timeout=20.0)
        opt = ShardedOptimizer(engine.shards, job)
        sl = rank_slices(job.global_batch, 2)[rank]
        for step in range(job.steps):
            idx = batch_indices(step, x.shape[0], job.global_batch)[sl]
            engine.begin(step)
            F.cross_entropy(engine(x[idx]), y[idx], reduction="sum").backward()
            engine.finish_backward()
            opt.step([g.div(job.global_batch) for g in engine.grad_shards], step)
            backend.release(group, step)
        params = full_parameters(engine, job.steps)
        backend.close()
        return params

    for got in run_ranks(2, worker):
        assert_bit_identical(got, ref)


def _peak_bytes(fn: Callable[[], object]) -> tuple[int, object]:
    """Largest running sum of the CPU allocator events (bytes allocated minus freed) while ``fn`` runs on
    this thread, and its result (kept alive until the profiler stops)."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = fn()
    events = sorted(
        (ev.start_ns(), ev.nbytes())
        for ev in prof.profiler.kineto_results.events()
        if ev.name() == "[memory]" and ev.device_type() == DeviceType.CPU
    )
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak, result


@pytest.mark.parametrize(("name", "world"), [("resnet56", 4), ("resnet18", 4)])
def test_construction_peak_is_a_shard_plus_one_unit(name: str, world: int) -> None:
    """Peak tensor bytes while materializing rank 0 <= shards (full/N plus padding) + buffers + the largest
    unit; and well below the full model, which the eager build holds."""
    build = lambda: build_model(name, 10, 3)  # noqa: E731
    torch.manual_seed(0)
    peak, made = _peak_bytes(lambda: materialize(build, world, 0))
    assert isinstance(made, type(materialize(build, 1, 0)))
    plan = made.plan
    full = plan.numel * 4
    shards = plan.shard_numel * 4
    buffers = sum(b.numel() * b.element_size() for b in made.model.buffers())
    largest_unit = plan.max_unit_numel * 4
    assert made.replay_peak_bytes <= largest_unit
    assert peak <= shards + buffers + largest_unit, (peak, shards, buffers, largest_unit)
    assert peak < full // 2
    torch.manual_seed(0)
    eager_peak, _ = _peak_bytes(build)
    assert eager_peak >= full  # the measurement sees a whole model when one is built
