"""ShardedOptimizer against torch.optim on the unsharded parameters: bit for bit, at several world sizes."""

from __future__ import annotations

import math

import pytest
import torch

from jobspec import JobSpec
from worker.zero3.optim import ShardedOptimizer, clip_coefficient, local_sq_norm
from worker.zero3.schedule import lr_at

# Awkward sizes: odd lengths, one element, and one tensor large enough for the multi-threaded kernel path.
UNITS: list[list[tuple[int, ...]]] = [
    [(7, 3, 3, 3), (13,), (1,)],
    [(5, 17), (33,), (3, 1, 1, 5)],
    [(301, 233), (29,)],
]

CONFIGS: dict[str, dict[str, object]] = {
    "sgd-plain": dict(optimizer="sgd", momentum=0.0, weight_decay=0.0, nesterov=False, schedule="cosine"),
    "sgd-momentum-wd": dict(
        optimizer="sgd", momentum=0.9, weight_decay=5e-4, nesterov=False, schedule="step"
    ),
    "sgd-nesterov-wd": dict(
        optimizer="sgd", momentum=0.85, weight_decay=1e-3, nesterov=True, schedule="cosine"
    ),
    "adamw": dict(optimizer="adamw", lr=3e-3, weight_decay=0.05, betas=(0.9, 0.98), schedule="cosine"),
    "adamw-constant-nowd": dict(optimizer="adamw", lr=1e-3, weight_decay=0.0, schedule="constant"),
}

STEPS = 6


def make_job(**kw: object) -> JobSpec:
    base: dict[str, object] = dict(steps=8, warmup_steps=2, step_size=3, gamma=0.5, lr=0.05)
    base.update(kw)
    return JobSpec(**base)  # type: ignore[arg-type]


