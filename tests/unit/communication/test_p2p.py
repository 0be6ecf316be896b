"""Point-to-point send / recv and handles: the mailbox's checks (a rejected message changes nothing), what
it holds and frees, cancellation on gRPC, the fake and the torch.distributed lane's queue, and bad
arguments. The transfers themselves are in the conformance harness (tests/integration)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import pytest
import torch

from communication.errors import (
    Cancelled,
    CollectiveTimeout,
    CommError,
    DuplicateContribution,
    EpochChanged,
    InvalidMessage,
    ResourceExhausted,
    StaleMessage,
)
from communication.group import PeerGroup
from communication.grpc_backend import GrpcBackend
from communication.handle import Handle
from communication.mailbox import Mailbox
from communication.tensor_stream import Key, make_header
from communication.testing import FakeHub
from communication.torchdist import TorchDistBackend
from protos import zerowire_pb2 as pb
from tests.conftest import free_port

pytestmark = pytest.mark.timeout(60)


def group(epoch: int = 1, rank: int = 0, world: int = 3) -> PeerGroup:
    return PeerGroup("job", epoch, rank, tuple(f"h:{r}" for r in range(world)))


def message(sender: int, x: torch.Tensor, key: int = 5, epoch: int = 1, **kw: object) -> pb.TensorHeader:
    h = make_header(
        Key("job", epoch, key, 0, 0), sender, torch.float32, x.numel(), pb.CODEC_NONE, 0, x.view(torch.uint8)
    )
    for name, value in kw.items():
        setattr(h, name, value)
    return h


def test_the_mailbox_rejects_bad_messages_before_allocating_and_holds_good_ones() -> None:
    box = Mailbox(max_bytes=2 * 4 * 100)  # a share of 400 bytes per sender with 2 peers
    box.set_group(group())
    x = torch.arange(10.0)
    box.reserve(message(1, x)).copy_(x.view(torch.uint8))
    box.deliver(message(1, x))
    held = box.held_bytes
    for bad, error in (
        (message(1, x), DuplicateContribution),  # the same name, not received yet
        (message(2, x, codec=pb.CODEC_INT8), InvalidMessage),
        (message(2, x, dtype=pb.DTYPE_BFLOAT16), InvalidMessage),
        (message(2, x, payload_bytes=39), InvalidMessage),
        (message(2, x, shard=1), InvalidMessage),
        (message(2, x, unit=3), InvalidMessage),
        (message(2, x, epoch=2), StaleMessage),
        (message(2, torch.zeros(101)), ResourceExhausted),  # over the sender's share
    ):
        with pytest.raises(error):
            box.reserve(bad)
        assert box.held_bytes == held
    out = torch.empty(10)
    assert asyncio.run(box.recv(1, 1, 5, out, 1.0)) is out and torch.equal(out, x)
    assert box.held_bytes == 0

    # a recv that waits fixes the numel: a message of another size is refused before it is received
    async def waiting() -> None:
        task = asyncio.ensure_future(box.recv(1, 2, 6, torch.empty(4), 5.0))
        await asyncio.sleep(0.01)
        with pytest.raises(InvalidMessage):
            box.reserve(message(2, torch.ones(5), key=6))
        box.reserve(message(2, torch.ones(4), key=6)).fill_(0)
        box.deliver(message(2, torch.ones(4), key=6))
        assert torch.equal(await task, torch.zeros(4))
        with pytest.raises(CollectiveTimeout):
            await box.recv(1, 2, 7, torch.empty(4), 0.05)
        box.reserve(message(2, x, key=8))
        box.deliver(message(2, x, key=8))
        with pytest.raises(InvalidMessage):  # held with 10 values, claimed into 4: dropped with an error
            await box.recv(1, 2, 8, torch.empty(4), 1.0)

    asyncio.run(waiting())
    assert box.held_bytes == 0
    # unclaimed messages are dropped with their epoch, an abandoned reservation is freed
    box.reserve(message(1, x, key=9))
    box.abandon(message(1, x, key=9))
    box.reserve(message(1, x, key=9))
    box.deliver(message(1, x, key=9))
    assert box.held_bytes == 40
    box.set_group(group(epoch=2))
    assert box.held_bytes == 0


@pytest.fixture
def pair() -> Iterator[tuple[list[GrpcBackend], list[PeerGroup]]]:
    backends = [GrpcBackend("tok", max_mailbox_bytes=1 << 20) for _ in range(2)]
    try:
        addresses = tuple(f"127.0.0.1:{b.start()}" for b in backends)
        groups = [PeerGroup("job", 1, r, addresses) for r in range(2)]
        for b, g in zip(backends, groups, strict=True):
            b.set_group(g)
        yield backends, groups
    finally:
        for b in backends:
            b.close()


async def _held(backend: GrpcBackend) -> int:
    return backend._mailbox.held_bytes


def test_grpc_send_recv_rejections_and_cancellation(pair: tuple[list[GrpcBackend], list[PeerGroup]]) -> None:
    backends, groups = pair
    x = torch.randn(1000)
    # the receiver waits with 999 values: the sender's message is refused, nothing is held
    waiting = backends[1].recv(torch.empty(999), group=groups[1], src=0, key=1, timeout=10)
    deadline = time.monotonic() + 5
    while backends[1].inflight() != 1 and time.monotonic() < deadline:
        time.sleep(0.005)
    backends[1].call_soon(_held(backends[1])).result(5)  # the loop ran the recv up to its wait
    with pytest.raises(InvalidMessage):
        backends[0].send(x, group=groups[0], dest=1, key=1, timeout=10).wait(15)
    assert not waiting.done() and waiting.cancel()
    with pytest.raises(Cancelled):
        waiting.wait(5)
    assert not waiting.cancel()
    # more than the receiver's share for this sender: refused
    with pytest.raises(ResourceExhausted):
        backends[0].send(torch.zeros((1 << 18) + 1), group=groups[0], dest=1, key=2, timeout=10).wait(15)
    # a message sent before its recv is held, then claimed; a key is free again once received
    for round_ in range(2):
        backends[0].send(x + round_, group=groups[0], dest=1, key=1, timeout=10).wait(15)
        assert backends[1].call_soon(_held(backends[1])).result(5) == 4000
        got = backends[1].recv(torch.empty(1000), group=groups[1], src=0, key=1, timeout=10).wait(15)
        assert torch.equal(got, x + round_)
        assert backends[1].call_soon(_held(backends[1])).result(5) == 0
    # held messages of an epoch are dropped when it ends; a recv of the old epoch fails at once
    backends[0].send(x, group=groups[0], dest=1, key=3, timeout=10).wait(15)
    pending = backends[1].recv(torch.empty(1000), group=groups[1], src=0, key=4, timeout=30)
    backends[1].set_epoch(2)
    with pytest.raises(EpochChanged):
        pending.wait(5)
    assert backends[1].call_soon(_held(backends[1])).result(5) == 0
    assert backends[1].inflight() == 0


def test_bad_point_to_point_arguments_are_value_errors(
    pair: tuple[list[GrpcBackend], list[PeerGroup]],
) -> None:
    backends, groups = pair
    fake = FakeHub(2).backend(0)
    fake_group = PeerGroup("job", 1, 0, ("a:1", "b:1"))
    cases = [
        ("send", torch.ones(3), 0, 1),  # itself
        ("send", torch.ones(3), 2, 1),  # no such rank
        ("send", torch.ones(3), 1, -1),
        ("send", torch.ones(3), 1, 1 << 31),
        ("send", torch.ones(3, dtype=torch.float64), 1, 1),
        ("recv", torch.ones(4, 2).t(), 1, 1),  # not contiguous
        ("recv", torch.ones(0), 1, 1),
    ]
    try:
        for backend, g in ((backends[0], groups[0]), (fake, fake_group)):
            for role, tensor, peer, key in cases:
                with pytest.raises(ValueError):
                    if role == "send":
                        backend.send(tensor, group=g, dest=peer, key=key, timeout=5)
                    else:
                        backend.recv(tensor, group=g, src=peer, key=key, timeout=5)
    finally:
        fake.close()


def test_fake_recv_can_be_cancelled_and_a_send_is_held() -> None:
    hub = FakeHub(2)
    backends = [hub.backend(r) for r in range(2)]
    groups = [PeerGroup("job", 1, r, ("a:1", "b:1")) for r in range(2)]
    try:
        pending = backends[1].recv(torch.empty(2), group=groups[1], src=0, key=1, timeout=10)
        assert pending.cancel()
        with pytest.raises(Cancelled):
            pending.wait(5)
        sent = backends[0].send(torch.ones(2), group=groups[0], dest=1, key=1, timeout=10)
        assert sent.done() and not sent.cancel()  # held by the hub at once
        with pytest.raises(InvalidMessage):  # still waiting to be received
            backends[0].send(torch.ones(2), group=groups[0], dest=1, key=1, timeout=10).wait(1)
        assert torch.equal(
            backends[1].recv(torch.empty(2), group=groups[1], src=0, key=1, timeout=10).wait(5), torch.ones(2)
        )
        with pytest.raises(CollectiveTimeout):
            backends[1].recv(torch.empty(2), group=groups[1], src=0, key=2, timeout=0.1).wait(5)
    finally:
        for b in backends:
            b.close()


def test_torchdist_withdraws_queued_calls_only() -> None:
    """Calls wait for the epoch's group, which never forms (no peer): those still queued can be withdrawn
    (Cancelled), and their results are never written; the group's failure ends the rest."""
    backend = TorchDistBackend(collective_timeout=2, rendezvous_timeout=2)
    g = PeerGroup("job", 1, 0, ("a:1", "b:1"))
    try:
        backend.set_group(g, f"127.0.0.1:{free_port()}")
        out = torch.full((3,), -1.0)
        first = backend.recv(out, group=g, src=1, key=1, timeout=5)
        second = backend.recv(out, group=g, src=1, key=2, timeout=5)
        assert second.cancel()
        with pytest.raises(Cancelled):
            second.wait(1)
        with pytest.raises(CommError) as failed:  # the group never forms
            first.wait(15)
        assert not isinstance(failed.value, Cancelled)
        assert torch.equal(out, torch.full((3,), -1.0))
    finally:
        backend.close()


def test_a_handle_waits_with_a_collective_timeout_and_cancels_before_it_is_bound() -> None:
    h = Handle()
    with pytest.raises(CollectiveTimeout):
        h.wait(0.01)
    assert h.cancel() and h.cancel_requested
    calls: list[int] = []

    def canceller() -> bool:
        calls.append(1)
        return True

    h.bind(canceller)
    assert calls == [1]
    h.fail_cancelled("test")
    with pytest.raises(Cancelled):
        h.wait(0)
    assert not h.cancel()


def test_a_grpc_collective_can_be_cancelled(pair: tuple[list[GrpcBackend], list[PeerGroup]]) -> None:
    backends, groups = pair
    # rank 1 never joins: the gather waits for its shard until cancelled, then fails at once
    gather = backends[0].all_gather(groups[0], 0, 0, torch.ones(10), torch.empty(20), 30)
    time.sleep(0.2)
    assert isinstance(gather, Handle) and not gather.done() and backends[0].inflight() == 1
    start = time.monotonic()
    assert gather.cancel()
    with pytest.raises(Cancelled):
        gather.wait(5)
    assert time.monotonic() - start < 1.0
    assert backends[0].inflight() == 0 and not gather.cancel()
