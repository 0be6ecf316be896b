"""The gradient accumulator's rules: rank-order sums, one contribution per sender, every rejection,
the step window anchored on what this rank published, the declared plan, bounded memory (in all and per
sender), wait_ready, clearing after commit. A rejected contribution changes nothing."""

from __future__ import annotations

import itertools

import pytest
import torch

from communication.accumulator import GradientAccumulator
from communication.compression import encode
from communication.errors import (
    CollectiveTimeout,
    DuplicateContribution,
    EpochChanged,
    InvalidMessage,
    ResourceExhausted,
    StaleMessage,
)
from communication.group import PeerGroup
from communication.tensor_stream import Key, make_header
from protos import zerowire_pb2 as pb

WORLD = 4


def group(epoch: int = 1, rank: int = 0, world: int = WORLD) -> PeerGroup:
    return PeerGroup("job", epoch, rank, tuple(f"h:{r}" for r in range(world)))


def header(
    sender: int, x: torch.Tensor, step: int = 0, epoch: int = 1, unit: int = 0, **kw: object
) -> pb.TensorHeader:
    codec = int(kw.pop("codec", pb.CODEC_NONE))  # type: ignore[call-overload]
    payload = encode(x, codec, 64)
    h = make_header(Key("job", epoch, step, unit, 0), sender, torch.float32, x.numel(), codec, 64, payload)
    for name, value in kw.items():
        if name == "wire_codec":
            h.codec = value  # type: ignore[assignment]
        elif name == "shape":
            del h.shape[:]
            h.shape.extend(value)  # type: ignore[arg-type]
        else:
            setattr(h, name, value)
    return h


def deliver(acc: GradientAccumulator, h: pb.TensorHeader, x: torch.Tensor) -> None:
    """What the servicer does with a fully received contribution."""
    buf = acc.reserve(h, published=h.step)  # this rank published its shard of the step
    payload = encode(x, h.codec, h.block_size or 1)
    buf.copy_(payload)
    if h.codec == pb.CODEC_NONE:
        part = buf.view(torch.float32)
    else:
        part = acc.decode_buffer(h)
        from communication.compression import get_codec

        get_codec(h.codec).decode_into(buf, h.block_size, part)
    acc.contribute(h, part)


def parts(n: int = 8) -> list[torch.Tensor]:
    # values whose float32 sum depends on the order of addition
    base = [torch.full((n,), v) for v in (1e8, 1.0, -1e8, 3.0)]
    return base[:WORLD]


def expected_sum(xs: list[torch.Tensor]) -> torch.Tensor:
    acc = xs[0].clone()
    for x in xs[1:]:
        acc.add_(x)
    return acc


@pytest.mark.parametrize("order", list(itertools.permutations([1, 2, 3]))[:4])
async def test_sum_in_rank_order_regardless_of_arrival(order: tuple[int, ...]) -> None:
    acc = GradientAccumulator()
    acc.set_group(group())
    xs = parts()
    acc.contribute_local(1, 0, 0, xs[0])
    for sender in order:
        deliver(acc, header(sender, xs[sender]), xs[sender])
    out = torch.empty(8)
    await acc.wait_ready(1, 0, 0, out, 1.0)
    assert torch.equal(out, expected_sum(xs))
    acc.release(1, 0)
    assert acc.pending() == 0 and acc.pending_bytes == 0


async def test_contributions_before_the_local_call_and_int8_decoded_before_summing() -> None:
    acc = GradientAccumulator()
    acc.set_group(group())
    xs = [torch.randn(300) for _ in range(WORLD)]
    for sender in (3, 1, 2):
        deliver(acc, header(sender, xs[sender], codec=pb.CODEC_INT8), xs[sender])
    acc.contribute_local(1, 0, 0, xs[0])
    out = torch.empty(300)
    await acc.wait_ready(1, 0, 0, out, 1.0)
    assert float((out - expected_sum(xs)).norm() / expected_sum(xs).norm()) < 0.02


async def test_duplicate_is_rejected_not_added_twice() -> None:
    acc = GradientAccumulator()
    acc.set_group(group(world=2))
    x = torch.ones(4)
    deliver(acc, header(1, x), x)
    with pytest.raises(DuplicateContribution):
        acc.reserve(header(1, x), published=0)
    acc.contribute_local(1, 0, 0, x)
    out = torch.empty(4)
    await acc.wait_ready(1, 0, 0, out, 1.0)
    assert torch.equal(out, torch.full((4,), 2.0))
    with pytest.raises(DuplicateContribution):
        acc.contribute_local(1, 0, 0, x)


