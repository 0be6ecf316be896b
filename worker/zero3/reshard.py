"""Loading a sharded checkpoint (``worker.zero3.checkpoint``) for any world size: every old part's shards are
stripped of their padding, re-padded and sliced for the new rank."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from worker.zero3.checkpoint import (
    CheckpointError,
    CheckpointInfo,
    read_part,
    resolve,
    sharded_unit,
)
from worker.zero3.plan import shard_range

logger = logging.getLogger(__name__)


def load_resharded(
    source: Path | str | CheckpointInfo,
    new_world_size: int,
    new_rank: int,
    unit_numels: list[int],
    *,
    job_hash: str,
) -> dict[str, torch.Tensor]:
    """Rank ``new_rank`` of ``new_world_size``'s tensors from a checkpoint saved at any world size.

    ``source`` is a ``CheckpointInfo``, a step directory, or a checkpoint root (then its newest complete
    checkpoint). Sharded tensors (``u{k}.*``) are re-assembled from every old part, stripped of the old
    padding, re-padded and sliced for the new rank; replicated tensors come from old rank 0. Every part is
    checked against its sha256 (on the very bytes loaded), the job hash and ``unit_numels``; any problem
    raises ``CheckpointError``.
    """
    if new_world_size < 1 or not 0 <= new_rank < new_world_size:
        raise ValueError(f"rank {new_rank} is not in a world of {new_world_size}")
    info = resolve(source, job_hash)
    if info.job_hash != job_hash:
        raise CheckpointError(
            f"{info.path}: checkpoint is of job hash {info.job_hash[:12]}, this job is {job_hash[:12]}"
        )
    if list(info.unit_numels) != list(unit_numels):
        raise CheckpointError(f"{info.path}: unit sizes {list(info.unit_numels)} differ from the model's")
    old_n = info.world_size
    out: dict[str, torch.Tensor] = {}
    sharded_names: set[str] | None = None
    for old_rank in range(old_n):
        data_path, tensors = read_part(info, old_rank)
        names = {n for n in tensors if sharded_unit(n) is not None}
        if sharded_names is None:
            sharded_names = names
        elif names != sharded_names:
            raise CheckpointError(
                f"{data_path}: holds sharded tensors {sorted(names ^ sharded_names)[:4]} "
                "that other parts do not"
            )
        for name, t in tensors.items():
            k = sharded_unit(name)
            if k is None:
                if old_rank == 0:
                    out[name] = t
                continue
            if k >= len(unit_numels):
                raise CheckpointError(f"{data_path}: tensor {name!r} of unknown unit {k}")
            n = unit_numels[k]
            old_start, old_stop = shard_range(n, old_n, old_rank)
            if t.dim() != 1 or t.numel() != old_stop - old_start:
                raise CheckpointError(f"{data_path}: tensor {name!r} has shape {tuple(t.shape)}")
            new_start, new_stop = shard_range(n, new_world_size, new_rank)
            dest = out.get(name)
            if dest is None:
                dest = out[name] = torch.zeros(new_stop - new_start, dtype=t.dtype)
            # Overlap of the old shard, the new shard and the real (unpadded) elements.
            lo, hi = max(old_start, new_start), min(old_stop, new_stop, n)
            if lo < hi:
                dest[lo - new_start : hi - new_start] = t[lo - old_start : hi - old_start]
    msg = "checkpoint step %d (epoch %d, world size %d) loaded for rank %d/%d"
    logger.info(msg, info.step, info.epoch, old_n, new_rank, new_world_size)
    return out
