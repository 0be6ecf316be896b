"""Seeded crop + flip: matches a per-sample reference, keyed by global-batch position, not by micro-batch."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from worker.data.augment import CropFlip
from worker.data.sampler import rank_slice


def reference(aug: CropFlip, x: torch.Tensor, step: int, offset: int) -> torch.Tensor:
    dy, dx, flip = aug.draws(step, offset, x.shape[0])
    p, (h, w) = aug.pad, x.shape[2:]
    rows = []
    for i in range(x.shape[0]):
        crop = F.pad(x[i], (p, p, p, p))[:, dy[i] : dy[i] + h, dx[i] : dx[i] + w]
        rows.append(crop.flip(-1) if flip[i] else crop)
    return torch.stack(rows)


def test_matches_per_sample_reference_and_leaves_input_alone() -> None:
    aug = CropFlip(seed=3)
    x = torch.randn(40, 3, 32, 32)
    before = x.clone()
    out = aug(x, 7, offset=10)
    assert out.shape == x.shape and out.dtype == x.dtype
    assert torch.equal(out, reference(aug, x, 7, 10))
    assert torch.equal(x, before)


def test_draws_cover_the_range_and_depend_on_seed_and_step() -> None:
    aug = CropFlip(seed=0)
    dy, dx, flip = aug.draws(0, 0, 2000)
    assert set(dy.tolist()) == set(range(9)) and set(dx.tolist()) == set(range(9))
    assert 0.4 < flip.mean() < 0.6
    assert abs(float(np.corrcoef(dy, dx)[0, 1])) < 0.1
    x = torch.randn(64, 3, 8, 8)
    assert torch.equal(aug(x, 5), CropFlip(seed=0)(x, 5))
    assert not torch.equal(aug(x, 5), aug(x, 6))
    assert not torch.equal(aug(x, 5), CropFlip(seed=1)(x, 5))


@settings(max_examples=30, deadline=None)
@given(batch=st.integers(1, 48), world_size=st.integers(1, 8), step=st.integers(0, 10**6))
def test_world_size_independent(batch: int, world_size: int, step: int) -> None:
    aug = CropFlip(seed=11)
    x = torch.randn(batch, 3, 12, 12, generator=torch.Generator().manual_seed(step))
    whole = aug(x, step)
    parts = []
    for rank in range(world_size):
        start, stop = rank_slice(batch, world_size, rank)
        parts.append(aug(x[start:stop], step, offset=start))
    assert torch.equal(torch.cat(parts), whole)


def test_pad_zero_only_flips_and_bad_input() -> None:
    aug = CropFlip(seed=2, pad=0)
    x = torch.randn(16, 1, 5, 5)
    _, _, flip = aug.draws(0, 0, 16)
    expected = torch.where(torch.from_numpy(flip)[:, None, None, None], x.flip(-1), x)
    assert torch.equal(aug(x, 0), expected)
    assert aug(x[:0], 0).shape == (0, 1, 5, 5)
    with pytest.raises(ValueError, match="N x C x H x W"):
        aug(x[0], 0)
    with pytest.raises(ValueError, match="offset"):
        aug(x, 0, offset=-1)
    with pytest.raises(ValueError, match="pad"):
        CropFlip(seed=0, pad=-1)


def test_train_batch_slices_agree_with_the_global_batch() -> None:
    from worker.data import GlobalBatchSampler, load_dataset
    from worker.data.dataset import Dataset

    base = load_dataset("synthetic:3x8x8:64", seed=0)
    plain = base.train_batch(torch.tensor([3, 1]), step=0)
    assert torch.equal(plain[0], base.train_x[[3, 1]]) and torch.equal(plain[1], base.train_y[[3, 1]])
    data = Dataset(
        base.train_x, base.train_y, base.test_x, base.test_y, 10, 3, "augmented", augment=CropFlip(seed=4)
    )
    sampler = GlobalBatchSampler(64, 20, seed=9)
    for step in (0, 5):
        idx = sampler.indices(step)
        whole_x, whole_y = data.train_batch(idx, step)
        for world_size in (1, 3, 7):
            parts = [
                data.train_batch(
                    sampler.local_indices(step, world_size, r), step, rank_slice(20, world_size, r)[0]
                )
                for r in range(world_size)
            ]
            assert torch.equal(torch.cat([x for x, _ in parts]), whole_x)
            assert torch.equal(torch.cat([y for _, y in parts]), whole_y)