def test_every_rejection_changes_nothing() -> None:
    acc = GradientAccumulator(window=1)
    acc.set_group(group(epoch=5))
    acc.contribute_local(5, 10, 0, torch.zeros(8))
    acc.release(5, 9)
    x = torch.ones(8)
    deliver(acc, header(1, x, step=10, epoch=5), x)
    before = (acc.pending(), acc.pending_bytes)
    cases: list[tuple[pb.TensorHeader, type[Exception]]] = [
        (header(2, x, step=10, epoch=4), StaleMessage),  # stale epoch
        (header(2, x, step=10, epoch=6), StaleMessage),  # epoch not installed
        (header(2, x, step=9, epoch=5), StaleMessage),  # committed step
        (header(2, x, step=12, epoch=5), StaleMessage),  # beyond the window
        (header(7, x, step=10, epoch=5), InvalidMessage),  # non-member
        (header(0, x, step=10, epoch=5), InvalidMessage),  # the owner itself over the wire
        (header(2, x, step=10, epoch=5, shard=1), InvalidMessage),  # not this rank's shard
        (header(2, x, step=10, epoch=5, job_id="other"), InvalidMessage),
        (header(2, x, step=10, epoch=5, dtype=pb.DTYPE_FLOAT16), InvalidMessage),
        (header(2, torch.ones(9), step=10, epoch=5), InvalidMessage),  # wrong numel
        (header(2, x, step=10, epoch=5, shape=[2, 4]), InvalidMessage),
        (header(2, x, step=10, epoch=5, payload_bytes=31), InvalidMessage),
        (header(2, x, step=10, epoch=5, wire_codec=pb.CODEC_UNSPECIFIED), InvalidMessage),
        (header(1, x, step=10, epoch=5), DuplicateContribution),
    ]
    for h, error in cases:
        with pytest.raises(error):
            acc.reserve(h)
        assert (acc.pending(), acc.pending_bytes) == before, h
    # within the window is fine
    acc.reserve(header(2, x, step=11, epoch=5))


async def test_non_finite_contribution_is_reported_and_never_applied() -> None:
    acc = GradientAccumulator()
    acc.set_group(group(world=2))
    bad = torch.ones(4)
    bad[2] = float("nan")
    h = header(1, bad)
    buf = acc.reserve(h, published=0)
    buf.copy_(bad.view(torch.uint8))
    with pytest.raises(InvalidMessage, match="non-finite"):
        acc.contribute(h, buf.view(torch.float32))
    acc.contribute_local(1, 0, 0, torch.ones(4))
    with pytest.raises(InvalidMessage, match="non-finite"):
        await acc.wait_ready(1, 0, 0, torch.empty(4), 1.0)
    with pytest.raises(DuplicateContribution):  # the sender had its one chance
        acc.reserve(h, published=0)


def test_memory_and_key_bounds() -> None:
    acc = GradientAccumulator(max_pending_bytes=100, max_pending_keys=2)
    acc.set_group(group())
    acc.reserve(header(1, torch.ones(20)), published=0)  # 80 bytes
    with pytest.raises(ResourceExhausted):
        acc.reserve(header(2, torch.ones(20)), published=0)
    acc2 = GradientAccumulator(max_pending_keys=2)
    acc2.set_group(group())
    acc2.reserve(header(1, torch.ones(2), unit=0), published=0)
    acc2.reserve(header(1, torch.ones(2), unit=1), published=0)
    with pytest.raises(ResourceExhausted):
        acc2.reserve(header(1, torch.ones(2), unit=2), published=0)


async def test_wait_ready_times_out_and_names_the_missing_ranks() -> None:
    acc = GradientAccumulator()
    acc.set_group(group())
    acc.contribute_local(1, 0, 0, torch.ones(4))
    with pytest.raises(CollectiveTimeout, match=r"missing ranks \[1, 2, 3\]"):
        await acc.wait_ready(1, 0, 0, torch.empty(4), 0.05)


async def test_new_epoch_fails_pending_reductions_and_frees_them() -> None:
    acc = GradientAccumulator()
    acc.set_group(group(epoch=1))
    deliver(acc, header(1, torch.ones(4)), torch.ones(4))
    acc.contribute_local(1, 0, 0, torch.ones(4))
    acc.set_group(group(epoch=2))
    assert acc.pending() == 0 and acc.pending_bytes == 0
    with pytest.raises(StaleMessage):
        acc.set_group(group(epoch=1))
    acc.set_epoch(3)
    acc2 = GradientAccumulator()
    acc2.set_group(group(epoch=1))
    acc2.contribute_local(1, 0, 0, torch.ones(4))
    waiting = acc2._entries[(1, 0, 0)]
    acc2.set_epoch(2)
    assert isinstance(waiting.error, EpochChanged) and waiting.event.is_set()


async def test_receive_buffers_are_reused_across_steps() -> None:
    acc = GradientAccumulator()
    acc.set_group(group(world=2))
    ptrs = []
    for step in range(3):
        x = torch.full((16,), float(step))
        h = header(1, x, step=step)
        buf = acc.reserve(h, published=step)
        ptrs.append(buf.data_ptr())
        buf.copy_(x.view(torch.uint8))
        acc.contribute(h, buf.view(torch.float32))
        acc.contribute_local(1, step, 0, x)
        out = torch.empty(16)
        await acc.wait_ready(1, step, 0, out, 1.0)
        assert torch.equal(out, 2 * x)
        acc.release(1, step)
    assert len(set(ptrs)) == 1
