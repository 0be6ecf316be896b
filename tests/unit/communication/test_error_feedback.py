"""Error feedback with compact residuals: the bytes held never exceed the stated formula or budget, and the
exactness properties of error feedback still hold (first send, reset, bounded drift of the running sum)."""

from __future__ import annotations

import pytest
import torch

from communication.compression import ErrorFeedback, Int8Codec, encode, num_blocks, residual_bytes
from communication.errors import InvalidMessage
from protos import zerowire_pb2 as pb

INT8 = Int8Codec()
pytestmark = pytest.mark.timeout(60)


def decode(payload: torch.Tensor, block: int, n: int) -> torch.Tensor:
    out = torch.empty(n)
    INT8.decode_into(payload, block, out)
    return out


def plan_bound(shard_numels: list[int], world: int, block: int) -> int:
    """The docstring's bound for a ZeRO-3 plan: every unit's shard to each of the other ranks."""
    return (world - 1) * sum(n + 4 * num_blocks(n, block) for n in shard_numels)


@pytest.mark.parametrize(("world", "block"), [(2, 256), (3, 1024), (4, 7)])
def test_residual_bytes_never_exceed_the_plan_formula(world: int, block: int) -> None:
    gen = torch.Generator().manual_seed(world)
    shards = [1, 5, 300, 1024, 5000]
    ef = ErrorFeedback(pb.CODEC_INT8, block)
    bound = plan_bound(shards, world, block)
    fp32 = 4 * (world - 1) * sum(shards)
    for _ in range(3):  # steps
        for unit, n in enumerate(shards):
            for dest in range(1, world):
                ef.encode(unit, dest, torch.randn(n, generator=gen))
                assert ef.residual_bytes <= bound
    assert ef.residual_bytes == bound  # every pair kept: exactly the formula
    assert ef.residual_bytes < fp32 * (1 + 4 / block) / 4 + 4 * len(shards) * (world - 1)
    # a unit whose shard changes size (re-partition without reset) replaces its residual, never adds one
    ef.encode(4, 1, torch.randn(10, generator=gen))
    assert ef.residual_bytes == bound - residual_bytes(5000, block) + residual_bytes(10, block)
    ef.reset()
    assert ef.residual_bytes == 0


def test_budget_is_a_hard_cap_and_pairs_over_it_send_without_feedback() -> None:
    block = 64
    kept = residual_bytes(1000, block) + residual_bytes(300, block)
    budget = kept + 100  # room for two of the three pairs
    ef = ErrorFeedback(pb.CODEC_INT8, block, max_bytes=budget)
    gen = torch.Generator().manual_seed(3)
    sizes = {0: 1000, 1: 300, 2: 1000}
    for step in range(4):
        for unit, n in sizes.items():
            x = torch.randn(n, generator=gen)
            payload = ef.encode(unit, 1, x)
            assert ef.residual_bytes <= budget
            if unit == 2:  # refused: exactly the plain encoding of x, every step
                assert torch.equal(payload, encode(x, pb.CODEC_INT8, block)), step
    assert ef.residual_bytes == kept
    ef.encode(0, 1, torch.randn(10, generator=gen))  # unit 0 shrinks: unit 2 now fits
    ef.encode(2, 1, torch.randn(1000, generator=gen))
    now = residual_bytes(10, block) + residual_bytes(300, block) + residual_bytes(1000, block)
    assert ef.residual_bytes == now
    assert ef.residual_bytes <= budget
    with pytest.raises(ValueError, match="max_bytes"):
        ErrorFeedback(pb.CODEC_INT8, block, max_bytes=-1)
    with pytest.raises(ValueError, match="block"):
        ErrorFeedback(pb.CODEC_INT8, 0)
    zero = ErrorFeedback(pb.CODEC_INT8, block, max_bytes=0)
    x = torch.randn(100, generator=gen)
    assert torch.equal(zero.encode(0, 1, x), encode(x, pb.CODEC_INT8, block))
    assert zero.residual_bytes == 0


def test_first_send_and_after_reset_equal_the_plain_encoding() -> None:
    ef = ErrorFeedback(pb.CODEC_INT8, 128)
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(1000, generator=gen)
    assert torch.equal(ef.encode(0, 1, x), encode(x, pb.CODEC_INT8, 128))
    y = torch.randn(1000, generator=gen)
    assert not torch.equal(ef.encode(0, 1, y), encode(y, pb.CODEC_INT8, 128))  # the residual is used
    ef.reset()
    assert torch.equal(ef.encode(0, 1, y), encode(y, pb.CODEC_INT8, 128))


def test_exactly_representable_values_leave_no_residual() -> None:
    """Integers in [-127, 127] with 127 in every block quantize exactly: nothing is lost, nothing carried."""
    ef = ErrorFeedback(pb.CODEC_INT8, 100)
    gen = torch.Generator().manual_seed(6)
    x = torch.randint(-127, 128, (1000,), generator=gen).float()
    x[::100] = 127.0
    for _ in range(3):
        assert torch.equal(decode(ef.encode(0, 1, x), 100, 1000), x)


@pytest.mark.parametrize("steps", [50, 400])
def test_running_sum_drift_is_bounded(steps: int) -> None:
    """Delivered sum = sent sum - r_T + sum of the residual's storage errors, so per value
    |sent - delivered| <= s/2 + (T - 1) * s/508 for a send scale s (absmax/127); without feedback the gap
    of this biased signal grows like T * s/2."""
    block = 128
    ef = ErrorFeedback(pb.CODEC_INT8, block)
    gen = torch.Generator().manual_seed(1)
    sent = torch.zeros(1000, dtype=torch.float64)
    got = torch.zeros(1000, dtype=torch.float64)
    plain = torch.zeros(1000, dtype=torch.float64)
    scale = 0.0
    for _ in range(steps):
        x = torch.randn(1000, generator=gen) * 1e-3 + 0.01
        scale = max(scale, float(x.abs().max()) / 127)
        got += decode(ef.encode(3, 1, x), block, 1000).double()
        plain += decode(encode(x, pb.CODEC_INT8, block), block, 1000).double()
        sent += x.double()
    bound = scale * (0.5 + (steps - 1) / 508) * (1 + 1e-4)
    drift = float((got - sent).abs().max())
    assert drift <= bound, (drift, bound)
    assert float((plain - sent).abs().max()) > 4 * drift  # feedback really removes the bias


def test_a_failed_encode_drops_the_residual_and_changes_nothing_else() -> None:
    ef = ErrorFeedback(pb.CODEC_INT8, 64)
    ef.encode(0, 1, torch.randn(100))
    ef.encode(1, 1, torch.randn(100))
    before = ef.residual_bytes
    bad = torch.randn(100)
    bad[3] = float("nan")
    with pytest.raises(InvalidMessage, match="non-finite"):
        ef.encode(0, 1, bad)
    assert ef.residual_bytes == before - residual_bytes(100, 64)
    x = torch.randn(100)
    assert torch.equal(ef.encode(0, 1, x), encode(x, pb.CODEC_INT8, 64))