def padded(n: int, world: int) -> int:
    return -(-n // world) * world


def flatten(tensors: list[torch.Tensor], world: int) -> torch.Tensor:
    flat = torch.cat([t.reshape(-1) for t in tensors])
    out = torch.zeros(padded(flat.numel(), world), dtype=torch.float32)
    out[: flat.numel()] = flat
    return out


def shard(flat: torch.Tensor, world: int, rank: int) -> torch.Tensor:
    size = flat.numel() // world
    return flat[rank * size : (rank + 1) * size]


def unflatten(flat: torch.Tensor, shapes: list[tuple[int, ...]]) -> list[torch.Tensor]:
    out, pos = [], 0
    for s in shapes:
        n = math.prod(s)
        out.append(flat[pos : pos + n].reshape(s))
        pos += n
    return out


def random_params(seed: int) -> list[list[torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(s, generator=g) for s in unit] for unit in UNITS]


def random_grads(seed: int, step: int) -> list[list[torch.Tensor]]:
    g = torch.Generator().manual_seed(seed * 1000 + step)
    return [[torch.randn(s, generator=g) * 0.1 for s in unit] for unit in UNITS]


def reference_optimizer(job: JobSpec, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    """What a plain PyTorch loop uses (documented in worker/zero3/optim.py)."""
    if job.optimizer == "sgd":
        return torch.optim.SGD(
            params,
            lr=job.lr,
            momentum=job.momentum,
            dampening=0,
            weight_decay=job.weight_decay,
            nesterov=job.nesterov,
            foreach=False,
        )
    return torch.optim.AdamW(
        params,
        lr=job.lr,
        betas=job.betas,
        eps=1e-8,
        weight_decay=job.weight_decay,
        amsgrad=False,
        foreach=False,
    )


def run_reference(
    job: JobSpec, seed: int, steps: int, coefs: list[float] | None = None
) -> list[list[torch.Tensor]]:
    """torch.optim on the unsharded tensors; ``coefs[step]`` (if given) scales that step's gradients."""
    units = [[torch.nn.Parameter(t.clone()) for t in unit] for unit in random_params(seed)]
    flat_params = [p for unit in units for p in unit]
    opt = reference_optimizer(job, flat_params)
    for step in range(steps):
        grads = random_grads(seed, step)
        coef = 1.0 if coefs is None else coefs[step]
        for p, g in zip(flat_params, [g for unit in grads for g in unit], strict=True):
            p.grad = g if coef == 1.0 else g.mul(coef)
        for group in opt.param_groups:
            group["lr"] = lr_at(job, step)
        opt.step()
    return [[p.detach() for p in unit] for unit in units]


class ShardedRun:
    """All ranks of one world size, each with its own ShardedOptimizer over its shards."""

    def __init__(self, job: JobSpec, seed: int, world: int) -> None:
        self.job, self.seed, self.world = job, seed, world
        self.full = [flatten(unit, world) for unit in random_params(seed)]
        self.shards = [[shard(f, world, r).clone() for f in self.full] for r in range(world)]
        self.opts = [ShardedOptimizer(self.shards[r], job) for r in range(world)]
        self.coefs: list[float] = []

    def step(self, step: int, clip: bool = False) -> None:
        full_grads = [flatten(unit, self.world) for unit in random_grads(self.seed, step)]
        rank_grads = [[shard(g, self.world, r) for g in full_grads] for r in range(self.world)]
        coef = 1.0
        if clip:
            total = 0.0
            for r in range(self.world):  # rank order, as the engine sums them
                total += float(local_sq_norm(rank_grads[r]))
            coef = clip_coefficient(total, self.job.grad_clip)
        self.coefs.append(coef)
        for r in range(self.world):
            lr = self.opts[r].step(rank_grads[r], step, clip_coef=coef)
            assert lr == lr_at(self.job, step)

    def full_params(self) -> list[torch.Tensor]:
        return [torch.cat([self.shards[r][k] for r in range(self.world)]) for k in range(len(UNITS))]


def assert_bit_identical(run: ShardedRun, ref: list[list[torch.Tensor]]) -> None:
    for k, (flat, ref_unit) in enumerate(zip(run.full_params(), ref, strict=True)):
        n = sum(t.numel() for t in ref_unit)
        assert torch.all(flat[n:] == 0), f"unit {k}: padding is no longer zero"
        for i, (got, want) in enumerate(
            zip(unflatten(flat, [tuple(t.shape) for t in ref_unit]), ref_unit, strict=True)
        ):
            ndiff = int((got != want).sum())
            assert torch.equal(got, want), f"unit {k} tensor {i}: {ndiff} elements differ (world {run.world})"


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_bit_identical_to_torch_optim_at_world_sizes_2_3_4(name: str) -> None:
    job = make_job(**CONFIGS[name])
    ref = run_reference(job, seed=1, steps=STEPS)
    # The run must actually move the parameters, or the comparison proves nothing.
    start = random_params(1)
    assert any(
        not torch.equal(a, b) for ua, ub in zip(ref, start, strict=True) for a, b in zip(ua, ub, strict=True)
    )
    for world in (1, 2, 3, 4):
        run = ShardedRun(job, seed=1, world=world)
        for step in range(STEPS):
            run.step(step)
        assert_bit_identical(run, ref)


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_active_clipping_is_bit_identical_given_the_same_coefficient(optimizer: str) -> None:
    """The clip multiply and the step match torch.optim exactly; only the norm's summation order differs."""
    job = make_job(optimizer=optimizer, grad_clip=1.0, momentum=0.9, nesterov=True, weight_decay=1e-4)
    run = ShardedRun(job, seed=2, world=3)
    for step in range(STEPS):
        run.step(step, clip=True)
    assert all(c < 0.5 for c in run.coefs), run.coefs  # clipping really bites every step
    assert_bit_identical(run, run_reference(job, seed=2, steps=STEPS, coefs=run.coefs))
    # The sharded fp32 rank-order norm agrees closely with a float64 norm of the unsharded gradients.
    for step, coef in enumerate(run.coefs):
        total = sum(float(g.double().square().sum()) for unit in random_grads(2, step) for g in unit)
        assert coef == pytest.approx(clip_coefficient(total, job.grad_clip), rel=1e-6)
    # An inactive clip (coefficient 1) leaves the run exactly as without clipping.
    loose = make_job(optimizer=optimizer, grad_clip=1e9, momentum=0.9, nesterov=True, weight_decay=1e-4)
    run = ShardedRun(loose, seed=2, world=2)
    for step in range(STEPS):
        run.step(step, clip=True)
    assert run.coefs == [1.0] * STEPS
    assert_bit_identical(run, run_reference(loose, seed=2, steps=STEPS))


def test_active_clipping_matches_clip_grad_norm_closely() -> None:
    grads = [g for unit in random_grads(3, 0) for g in unit]
    total_norm = math.sqrt(sum(float(g.double().square().sum()) for g in grads))
    max_norm = total_norm / 4  # clipping must bite
    for world in (2, 3, 4):
        full = [flatten(unit, world) for unit in random_grads(3, 0)]
        total = 0.0
        for r in range(world):
            total += float(local_sq_norm([shard(f, world, r) for f in full]))
        coef = clip_coefficient(total, max_norm)
        assert coef < 0.3
        params = [torch.nn.Parameter(torch.zeros_like(g)) for g in grads]
        for p, g in zip(params, grads, strict=True):
            p.grad = g.clone()
        torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=False)
        for g, p in zip(grads, params, strict=True):
            assert p.grad is not None and not torch.equal(p.grad, g)
            torch.testing.assert_close(g.mul(coef), p.grad, rtol=1e-5, atol=1e-7)


def test_clip_coefficient_rules() -> None:
    assert clip_coefficient(1e12, 0.0) == 1.0  # disabled
    assert clip_coefficient(0.25, 1.0) == 1.0  # norm 0.5 < 1: unchanged
    assert clip_coefficient(16.0, 1.0) == pytest.approx(0.25, rel=1e-6)
    assert clip_coefficient(0.0, 1.0) == 1.0
    with pytest.raises(ValueError, match="not finite"):
        clip_coefficient(float("inf"), 1.0)
    with pytest.raises(ValueError, match="not finite"):
        clip_coefficient(float("nan"), 1.0)
    with pytest.raises(ValueError):
        clip_coefficient(1.0, -1.0)


def test_local_sq_norm_is_fp32_sum_of_squares() -> None:
    a = torch.tensor([3.0, 0.0, 0.0])
    b = torch.tensor([4.0])
    out = local_sq_norm([a, b])
    assert out.dtype == torch.float32 and out.dim() == 0 and float(out) == 25.0
    assert float(local_sq_norm([])) == 0.0
    with pytest.raises(ValueError):
        local_sq_norm([torch.ones(3, dtype=torch.float64)])


@pytest.mark.parametrize("name", ["sgd-nesterov-wd", "adamw", "sgd-plain"])
def test_state_round_trip_and_reshard_continue_bit_exactly(name: str) -> None:
    """State saved after 3 steps at world 3, re-sharded to world 2, then continued: same bits as before."""
    job = make_job(**CONFIGS[name])
    ref = run_reference(job, seed=4, steps=STEPS)
    old = ShardedRun(job, seed=4, world=3)
    for step in range(3):
        old.step(step)
    states = [o.state_tensors() for o in old.opts]
    assert all(int(s["step"]) == 3 for s in states)
    names = sorted({key.split(".", 1)[1] for s in states for key in s if key != "step"})
    expected = {"sgd-plain": [], "adamw": ["exp_avg", "exp_avg_sq"]}.get(name, ["momentum_buffer"])
    assert names == expected

    new = ShardedRun(job, seed=4, world=2)
    full_params = old.full_params()
    for k in range(len(UNITS)):
        n = sum(math.prod(s) for s in UNITS[k])
        refilled = torch.zeros(padded(n, 2))
        refilled[:n] = full_params[k][:n]
        for r in range(2):
            new.shards[r][k].copy_(shard(refilled, 2, r))
    for r in range(2):
        new_state: dict[str, torch.Tensor] = {"step": states[0]["step"].clone()}
        for k in range(len(UNITS)):
            n = sum(math.prod(s) for s in UNITS[k])
            for state_name in names:
                full = torch.cat([s[f"u{k}.{state_name}"] for s in states])[:n]
                new_state[f"u{k}.{state_name}"] = shard(flatten([full], 2), 2, r).clone()
        new.opts[r].load_state_tensors(new_state)
        assert new.opts[r].steps_done == 3
    for step in range(3, STEPS):
        new.step(step)
    assert_bit_identical(new, ref)


def test_bad_input_raises_and_changes_nothing() -> None:
    job = make_job(optimizer="adamw")
    shards = [torch.randn(10), torch.randn(3)]
    before = [s.clone() for s in shards]
    opt = ShardedOptimizer(shards, job)
    with pytest.raises(ValueError, match="expected 2"):
        opt.step([torch.randn(10)], 0)
    with pytest.raises(ValueError, match="gradient u1"):
        opt.step([torch.randn(10), torch.randn(4)], 0)
    with pytest.raises(ValueError, match="gradient u0"):
        opt.step([torch.randn(10, dtype=torch.float64), torch.randn(3)], 0)
    with pytest.raises(ValueError, match="clip_coef"):
        opt.step([torch.randn(10), torch.randn(3)], 0, clip_coef=float("nan"))
    assert all(torch.equal(a, b) for a, b in zip(shards, before, strict=True))
    assert opt.steps_done == 0

    opt.step([torch.randn(10), torch.randn(3)], 0)
    good = {k: v.clone() for k, v in opt.state_tensors().items()}
    snapshot = [s.clone() for s in shards]
    bad_cases = [
        {k: v for k, v in good.items() if k != "step"},
        {k: v for k, v in good.items() if k != "u1.exp_avg"},
        {**good, "u1.exp_avg": torch.zeros(4)},
        {**good, "u2.exp_avg": torch.zeros(3)},
        {"step": torch.tensor(5)},
        {**good, "step": torch.tensor(1.5)},
    ]
    for bad in bad_cases:
        with pytest.raises(ValueError):
            opt.load_state_tensors(bad)
    after = opt.state_tensors()
    assert set(after) == set(good) and all(torch.equal(after[k], good[k]) for k in good)
    assert all(torch.equal(a, b) for a, b in zip(shards, snapshot, strict=True))


def test_rejects_bad_shards_and_settings() -> None:
    with pytest.raises(ValueError, match="1-D float32"):
        ShardedOptimizer([torch.zeros(2, 2)], make_job())
    with pytest.raises(ValueError, match="1-D float32"):
        ShardedOptimizer([torch.zeros(4, dtype=torch.float64)], make_job())
    with pytest.raises(ValueError, match="nesterov"):
        ShardedOptimizer([torch.zeros(4)], make_job(nesterov=True, momentum=0.0))


def test_updates_in_place_on_views_of_a_larger_buffer() -> None:
    buf = torch.randn(20)
    view = buf[5:12]
    before = buf.clone()
    opt = ShardedOptimizer([view], make_job(optimizer="sgd", momentum=0.0, weight_decay=0.0, warmup_steps=0))
    lr = opt.step([torch.ones(7)], 0)
    assert lr == pytest.approx(0.05)
    assert torch.equal(buf[:5], before[:5]) and torch.equal(buf[12:], before[12:])
    assert torch.equal(buf[5:12], before[5:12] - torch.tensor(lr, dtype=torch.float32))
