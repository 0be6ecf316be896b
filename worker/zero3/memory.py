"""Per-worker memory of ZeRO-3 against data parallelism, computed from the partition plan.

Persistent bytes are what a worker keeps between steps: fp32 parameters, fp32 gradients and optimizer
state (SGD with momentum: one buffer; AdamW: two; SGD without momentum: none), plus the replicated buffers
(BatchNorm running statistics). ZeRO-3 keeps one shard of each unit (padding included); DDP keeps all of
it. The transient full parameters a ZeRO-3 worker materialises are bounded by the gathered units at once
(measured by ``ShardedModule.peak_full_bytes``); the plan's bound is the two largest units plus a prefetch.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from worker.zero3.plan import PartitionPlan

FP32 = 4


def optimizer_slots(optimizer: str, momentum: float) -> int:
    """fp32 state tensors per parameter."""
    if optimizer == "adamw":
        return 2
    if optimizer == "sgd":
        return 1 if momentum > 0 else 0
    raise ValueError(f"unknown optimizer {optimizer!r}")


@dataclass(frozen=True)
class MemoryFigures:
    world_size: int
    model_params: int
    zero3_param_bytes: int
    zero3_grad_bytes: int
    zero3_optim_bytes: int
    zero3_persistent_bytes: int
    ddp_persistent_bytes: int
    buffer_bytes: int
    full_param_bound_bytes: int  # two largest units + one prefetch (the largest)

    @property
    def ratio_vs_ddp(self) -> float:
        return self.zero3_persistent_bytes / self.ddp_persistent_bytes

    def as_dict(self) -> dict[str, float]:
        out: dict[str, float] = {k: float(v) for k, v in asdict(self).items()}
        out["ratio_vs_ddp"] = self.ratio_vs_ddp
        return out


def memory_figures(plan: PartitionPlan, optimizer: str, momentum: float, buffer_bytes: int) -> MemoryFigures:
    slots = optimizer_slots(optimizer, momentum)
    shard = plan.shard_numel * FP32
    zero3 = shard * (2 + slots) + buffer_bytes
    ddp = plan.numel * FP32 * (2 + slots) + buffer_bytes
    sizes = [*sorted((u.padded_numel * FP32 for u in plan.units), reverse=True), 0, 0]
    return MemoryFigures(
        world_size=plan.world_size,
        model_params=plan.numel,
        zero3_param_bytes=shard,
        zero3_grad_bytes=shard,
        zero3_optim_bytes=shard * slots,
        zero3_persistent_bytes=zero3,
        ddp_persistent_bytes=ddp,
        buffer_bytes=buffer_bytes,
        full_param_bound_bytes=sizes[0] + sizes[1] + sizes[0],
    )
