"""GlobalBatchSampler: world-size independence, contiguous rank slices, epochs without loss or repeats."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from worker.data.sampler import GlobalBatchSampler, mix_seed, rank_slice, split

FAST = settings(max_examples=60, deadline=None)


@FAST
@given(
    num_samples=st.integers(1, 300),
    global_batch=st.integers(1, 100),
    seed=st.integers(0, 2**31 - 1),
    step=st.integers(0, 50),
    world_size=st.integers(1, 8),
)
def test_rank_slices_concatenate_to_the_global_batch(
    num_samples: int, global_batch: int, seed: int, step: int, world_size: int
) -> None:
    sampler = GlobalBatchSampler(num_samples, global_batch, seed)
    batch = sampler.indices(step)
    assert batch.dtype == torch.int64 and batch.shape == (global_batch,)
    parts = [sampler.local_indices(step, world_size, r) for r in range(world_size)]
    assert torch.equal(torch.cat(parts), batch)
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1 and sorted(sizes, reverse=True) == sizes
    bounds = [rank_slice(global_batch, world_size, r) for r in range(world_size)]
    assert bounds[0][0] == 0 and bounds[-1][1] == global_batch
    assert all(bounds[r][1] == bounds[r + 1][0] for r in range(world_size - 1))
    assert all(torch.equal(split(batch, world_size, r), batch[a:b]) for r, (a, b) in enumerate(bounds))


@FAST
@given(num_samples=st.integers(1, 200), global_batch=st.integers(1, 64), seed=st.integers(0, 1000))
def test_stream_is_a_sequence_of_permutations(num_samples: int, global_batch: int, seed: int) -> None:
    """Concatenated global batches = perm(epoch 0) ++ perm(epoch 1) ++ ...: nothing lost, nothing repeated."""
    sampler = GlobalBatchSampler(num_samples, global_batch, seed)
    steps = (3 * num_samples) // global_batch + 1
    stream = torch.cat([sampler.indices(s) for s in range(steps)])
    for epoch in range(len(stream) // num_samples):
        chunk = stream[epoch * num_samples : (epoch + 1) * num_samples]
        assert torch.equal(torch.sort(chunk).values, torch.arange(num_samples))
        assert torch.equal(chunk, sampler.permutation(epoch))
    first = sampler.indices(0)[0].item()
    assert sampler.data_epoch(steps - 1) == ((steps - 1) * global_batch) // num_samples
    assert first == sampler.permutation(0)[0].item()


def test_independent_of_history_and_instance() -> None:
    """A step's batch comes from (seed, step) alone: a fresh sampler, any order of queries, same answer."""
    a = GlobalBatchSampler(1000, 96, seed=7)
    forward = [a.indices(s) for s in range(40)]
    b = GlobalBatchSampler(1000, 96, seed=7)
    backward = [b.indices(s) for s in reversed(range(40))][::-1]
    assert all(torch.equal(x, y) for x, y in zip(forward, backward, strict=True))
    assert not torch.equal(GlobalBatchSampler(1000, 96, seed=8).indices(0), forward[0])
    assert not torch.equal(a.permutation(0), a.permutation(1))


def test_global_batch_larger_than_dataset() -> None:
    sampler = GlobalBatchSampler(5, 12, seed=1)
    batch = sampler.indices(0)
    assert torch.equal(
        batch, torch.cat([sampler.permutation(0), sampler.permutation(1), sampler.permutation(2)[:2]])
    )
    assert sampler.data_epoch(1) == 2


def test_known_values_stay_stable() -> None:
    """Pins the stream so a change of seeding (which would break resumed jobs) is caught."""
    assert mix_seed(0) != mix_seed(1) and mix_seed(0, 1) != mix_seed(1, 0)
    assert 0 <= mix_seed(2**64 - 1, 5) < 2**63
    gen = torch.Generator().manual_seed(mix_seed(3, 0))
    assert torch.equal(GlobalBatchSampler(10, 10, 3).indices(0), torch.randperm(10, generator=gen))


def test_more_ranks_than_samples_gives_empty_tail_shares() -> None:
    assert [rank_slice(3, 5, r) for r in range(5)] == [(0, 1), (1, 2), (2, 3), (3, 3), (3, 3)]


@pytest.mark.parametrize(
    ("args", "match"),
    [((0, 4, 0), "num_samples"), ((4, 0, 0), "global_batch")],
)
def test_bad_sampler_arguments(args: tuple[int, int, int], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        GlobalBatchSampler(*args)


def test_bad_slice_arguments() -> None:
    with pytest.raises(ValueError, match="world_size"):
        rank_slice(8, 0, 0)
    with pytest.raises(ValueError, match="outside world"):
        rank_slice(8, 2, 2)
    with pytest.raises(ValueError, match="step"):
        GlobalBatchSampler(4, 2, 0).indices(-1)
