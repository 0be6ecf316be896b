"""A rank's shards of a model that is never built whole: the model is constructed on the meta device, its
seeded initialisation is replayed on CPU (:mod:`worker.zero3.meta_init`) and only this rank's slice of each
unit's flat buffer is kept.

``torch.manual_seed(s); materialize(build, world, rank)`` gives, bit for bit, the shards (padding zeroed) and
buffers that ``torch.manual_seed(s); ShardedModule(build(), ...)`` gives, and leaves the CPU generator in the
same state. Host memory while doing it: the shards (about ``P / N`` fp32 values for ``P`` parameters on
``N`` ranks), the buffers, and the values the replay holds at once (``Materialized.replay_peak_bytes``; for
the ResNets of ``worker.models`` the largest parameter), never the full model.

The returned module keeps its structure, hooks and parameter names; every parameter is an empty CPU tensor
(as it is in an engine between gathers) and every buffer is a real CPU tensor.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from communication.backend import CollectiveBackend
from communication.group import PeerGroup
from worker.zero3.meta_init import replay, storage_key, trace_build
from worker.zero3.plan import PartitionPlan, UnitsOf, plan_model, unit_names
from worker.zero3.sharded import ShardedModule

_Copy = Callable[[torch.Tensor], None]


@dataclass
class Materialized:
    model: nn.Module  # parameters empty, buffers materialized
    plan: PartitionPlan
    shards: list[torch.Tensor]  # per unit of the plan: this rank's fp32 shard
    replay_peak_bytes: int  # the most bytes of replayed values held at once


def _param_copy(p: torch.Tensor, shard: torch.Tensor, lo: int, hi: int, dst: int) -> _Copy:
    """Copy elements ``[lo, hi)`` of ``p`` (flattened) to ``shard[dst:]``, from its storage's final value."""

    def copy(flat: torch.Tensor) -> None:
        value = flat.as_strided(p.size(), p.stride(), p.storage_offset()).reshape(-1)
        shard[dst : dst + hi - lo].copy_(value[lo:hi])

    return copy


def _buffer_copy(module: nn.Module, name: str, b: torch.Tensor) -> _Copy:
    def copy(flat: torch.Tensor) -> None:
        module._buffers[name] = flat.as_strided(b.size(), b.stride(), b.storage_offset()).clone()

    return copy


def materialize(
    build: Callable[[], nn.Module],
    world_size: int,
    rank: int,
    *,
    plan: PartitionPlan | None = None,
    units: UnitsOf | None = None,
) -> Materialized:
    """Build with ``build()`` on the meta device and materialize rank ``rank``'s shards of ``plan`` (default
    :func:`plan_model` of the model for ``world_size`` ranks, with the unit modules ``units(model)`` names
    when given) and every buffer.

    Raises ``ValueError`` when the plan does not fit the model, ``RuntimeError`` when the construction cannot
    be replayed (it drew from the CPU generator outside meta tensors, or left a parameter or buffer without a
    recorded initialisation).
    """
    trace = trace_build(build)
    model = trace.model
    plan = plan or plan_model(model, world_size, None if units is None else unit_names(model, units))
    if plan.world_size != world_size:
        raise ValueError(f"plan is for {plan.world_size} ranks, not {world_size}")
    params = dict(model.named_parameters())
    missing = set(params) - set(plan.param_names())
    if missing:
        raise ValueError(f"parameters outside the plan: {sorted(missing)[:5]}")
    copies: dict[int, list[_Copy]] = {}
    names: dict[int, str] = {}
    shards: list[torch.Tensor] = []
    for unit in plan.units:
        shard = torch.zeros(unit.shard_numel, dtype=torch.float32)
        shards.append(shard)
        start, stop = unit.shard_range(rank)
        for slot in unit.params:
            p = params.get(slot.name)
            if p is None or tuple(p.shape) != slot.shape:
                found = None if p is None else tuple(p.shape)
                raise ValueError(f"parameter {slot.name} has shape {found}, plan says {slot.shape}")
            lo, hi = max(start, slot.offset), min(stop, slot.offset + slot.numel)
            names[storage_key(p)] = slot.name
            todo = copies.setdefault(storage_key(p), [])
            if lo < hi:
                todo.append(_param_copy(p, shard, lo - slot.offset, hi - slot.offset, lo - start))
    for prefix, module in model.named_modules():
        for name, b in module._buffers.items():
            if b is not None:
                names[storage_key(b)] = f"{prefix}.{name}" if prefix else name
                copies.setdefault(storage_key(b), []).append(_buffer_copy(module, name, b))

    def sink(key: int, flat: torch.Tensor) -> None:
        for copy in copies[key]:
            copy(flat)

    real = {storage_key(t): t for t in [*model.parameters(), *model.buffers()] if t.device.type != "meta"}
    for key, t in real.items():  # built on a device of its own: its value is already there
        n = t.untyped_storage().nbytes() // t.element_size()
        sink(key, torch.empty(0, dtype=t.dtype, device=t.device).set_(t.untyped_storage(), 0, (n,), (1,)))
        del names[key]
    peak = replay(trace, names, sink)
    _release_parameters(model)
    return Materialized(model, plan, shards, peak)


def _release_parameters(model: nn.Module) -> None:
    """Point every parameter at an empty CPU tensor (tied parameters stay one object) and check that no
    meta tensor is left in the module tree."""
    fresh: dict[int, nn.Parameter] = {}
    for module in model.modules():
        for name, p in module._parameters.items():
            if p is None:
                continue
            if id(p) not in fresh:
                fresh[id(p)] = nn.Parameter(torch.empty(0, dtype=p.dtype), requires_grad=p.requires_grad)
            module._parameters[name] = fresh[id(p)]
        for attr, value in vars(module).items():
            if isinstance(value, torch.Tensor) and value.device.type == "meta":
                raise RuntimeError(
                    f"{type(module).__name__}.{attr} is a meta tensor outside parameters/buffers"
                )


def build_sharded(
    build: Callable[[], nn.Module],
    group: PeerGroup,
    backend: CollectiveBackend,
    *,
    plan: PartitionPlan | None = None,
    units: UnitsOf | None = None,
    **engine_options: Any,
) -> ShardedModule:
    """A :class:`ShardedModule` (``engine_options`` are its keyword options) over the model ``build()``
    makes, never holding it whole (seed first, as for an eager build: the shards are those an eager build
    would give); ``units`` as for :func:`materialize`."""
    made = materialize(build, group.world_size, group.rank, plan=plan, units=units)
    return ShardedModule(made.model, group, backend, plan=made.plan, shards=made.shards, **engine_options)
