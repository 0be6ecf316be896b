"""Seeded CIFAR augmentation: random crop with 4-pixel zero padding and random horizontal flip.

Every random draw of a sample comes from a counter-based hash of (seed, step, position in the global batch),
so the result does not depend on how the global batch is split across workers. Padding is zero in the
normalised space (the train-split mean colour).
"""

from __future__ import annotations

import numpy as np
import torch

from worker.data.sampler import mix_seed

_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)


def _splitmix(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser, vectorised over uint64 (wrap-around multiplication is intended)."""
    with np.errstate(over="ignore"):
        x = x + np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * _M1
        x = (x ^ (x >> np.uint64(27))) * _M2
        return x ^ (x >> np.uint64(31))


class CropFlip:
    """The :class:`~worker.data.dataset.Augment` of CIFAR: crop (padding ``pad``) + horizontal flip."""

    def __init__(self, seed: int, pad: int = 4) -> None:
        if pad < 0:
            raise ValueError(f"pad must be >= 0, got {pad}")
        self.seed = seed
        self.pad = pad

    def draws(self, step_seed: int, offset: int, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per-sample (dy, dx, flip) for global-batch positions ``offset .. offset + n - 1``."""
        base = np.uint64(mix_seed(self.seed, step_seed))
        pos = np.arange(offset, offset + n, dtype=np.uint64)
        h = _splitmix(_splitmix(pos ^ base))
        span = np.uint64(2 * self.pad + 1)
        dy = (h % span).astype(np.int64)
        dx = ((h >> np.uint64(16)) % span).astype(np.int64)
        flip = ((h >> np.uint64(32)) & np.uint64(1)).astype(bool)
        return dy, dx, flip

    def __call__(self, x: torch.Tensor, step_seed: int, offset: int = 0) -> torch.Tensor:
        if x.dim() != 4:
            raise ValueError(f"augment expects N x C x H x W, got shape {tuple(x.shape)}")
        if offset < 0:
            raise ValueError(f"offset must be >= 0, got {offset}")
        n, _, h, w = x.shape
        if n == 0:
            return x.clone()
        dy, dx, flip = self.draws(step_seed, offset, n)
        p = self.pad
        padded = torch.nn.functional.pad(x, (p, p, p, p))
        rows = torch.from_numpy(dy)[:, None] + torch.arange(h)  # n x h
        cols = torch.from_numpy(dx)[:, None] + torch.arange(w)  # n x w
        flipped = torch.from_numpy(flip)
        cols = torch.where(flipped[:, None], cols.flip(1), cols)
        batch = torch.arange(n)[:, None, None]
        out = padded.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]]  # n x h x w x c
        return out.permute(0, 3, 1, 2).contiguous()
