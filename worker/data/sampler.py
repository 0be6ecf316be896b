"""World-size-independent global batches (DESIGN section 4).

The training stream is an endless concatenation of data epochs; data epoch ``e`` is a permutation of all
``num_samples`` indices drawn by a ``torch.Generator`` seeded from ``(seed, e)`` alone. Step ``s`` takes
positions ``[s * global_batch, (s + 1) * global_batch)`` of that stream, so a global batch may straddle two
data epochs, and within a data epoch no sample is lost or repeated. Nothing here depends on the world size:
rank ``r`` of ``N`` takes the contiguous slice :func:`rank_slice` of the global batch.
"""

from __future__ import annotations

import torch

_MASK64 = (1 << 64) - 1


def mix_seed(*parts: int) -> int:
    """A well-spread 63-bit seed from integers (splitmix64 chained over the parts)."""
    z = 0x9E3779B97F4A7C15
    for part in parts:
        z = (z + (part & _MASK64) + 0x9E3779B97F4A7C15) & _MASK64
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
        z ^= z >> 31
    return z & ((1 << 63) - 1)


def rank_slice(global_batch: int, world_size: int, rank: int) -> tuple[int, int]:
    """``(start, stop)`` of rank's contiguous share of a global batch.

    Ranks below ``global_batch % world_size`` get one more sample; shares are in rank order and cover the
    batch exactly (a share is empty when ``world_size > global_batch`` and ``rank >= global_batch``).
    """
    if global_batch < 0:
        raise ValueError(f"global_batch must be >= 0, got {global_batch}")
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside world of size {world_size}")
    base, extra = divmod(global_batch, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def split(indices: torch.Tensor, world_size: int, rank: int) -> torch.Tensor:
    """Rank's contiguous slice of a global batch of indices (see :func:`rank_slice`)."""
    start, stop = rank_slice(int(indices.shape[0]), world_size, rank)
    return indices[start:stop]


class GlobalBatchSampler:
    """Global batch indices of any step from ``(seed, data epoch, step)`` alone."""

    def __init__(self, num_samples: int, global_batch: int, seed: int) -> None:
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        if global_batch < 1:
            raise ValueError(f"global_batch must be >= 1, got {global_batch}")
        self.num_samples = num_samples
        self.global_batch = global_batch
        self.seed = seed
        self._cache: dict[int, torch.Tensor] = {}

    def permutation(self, data_epoch: int) -> torch.Tensor:
        """The order of data epoch ``data_epoch`` (int64, a permutation of ``range(num_samples)``)."""
        if data_epoch < 0:
            raise ValueError(f"data_epoch must be >= 0, got {data_epoch}")
        perm = self._cache.get(data_epoch)
        if perm is None:
            gen = torch.Generator().manual_seed(mix_seed(self.seed, data_epoch))
            perm = torch.randperm(self.num_samples, generator=gen, dtype=torch.int64)
            if len(self._cache) >= 4:  # steps walk forward: keep only the latest few epochs
                del self._cache[min(self._cache)]
            self._cache[data_epoch] = perm
        return perm

    def data_epoch(self, step: int) -> int:
        """The data epoch of the first sample of ``step``."""
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        return step * self.global_batch // self.num_samples

    def indices(self, step: int) -> torch.Tensor:
        """The ``global_batch`` sample indices of ``step`` (int64), in global-batch order."""
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        pos = step * self.global_batch
        end = pos + self.global_batch
        parts: list[torch.Tensor] = []
        while pos < end:
            epoch, offset = divmod(pos, self.num_samples)
            take = min(end - pos, self.num_samples - offset)
            parts.append(self.permutation(epoch)[offset : offset + take])
            pos += take
        return parts[0].clone() if len(parts) == 1 else torch.cat(parts)

    def local_indices(self, step: int, world_size: int, rank: int) -> torch.Tensor:
        """Rank's contiguous slice of the global batch of ``step``."""
        return split(self.indices(step), world_size, rank)
