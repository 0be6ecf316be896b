"""Small models, data and a plain PyTorch reference loop for the ZeRO-3 engine tests."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from communication.group import PeerGroup
from communication.testing import FakeHub
from jobspec import JobSpec
from worker.zero3.optim import ShardedOptimizer
from worker.zero3.reductions import HostStaging
from worker.zero3.schedule import lr_at
from worker.zero3.sharded import ShardedModule
from worker.zero3.state import full_parameters


class Block(nn.Module):
    def __init__(self, ch: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(ch, ch, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(ch)
        self.conv2 = nn.Conv2d(ch, ch, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(ch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + x)


class TinyNet(nn.Module):
    """stem, two residual blocks, head, plus a root-level scale parameter outside every unit."""

    def __init__(self, ch: int = 6, classes: int = 5) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, ch, 3, padding=1, bias=False), nn.BatchNorm2d(ch), nn.ReLU())
        self.blocks = nn.ModuleList([Block(ch), Block(ch)])
        self.head = nn.Linear(ch, classes)
        self.scale = nn.Parameter(torch.ones(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x * self.scale)
        for b in self.blocks:
            x = b(x)
        return self.head(x.mean(dim=(2, 3)))


UNITS = ["stem", "blocks.0", "blocks.1", "head"]


def make_data(n: int = 96, classes: int = 5, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 8, 8, generator=g), torch.randint(0, classes, (n,), generator=g)


def batch_indices(step: int, n: int, batch: int, seed: int = 7) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed * 1000 + step)
    return torch.randperm(n, generator=g)[:batch]


def rank_slices(batch: int, world: int) -> list[slice]:
    base, extra = divmod(batch, world)
    out, start = [], 0
    for r in range(world):
        size = base + (1 if r < extra else 0)
        out.append(slice(start, start + size))
        start += size
    return out


def reference_run(
    make_model: Callable[[], nn.Module], job: JobSpec, world: int, data: tuple[torch.Tensor, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Plain PyTorch: N micro-batches per step, sum losses, backward each, sum grads in rank order, divide."""
    x, y = data
    torch.manual_seed(job.seed)
    model = make_model()
    opt = torch.optim.SGD(
        model.parameters(), lr=job.lr, momentum=job.momentum, dampening=0.0,
        weight_decay=job.weight_decay, nesterov=job.nesterov, foreach=False,
    )  # fmt: skip
    for step in range(job.steps):
        idx = batch_indices(step, x.shape[0], job.global_batch)
        opt.zero_grad(set_to_none=True)
        for sl in rank_slices(job.global_batch, world):
            F.cross_entropy(model(x[idx[sl]]), y[idx[sl]], reduction="sum").backward()
        for p in model.parameters():
            assert p.grad is not None
            p.grad.div_(job.global_batch)
        for group in opt.param_groups:
            group["lr"] = lr_at(job, step)
        opt.step()
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def mixed_reference_run(
    make_model: Callable[[], nn.Module],
    job: JobSpec,
    world: int,
    data: tuple[torch.Tensor, torch.Tensor],
    dtype: torch.dtype,
) -> dict[str, torch.Tensor]:
    """Plain PyTorch with the engine's mixed-precision policy written out: fp32 master parameters; per
    micro-batch the parameters (except normalization layers') and the input are cast to ``dtype``, the loss
    is fp32, each micro-batch's gradient is converted to fp32 and the micro-batches are summed in rank
    order; SGD updates the fp32 master."""
    from worker.zero3.precision import keeps_fp32

    x, y = data
    torch.manual_seed(job.seed)
    model = make_model()
    cast = [p for n, p in model.named_parameters() if not keeps_fp32(model, n)]
    opt = torch.optim.SGD(
        model.parameters(), lr=job.lr, momentum=job.momentum, dampening=0.0,
        weight_decay=job.weight_decay, nesterov=job.nesterov, foreach=False,
    )  # fmt: skip
    for step in range(job.steps):
        idx = batch_indices(step, x.shape[0], job.global_batch)
        opt.zero_grad(set_to_none=True)
        sums: list[torch.Tensor | None] = [None] * len(list(model.parameters()))
        for sl in rank_slices(job.global_batch, world):
            master = [p.data for p in cast]
            for p in cast:
                p.data = p.data.to(dtype)
            out = model(x[idx[sl]].to(dtype))
            F.cross_entropy(out.float(), y[idx[sl]], reduction="sum").backward()
            for p, m in zip(cast, master, strict=True):
                p.data = m
            for i, p in enumerate(model.parameters()):
                g = torch.zeros(p.shape) if p.grad is None else p.grad.float()
                acc = sums[i]
                sums[i] = g if acc is None else acc.add_(g)
                p.grad = None
        for p, total in zip(model.parameters(), sums, strict=True):
            assert total is not None
            p.grad = total.div_(job.global_batch)
        for group in opt.param_groups:
            group["lr"] = lr_at(job, step)
        opt.step()
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def sharded_run(
    make_model: Callable[[], nn.Module],
    job: JobSpec,
    world: int,
    data: tuple[torch.Tensor, torch.Tensor],
    units: list[str] | None = None,
    probe: Callable[[int, ShardedModule], None] | None = None,
    param_dtype: torch.dtype = torch.float32,
    host_staging: Callable[[], HostStaging] | None = None,
) -> list[dict[str, torch.Tensor]]:
    """The same training with ``world`` ranks as threads over a FakeHub; returns each rank's full params
    (compute in ``param_dtype``: inputs cast, loss in fp32; each rank's gradients staged through
    ``host_staging()`` when given)."""
    from worker.zero3.plan import plan_model

    x, y = data
    init_lock = threading.Lock()

    def worker(rank: int, hub: FakeHub, group: PeerGroup) -> dict[str, torch.Tensor]:
        backend = hub.backend(rank)
        with init_lock:
            torch.manual_seed(job.seed)
            model = make_model()
        plan = plan_model(model, world, units)
        staging = None if host_staging is None else host_staging()
        engine = ShardedModule(
            model, group, backend, plan=plan, timeout=20.0, param_dtype=param_dtype, host_staging=staging
        )
        opt = ShardedOptimizer(engine.shards, job)
        sl = rank_slices(job.global_batch, world)[rank]
        for step in range(job.steps):
            idx = batch_indices(step, x.shape[0], job.global_batch)[sl]
            engine.begin(step)
            out = engine(x[idx].to(param_dtype))
            F.cross_entropy(out.float(), y[idx], reduction="sum").backward()
            engine.finish_backward()
            opt.step([g.div(job.global_batch) for g in engine.grad_shards], step)
            backend.release(group, step)
            if probe is not None:
                probe(rank, engine)
        params = full_parameters(engine, job.steps)
        backend.close()
        return params

    results = run_ranks(world, worker)
    assert all(isinstance(r, dict) for r in results), "a rank did not finish"
    return results


