"""Handing shards over when the membership changes: re-partition for a new world size, mirror to buddies.

State tensors are named as in checkpoints: ``u{k}.param`` (a rank's flat fp32 shard of unit k),
``u{k}.<state>`` (optimizer state of the same layout) and ``step`` (optimizer steps applied).

**Re-partition** (:func:`repartition`, collective over the new epoch's group, unit by unit): each member
fills one padded buffer per unit with the ranges of the old shards it supplies (its own, or the replica of a
dead ward) and ``-0.0`` everywhere else, and the members reduce-scatter it uncompressed on the unit's
hand-over channel. Every element has exactly one supplier and ``x + (-0.0) == x`` for every ``x``, in any
order, so each member receives its new shard bit for bit on every lane, and holds at most one unit's
buffers at a time. Members that supply nothing (joiners) just contribute ``-0.0``.

**Replication** (:func:`replicate`): after any formation every rank sends its shard bundle (every unit's
carried tensors) to its buddy in one point-to-point message, and builds its ward's replica from what it
receives.
"""

from __future__ import annotations

import logging

import torch

from communication.backend import UnitSpec
from jobspec import JobSpec
from worker.buddy import Replica, buddy_ranks, swap, ward_of
from worker.zero3.channels import Channel, channel_specs, float_buffers, handover_unit
from worker.zero3.optim import ShardedOptimizer, state_names
from worker.zero3.plan import shard_range
from worker.zero3.sharded import ShardedModule
from worker.zero3.state import exchange_floats, exchange_values, rank_order_sum

logger = logging.getLogger(__name__)

REPLICA_KEY = 1 << 30  # p2p key of the replica bundle (buddy gradients use the step number)


def carried(job: JobSpec) -> list[str]:
    """Names carried per unit: the parameter shard and every optimizer-state tensor (zeros until the
    state exists, see :func:`has_state`)."""
    return ["param", *state_names(job)]


def has_state(job: JobSpec, opt_steps: int) -> bool:
    """Whether the optimizer keeps per-unit state after ``opt_steps`` steps."""
    return opt_steps > 0 and (job.optimizer == "adamw" or job.momentum != 0)


def own_state(engine: ShardedModule, optimizer: ShardedOptimizer) -> dict[str, torch.Tensor]:
    """This rank's state tensors (live: copy what must outlive the next step)."""
    out = {f"u{u.index}.param": u.shard for u in engine.units}
    out.update(optimizer.state_tensors())
    return out


def declare(engine: ShardedModule, job: JobSpec) -> None:
    """Extend the epoch's declared plan with one hand-over channel per unit. Every member does so before
    its first collective of the epoch, so no peer's hand-over can arrive before the plan admits it."""
    names = len(carried(job))
    handover = {u.index: names * u.plan.shard_numel for u in engine.units}
    plan: dict[int, UnitSpec] = dict(engine.wire_plan())
    plan.update(channel_specs(handover))
    engine.backend.set_plan(engine.group, plan)


def repartition(
    engine: ShardedModule,
    optimizer: ShardedOptimizer,
    job: JobSpec,
    sources: dict[int, dict[str, torch.Tensor]],
    old_world: int,
    opt_steps: int,
    key: int,
) -> None:
    """Collective: load this rank's new shards and optimizer state from the old layout's shards (``sources``:
    old rank -> state tensors, for the old ranks this rank supplies; ``{}`` for a joiner)."""
    names = carried(job)
    group, backend = engine.group, engine.backend
    world = group.world_size
    state: dict[str, torch.Tensor] = {"step": torch.tensor(opt_steps, dtype=torch.int64)}
    new_params: list[torch.Tensor] = []
    for u in engine.units:
        n, size = u.plan.numel, u.plan.shard_numel
        full = torch.full((len(names), u.plan.padded_numel), -0.0, dtype=torch.float32)
        for old, tensors in sources.items():
            lo, hi = shard_range(n, old_world, old)
            hi = min(hi, n)
            for j, name in enumerate(names):
                if lo < hi:
                    full[j, lo:hi] = tensors[f"u{u.index}.{name}"][: hi - lo].to("cpu", torch.float32)
        wire = full.view(len(names), world, size).transpose(0, 1).contiguous().view(-1)
        del full
        out = torch.empty(len(names) * size, dtype=torch.float32)
        fut = backend.reduce_scatter(
            group, key, handover_unit(u.index), wire, out, engine.timeout, codec="none"
        )
        engine._wait(fut)
        del wire
        parts = out.view(len(names), size)
        valid = max(0, min(size, n - group.rank * size))
        parts[:, valid:] = 0.0  # the padding is exactly zero
        new_params.append(parts[0])
        for j, name in enumerate(names[1:], start=1):
            if has_state(job, opt_steps):
                state[f"u{u.index}.{name}"] = parts[j]
    optimizer.load_state_tensors(state)  # validates before changing anything
    with torch.no_grad():
        for u, p in zip(engine.units, new_params, strict=True):
            u.shard.copy_(p)


def replicate(
    engine: ShardedModule, optimizer: ShardedOptimizer, job: JobSpec, opt_steps: int
) -> Replica | None:
    """Send this rank's bundle to its buddy and build the replica of its ward (None in a world of one)."""
    group, backend = engine.group, engine.backend
    buddies = buddy_ranks(group.host_ids, group.world_size)
    ward = ward_of(buddies, group.rank)
    if ward is None:
        return None
    names = carried(job)
    mine = own_state(engine, optimizer)
    parts = []
    for u in engine.units:
        zeros = torch.zeros(u.plan.shard_numel, dtype=torch.float32)
        parts += [mine.get(f"u{u.index}.{name}", zeros).detach().reshape(-1).cpu() for name in names]
    bundle = torch.cat(parts)
    got = torch.empty_like(bundle)
    swap(backend, group, bundle, got, buddies, REPLICA_KEY, engine.timeout)
    tensors: dict[str, torch.Tensor] = {"step": torch.tensor(opt_steps, dtype=torch.int64)}
    offset = 0
    for u in engine.units:
        for j, name in enumerate(names):
            part = got[offset : offset + u.plan.shard_numel]
            offset += u.plan.shard_numel
            if j == 0 or has_state(job, opt_steps):
                tensors[f"u{u.index}.{name}"] = part
    return Replica.load(ward, tensors, len(engine.units), job)


def adopt_buffers(engine: ShardedModule, key: int, holder: bool) -> None:
    """Collective: every rank's floating buffers (BatchNorm statistics) become the rank-order mean of those
    of the ranks that held state (joiners bring none worth keeping)."""
    buffers = float_buffers(engine.model)
    if not buffers:
        return
    flat = torch.cat([b.detach().reshape(-1).float().cpu() for _, b in buffers])
    flags = exchange_values(engine, key, Channel.HOLDERS, torch.tensor([1 if holder else 0]))
    parts = exchange_floats(engine, key, Channel.ADOPT, flat)
    chosen = [p for p, f in zip(parts, flags, strict=True) if int(f) == 1]
    if not chosen:
        return
    mean = rank_order_sum(chosen).div_(len(chosen))
    with torch.no_grad():
        for (_, b), part in zip(buffers, mean.split([b.numel() for _, b in buffers]), strict=True):
            b.copy_(part.view_as(b))
