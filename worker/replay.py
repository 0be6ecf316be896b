"""Replay of a run's world-size schedule in one process: the parameters the workers computed, bit for bit.

Step ``s`` of the schedule ran on ``W_s`` ranks. The replay trains it as ``W_s`` micro-batches, one per rank
and in rank order, doing in one process exactly what the ranks and the flat reduce-scatter did
(``worker.trainer`` has the step semantics):

- rank ``r``'s micro-batch is ``rank_slice(global_batch, W_s, r)`` of the global batch of ``s`` (augmented
  with its offset), forwarded through the unit's parameters laid out as the engine gathers them (a fresh
  flat buffer padded for ``W_s``, cast to the job's ``param_dtype`` with normalization layers kept fp32);
  the loss is the SUM of per-sample cross-entropies in fp32;
- its gradient accumulates into a zeroed flat buffer per unit, as the engine's ``prepare_grad`` has it,
  converted to fp32 as a whole; the per-rank buffers are summed in fp32 in rank order,
  ``((g0 + g1) + g2) + ...``, the owner's order on the flat gRPC lane (``communication.accumulator``), and
  divided by the global batch;
- clipping uses what ``W_s`` ranks would compute: each rank's ``local_sq_norm`` of its own gradient shards
  (the shard layout of ``worker.zero3.plan`` at ``W_s``), summed over ranks in rank order;
- the optimizer (``ShardedOptimizer``, whose update is elementwise: an element gets the same bits wherever
  it sits) steps one full flat buffer per unit. A skipped step consumes its batch but computes nothing and
  does not call ``optimizer.step``: the learning rate follows the step index, and the optimizer's own step
  count (AdamW's bias correction) counts only the steps applied, as on the workers.
- the reported loss is the rank-order sum of the micro-batch losses over the global batch.

Bit-identity holds with compression ``none``, on the workers' device type and torch thread count (CPU
kernels may split their work, and so their sums, by thread; the tests check the CPU), and against the flat
rank-order sums of the gRPC lane, or of a single host's torch.distributed lane. The hierarchical lane
(several hosts with several workers each) adds inside a host first, then across hosts: its reduced
gradients equal the replay's within fp32 rounding per step, ``|hierarchical - flat| <= 2 (N - 1) 2^-24
sum_r |g_r|`` per value, and the difference then propagates through training. INT8 compression is not
replayed (the replay sums exact fp32 gradients).

BatchNorm: training normalizes with each micro-batch's statistics, as every rank does, so parameters match.
Running statistics are not replayed: the workers keep one set per rank and average them over ranks before
evaluation, checkpoints and the saved model, while the replay updates one set with every micro-batch in
rank order (its ``num_batches_tracked`` counts micro-batches). They do not affect parameters; compare
parameters only.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from jobspec import JobSpec
from worker.data import GlobalBatchSampler, job_dataset, rank_slice
from worker.models import build_model
from worker.zero3 import precision
from worker.zero3.durable import write_atomic
from worker.zero3.optim import ShardedOptimizer, clip_coefficient, local_sq_norm
from worker.zero3.plan import PartitionPlan, UnitPlan, plan_model
from worker.zero3.state import rank_order_sum

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ReplayStep:
    step: int
    world_size: int
    skipped: bool
    loss: float | None  # None for a skipped step
    lr: float | None


@dataclass(frozen=True)
class ReplayOutcome:
    steps_done: int
    skipped_steps: list[int]
    final_loss: float | None  # of the last step applied
    losses: list[float | None] = field(default_factory=list)


def check_schedule(job: JobSpec, world_sizes: Sequence[int], skipped_steps: Sequence[int]) -> None:
    """ValueError unless ``world_sizes`` (index = step) and ``skipped_steps`` fit ``job``."""
    if len(world_sizes) > job.steps:
        raise ValueError(f"the schedule has {len(world_sizes)} steps, the job only {job.steps}")
    for step, world in enumerate(world_sizes):
        if isinstance(world, bool) or not isinstance(world, int) or not 1 <= world <= job.global_batch:
            raise ValueError(
                f"world size of step {step} must be an integer in [1, {job.global_batch}], got {world!r}"
            )
    bad = [
        s
        for s in skipped_steps
        if isinstance(s, bool) or not isinstance(s, int) or not 0 <= s < len(world_sizes)
    ]
    if bad:
        raise ValueError(f"skipped steps must be steps of the schedule's {len(world_sizes)}: {bad[:5]}")


class Replay:
    """One process training ``job`` step by step at whatever world size each step had (see module doc)."""

    def __init__(
        self, job: JobSpec, *, device: torch.device | None = None, data_dir: Path | None = None
    ) -> None:
        self.job = job
        self.device = device or torch.device("cpu")
        self.data = job_dataset(job, data_dir)
        self.param_dtype = precision.param_dtype(job.param_dtype)
        torch.manual_seed(job.seed)  # the workers' initialisation: the same seeded construction
        self.model = build_model(job.model, self.data.num_classes, self.data.in_channels).to(self.device)
        self.model.train()
        self._plans: dict[int, PartitionPlan] = {}
        units = self._plan(1).units
        params = dict(self.model.named_parameters())
        self._params = [[params[s.name] for s in u.params] for u in units]
        self._keep = [
            frozenset(
                i
                for i, s in enumerate(u.params)
                if self.param_dtype != torch.float32 and precision.keeps_fp32(self.model, s.name)
            )
            for u in units
        ]
        # The master weights: one fp32 flat buffer per unit (the plan at world size 1 has no padding).
        self.masters: list[torch.Tensor] = []
        with torch.no_grad():
            for u, ps in zip(units, self._params, strict=True):
                flat = torch.empty(u.numel, dtype=torch.float32, device=self.device)
                for slot, p in zip(u.params, ps, strict=True):
                    flat[slot.offset : slot.offset + slot.numel].copy_(p.detach().reshape(-1))
                self.masters.append(flat)
        self._point_params(units, self.masters)
        self.optimizer = ShardedOptimizer(self.masters, job)
        self.sampler = GlobalBatchSampler(self.data.train_size, job.global_batch, job.seed)
        self.steps_done = 0

    # -- public --------------------------------------------------------------------------------------------
    def run(
        self,
        world_sizes: Sequence[int],
        skipped_steps: Sequence[int] = (),
        *,
        on_step: Callable[[ReplayStep], None] | None = None,
    ) -> ReplayOutcome:
        """Replay steps ``steps_done .. len(world_sizes) - 1``; ``world_sizes[s]`` ranks in step ``s``."""
        check_schedule(self.job, world_sizes, skipped_steps)
        skipped = set(skipped_steps)
        losses: list[float | None] = []
        final: float | None = None
        while self.steps_done < len(world_sizes):
            s = self.steps_done
            report = self.train_step(s, world_sizes[s], skipped=s in skipped)
            losses.append(report.loss)
            if report.loss is not None:
                final = report.loss
            if on_step is not None:
                on_step(report)
        return ReplayOutcome(self.steps_done, sorted(skipped), final, losses)

    def train_step(self, step: int, world_size: int, *, skipped: bool = False) -> ReplayStep:
        """Step ``step`` as ``world_size`` ranks would run it; a skipped step only consumes its batch."""
        if step != self.steps_done:
            raise ValueError(f"next step is {self.steps_done}, not {step}")
        job = self.job
        if not 1 <= world_size <= job.global_batch:
            raise ValueError(f"world size {world_size} outside [1, global_batch {job.global_batch}]")
        if skipped:
            self.steps_done = step + 1
            return ReplayStep(step, world_size, True, None, None)
        plan = self._plan(world_size)
        sums: list[torch.Tensor] = []
        losses: list[torch.Tensor] = []
        try:
            for rank in range(world_size):
                grads, loss = self._rank_pass(plan, step, rank)
                losses.append(loss)
                if rank == 0:
                    sums = grads
                else:  # the owner's order: ((g0 + g1) + g2) + ...
                    for acc, g in zip(sums, grads, strict=True):
                        acc.add_(g)
        finally:
            self._point_params(plan.units, self.masters)
        for g in sums:
            g.div_(job.global_batch)
        coef = 1.0
        if job.grad_clip > 0:
            norms = [local_sq_norm(self._rank_shards(plan, sums, r)).reshape(1) for r in range(world_size)]
            coef = clip_coefficient(float(rank_order_sum(norms)), job.grad_clip)
        loss_value = float(rank_order_sum(losses)) / job.global_batch
        lr = self.optimizer.step([g[: u.numel] for g, u in zip(sums, plan.units, strict=True)], step, coef)
        self.steps_done = step + 1
        logger.debug("replay step=%d world=%d loss=%.4f", step, world_size, loss_value)
        return ReplayStep(step, world_size, False, loss_value, lr)

    def parameters(self) -> dict[str, torch.Tensor]:
        """Every parameter (CPU copies of the fp32 master values), by state-dict name."""
        return {n: p.detach().to("cpu", copy=True) for n, p in self.model.named_parameters()}

    def save_model(self, path: Path) -> None:
        """The full model as safetensors with the plain model class's state-dict names (as the workers save
        it; the BatchNorm running statistics are the replay's, see the module doc)."""
        from safetensors.torch import save

        state = {k: v.detach().to("cpu").contiguous() for k, v in self.model.state_dict().items()}
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, save(state, metadata={"model": self.job.model}))
        logger.info("replay: saved model after %d steps to %s", self.steps_done, path)

    # -- internals -----------------------------------------------------------------------------------------
    def _plan(self, world_size: int) -> PartitionPlan:
        plan = self._plans.get(world_size)
        if plan is None:
            plan = self._plans[world_size] = plan_model(self.model, world_size)
        return plan

    def _rank_pass(
        self, plan: PartitionPlan, step: int, rank: int
    ) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Forward and backward of rank ``rank``'s micro-batch: its padded fp32 flat gradient per unit (as the
        engine hands it to the reduce-scatter) and its summed loss (fp32, one value)."""
        job, data = self.job, self.data
        idx = self.sampler.local_indices(step, plan.world_size, rank)
        x, y = data.train_batch(idx, step, rank_slice(job.global_batch, plan.world_size, rank)[0])
        x = self._to_device(x)
        y = y.to(self.device)
        grad_flats = [self._gather(k, u) for k, u in enumerate(plan.units)]
        out = self.model(x)
        loss = F.cross_entropy(out.float(), y, reduction="sum")
        loss.backward()
        grads = [
            self._flat_grad(k, u, flat)
            for k, (u, flat) in enumerate(zip(plan.units, grad_flats, strict=True))
        ]
        return grads, loss.detach().reshape(1).to("cpu", torch.float32)

    def _gather(self, k: int, unit: UnitPlan) -> torch.Tensor:
        """Point unit ``k``'s parameters at a fresh gathered buffer (padded for the unit's world size, in the
        compute dtype, normalization layers' parameters as fp32 copies) and their ``.grad`` at views of one
        zeroed flat buffer of that dtype, which the backward pass accumulates into; returns that buffer."""
        full = torch.zeros(unit.padded_numel, dtype=torch.float32, device=self.device)
        full[: unit.numel].copy_(self.masters[k])
        compute = full if self.param_dtype == torch.float32 else full.to(self.param_dtype)
        grad_flat = torch.zeros(unit.padded_numel, dtype=self.param_dtype, device=self.device)
        for i, (slot, p) in enumerate(zip(unit.params, self._params[k], strict=True)):
            if i in self._keep[k]:
                p.data = full[slot.offset : slot.offset + slot.numel].view(slot.shape).clone()
                p.grad = None
            else:
                p.data = compute[slot.offset : slot.offset + slot.numel].view(slot.shape)
                p.grad = grad_flat[slot.offset : slot.offset + slot.numel].view(slot.shape)
        return grad_flat

    def _flat_grad(self, k: int, unit: UnitPlan, flat: torch.Tensor) -> torch.Tensor:
        """The unit's padded fp32 gradient (``FlatUnit.flat_grad``): the flat buffer converted as a whole,
        gradients that landed elsewhere copied in, missing ones zero; clears ``.grad``."""
        wire = flat if flat.dtype == torch.float32 else flat.to(torch.float32)
        for slot, p in zip(unit.params, self._params[k], strict=True):
            in_flat = p.grad is not None and p.grad.data_ptr() == flat[slot.offset :].data_ptr()
            if not in_flat:
                part = wire[slot.offset : slot.offset + slot.numel]
                if p.grad is None:
                    part.zero_()
                else:
                    part.copy_(p.grad.reshape(-1))
            p.grad = None
        return wire

    @staticmethod
    def _rank_shards(plan: PartitionPlan, sums: list[torch.Tensor], rank: int) -> list[torch.Tensor]:
        """Rank ``rank``'s gradient shards at the plan's world size, each in its own buffer as on the rank."""
        out = []
        for unit, g in zip(plan.units, sums, strict=True):
            start, stop = unit.shard_range(rank)
            out.append(g[start:stop].clone())
        return out

    def _point_params(self, units: Sequence[UnitPlan], flats: list[torch.Tensor]) -> None:
        """Parameters as views of the master buffers (between steps: for saving and reading the model)."""
        for u, flat, ps in zip(units, flats, self._params, strict=True):
            for slot, p in zip(u.params, ps, strict=True):
                p.data = flat[slot.offset : slot.offset + slot.numel].view(slot.shape)
                p.grad = None

    def _to_device(self, x: torch.Tensor) -> torch.Tensor:
        """As the trainer: the compute dtype, channels_last for reduced precision on CUDA."""
        x = precision.cast_input(x.to(self.device), self.param_dtype)
        if self.device.type == "cuda" and self.param_dtype != torch.float32 and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        return x
