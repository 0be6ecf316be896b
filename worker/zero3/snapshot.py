"""Checkpoint and resume of a sharded training state (parameter shards, optimizer-state shards, buffers)
through ``worker.zero3.checkpoint``.

Tensor names: ``u{k}.param`` (this rank's parameter shard of unit k), the optimizer's ``u{k}.<state>`` and
``step``, and ``buffer.<name>`` for every model buffer (replicated; saved after the ranks averaged them).
Resuming re-shards for the current world size. The ranks agree on the checkpoint to load: each finds its
newest complete one, they all-gather the steps, and every rank loads the oldest of them (a checkpoint that
one rank saw complete stays complete), so all ranks resume at the same step.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from jobspec import JobSpec
from worker.zero3 import checkpoint as ckpt
from worker.zero3 import state as zstate
from worker.zero3.optim import ShardedOptimizer
from worker.zero3.reshard import load_resharded
from worker.zero3.sharded import ShardedModule

logger = logging.getLogger(__name__)

KEEP = 2


def unit_numels(engine: ShardedModule) -> list[int]:
    return [u.plan.numel for u in engine.units]


def save(
    engine: ShardedModule, optimizer: ShardedOptimizer, job: JobSpec, directory: Path, step: int
) -> Path:
    """Write this rank's part of the checkpoint of ``step`` (steps done), fenced by the group's epoch.

    Buffers must be synced already. Raises ``CheckpointError`` when a newer epoch already wrote this part.
    """
    tensors: dict[str, torch.Tensor] = {f"u{u.index}.param": u.shard for u in engine.units}
    tensors.update(optimizer.state_tensors())
    for name, b in engine.model.named_buffers():
        tensors[f"buffer.{name}"] = b
    group = engine.group
    path = ckpt.save_shards(
        directory,
        step,
        group.rank,
        group.world_size,
        job.hash,
        unit_numels(engine),
        tensors,
        {"model": job.model},
        epoch=group.epoch,
    )
    if group.rank == 0:
        ckpt.prune(directory, keep=KEEP)
    logger.info("%s: checkpoint of step %d written (%s)", group.describe(), step, path.parent)
    return path


def agreed_step(engine: ShardedModule, job: JobSpec, directory: Path) -> int | None:
    """The step of the checkpoint every rank will load (collective), or None when some rank has none."""
    info = ckpt.latest_complete(directory, job.hash) if Path(directory).is_dir() else None
    mine = -1 if info is None else info.step
    parts = zstate.exchange_values(engine, 0, zstate.Channel.RESUME, torch.tensor([mine]))
    steps = [int(p.item()) for p in parts]
    chosen = min(steps)
    if len(set(steps)) > 1:
        logger.warning(
            "%s: ranks see different newest checkpoints %s; using %d", engine.group.describe(), steps, chosen
        )
    return None if chosen < 0 else chosen


def restore(engine: ShardedModule, optimizer: ShardedOptimizer, job: JobSpec, directory: Path) -> int | None:
    """Load the agreed newest complete checkpoint into shards, optimizer and buffers; returns its step."""
    step = agreed_step(engine, job, directory)
    if step is None:
        return None
    group = engine.group
    tensors = load_resharded(
        ckpt.step_dir(directory, step), group.world_size, group.rank, unit_numels(engine), job_hash=job.hash
    )
    buffers = dict(engine.model.named_buffers())
    expected = {f"u{u.index}.param" for u in engine.units} | {f"buffer.{n}" for n in buffers}
    missing = sorted(expected - set(tensors))
    if missing:
        raise ckpt.CheckpointError(f"checkpoint of step {step} lacks {missing[:5]}")
    for u in engine.units:
        t = tensors[f"u{u.index}.param"]
        if t.shape != u.shard.shape or t.dtype != torch.float32:
            raise ckpt.CheckpointError(f"checkpoint shard u{u.index} is {t.dtype} {tuple(t.shape)}")
    for name, b in buffers.items():
        t = tensors[f"buffer.{name}"]
        if t.shape != b.shape or t.dtype != b.dtype:
            raise ckpt.CheckpointError(f"checkpoint buffer {name} is {t.dtype} {tuple(t.shape)}")
    opt_state = {k: v for k, v in tensors.items() if not k.endswith(".param") and not k.startswith("buffer.")}
    saved_steps = opt_state.get("step")
    if saved_steps is None or saved_steps.numel() != 1 or int(saved_steps.item()) != step:
        raise ckpt.CheckpointError(f"checkpoint of step {step} holds optimizer state of {saved_steps}")
    optimizer.load_state_tensors(opt_state)  # validates before changing anything
    with torch.no_grad():
        for u in engine.units:
            u.shard.copy_(tensors[f"u{u.index}.param"])
        for name, b in buffers.items():
            b.copy_(tensors[f"buffer.{name}"])
    return step