def run_ranks(world: int, body: Callable[[int, FakeHub, PeerGroup], Any], timeout: float = 90.0) -> list[Any]:
    """Run `body(rank, hub, group)` for every rank of `world` as threads over one FakeHub (epoch 0); return
    the results in rank order, re-raising the first rank's exception."""
    hub = FakeHub(world)
    results: list[Any] = [None] * world
    addresses = tuple(f"127.0.0.1:{9000 + r}" for r in range(world))

    def target(rank: int) -> None:
        try:
            results[rank] = body(rank, hub, PeerGroup("job", 0, rank, addresses))
        except BaseException as exc:
            results[rank] = exc

    threads = [threading.Thread(target=target, args=(r,), daemon=True) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=timeout)
    for r in results:
        if isinstance(r, BaseException):
            raise r
    return results


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous().reshape(-1).view(torch.uint8)


def assert_bit_identical(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name].shape == b[name].shape, name
        assert torch.equal(bits(a[name]), bits(b[name])), (
            f"{name} differs (max {float((a[name] - b[name]).abs().max())})"
        )


def small_job(**kw: object) -> JobSpec:
    """The engine tests' job: SGD with momentum, weight decay and a cosine schedule over a few steps of a
    global batch of 13 (uneven over 2 and 3 ranks)."""
    base: dict[str, object] = dict(
        steps=6, global_batch=13, lr=0.05, momentum=0.9, weight_decay=5e-4, schedule="cosine", warmup_steps=2
    )
    base.update(kw)
    return JobSpec.model_validate(base)
