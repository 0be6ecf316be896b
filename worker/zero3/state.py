"""Whole-model state of a sharded module: gathering full parameters, loading them back into shards, the
replicated buffers (BatchNorm running statistics) and the exact exchange of small per-rank values.

Running-statistics policy: every rank updates its BatchNorm buffers from its own micro-batches while
training. Before evaluation, a checkpoint or saving the model, :func:`sync_buffers` replaces each rank's
floating-point buffers with their mean over ranks (fp32 sum in rank order, divided by the world size), so
every rank evaluates, checkpoints and saves the very same model. Integer buffers (``num_batches_tracked``)
advance identically on every rank and are left alone.

Small per-rank values and barriers travel on the contract's exact exchange under the keys of
``worker.zero3.channels``: int64 or float64, never compressed, every value bit for bit. fp32 values go as
float64 and come back as fp32 (exact both ways), so every sum over them is the fp32 sum it always was.
"""

from __future__ import annotations

import logging

import torch

from communication.backend import barrier as lane_barrier
from worker.zero3 import channels
from worker.zero3.channels import Channel, control_key
from worker.zero3.sharded import ShardedModule

logger = logging.getLogger(__name__)

__all__ = [
    "Channel",
    "barrier",
    "exchange_floats",
    "exchange_values",
    "full_parameters",
    "full_state_dict",
    "load_full_parameters",
    "rank_order_sum",
    "sync_buffers",
]


def exchange_values(
    engine: ShardedModule, step: int, channel: Channel, values: torch.Tensor
) -> list[torch.Tensor]:
    """Every rank's vector ``values`` (int64 or float64, the same length on every rank), in rank order,
    bit for bit."""
    flat = values.detach().reshape(-1).to("cpu")
    key = control_key(step, channel)
    handle = engine.backend.exchange(flat, group=engine.group, key=key, timeout=engine.timeout)
    engine._wait(handle)
    return list(handle.result().unbind(0))


def exchange_floats(
    engine: ShardedModule, step: int, channel: Channel, values: torch.Tensor
) -> list[torch.Tensor]:
    """Every rank's fp32 vector ``values``, in rank order, bit for bit (sent as float64, which holds every
    fp32 value exactly)."""
    vec = values.detach().reshape(-1).to("cpu", torch.float32)
    return [part.to(torch.float32) for part in exchange_values(engine, step, channel, vec.double())]


def barrier(engine: ShardedModule, step: int, slot: int) -> None:
    """Return once every rank has reached this point: every call a rank made before it has completed on
    that rank, so afterwards no peer still needs anything this rank served before the barrier (used before
    a rank may close its backend). ``slot``: the barrier's index among those of step key ``step``
    (``0 .. channels.BARRIER_SLOTS - 1``)."""
    key = control_key(step, Channel.BARRIER, slot)
    engine._wait(lane_barrier(engine.backend, group=engine.group, key=key, timeout=engine.timeout))


def rank_order_sum(parts: list[torch.Tensor]) -> torch.Tensor:
    acc = parts[0].clone()
    for p in parts[1:]:
        acc.add_(p)
    return acc


def _float_buffers(engine: ShardedModule) -> list[tuple[str, torch.Tensor]]:
    return channels.float_buffers(engine.model)


def sync_buffers(engine: ShardedModule, step: int) -> None:
    """Replace floating buffers by their mean over ranks (collective, key ``step``)."""
    buffers = _float_buffers(engine)
    if not buffers or engine.group.world_size == 1:
        return
    flat = torch.cat([b.detach().reshape(-1).to(torch.float32).cpu() for _, b in buffers])
    mean = rank_order_sum(exchange_floats(engine, step, Channel.BUFFERS, flat)).div_(engine.group.world_size)
    offset = 0
    with torch.no_grad():
        for _, b in buffers:
            n = b.numel()
            b.copy_(mean[offset : offset + n].view(b.shape))
            offset += n
    logger.debug("%s step=%d: averaged %d buffers", engine.group.describe(), step, len(buffers))


def full_parameters(engine: ShardedModule, step: int) -> dict[str, torch.Tensor]:
    """Every parameter in full (CPU copies of the fp32 master values, whatever the compute dtype),
    gathered unit by unit with key ``step`` (collective)."""
    engine.begin(step)
    out: dict[str, torch.Tensor] = {}
    for unit in engine.units:
        engine._ensure_ready(unit, master=True)
        for slot, p in zip(unit.plan.params, unit.params, strict=True):
            out[slot.name] = p.detach().to("cpu", copy=True)
        engine._free(unit)
    return out


def full_state_dict(engine: ShardedModule, step: int, *, sync: bool = True) -> dict[str, torch.Tensor]:
    """A state dict for the plain model class (parameters and buffers, averaged over ranks unless
    ``sync`` is false because the caller just did; collective)."""
    if sync:
        sync_buffers(engine, step)
    params = full_parameters(engine, step)
    state: dict[str, torch.Tensor] = {}
    for name, value in engine.model.state_dict(keep_vars=True).items():
        state[name] = params[name] if name in params else value.detach().to("cpu", copy=True)
    return state


def load_full_parameters(engine: ShardedModule, tensors: dict[str, torch.Tensor]) -> None:
    """Set this rank's shards from full parameters (e.g. a checkpoint written at another world size).

    Every tensor is checked before anything changes; a missing, extra or misshapen one raises ValueError.
    """
    expected = {s.name: s.shape for u in engine.plan.units for s in u.params}
    missing = sorted(set(expected) - set(tensors))
    extra = sorted(set(tensors) - set(expected))
    if missing or extra:
        raise ValueError(f"parameters do not match the model: missing {missing[:5]}, unexpected {extra[:5]}")
    for name, shape in expected.items():
        if tuple(tensors[name].shape) != shape:
            raise ValueError(f"parameter {name} has shape {tuple(tensors[name].shape)}, expected {shape}")
    rank = engine.group.rank
    with torch.no_grad():
        for unit in engine.units:
            flat = torch.zeros(unit.plan.padded_numel, dtype=torch.float32)
            for slot in unit.plan.params:
                flat[slot.offset : slot.offset + slot.numel].copy_(tensors[slot.name].reshape(-1))
            start, stop = unit.plan.shard_range(rank)
            unit.shard.copy_(flat[start:stop])
