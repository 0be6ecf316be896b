"""The exact control exchange of the contract (`CollectiveBackend.exchange`): its own namespace of messages
on the gRPC lane, the checks every lane makes, and cancellation. The bit-for-bit values on every lane are
tested by the conformance harness (tests/integration/wire_harness.py: run_control_cases)."""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from communication.backend import barrier, check_exchange
from communication.errors import Cancelled, InvalidMessage
from communication.group import PeerGroup
from communication.mailbox import CONTROL_UNIT, Mailbox
from communication.tensor_stream import Key, make_header
from communication.testing import FakeHub
from protos import zerowire_pb2 as pb


def group(rank: int = 0, world: int = 3, epoch: int = 1) -> PeerGroup:
    return PeerGroup("job", epoch, rank, tuple(f"h:{r}" for r in range(world)))


def message(sender: int, x: torch.Tensor, *, unit: int, key: int = 5) -> pb.TensorHeader:
    return make_header(
        Key("job", 1, key, unit, 0), sender, x.dtype, x.numel(), pb.CODEC_NONE, 0, x.view(torch.uint8)
    )


def test_control_messages_have_their_own_names_and_dtypes_in_the_mailbox() -> None:
    box = Mailbox()
    box.set_group(group())
    values, floats = torch.tensor([2**62 + 1, -5]), torch.ones(2)
    for bad in (message(1, floats, unit=CONTROL_UNIT), message(1, values, unit=0)):
        with pytest.raises(InvalidMessage):  # float32 is for point-to-point, int64/float64 for control
            box.reserve(bad)
    # the same sender and key on both units: two messages, neither a duplicate of the other
    for h, x in ((message(1, values, unit=CONTROL_UNIT), values), (message(1, floats, unit=0), floats)):
        box.reserve(h).copy_(x.view(torch.uint8))
        box.deliver(h)
    assert box.held_bytes == 16 + 8

    async def claim() -> None:
        with pytest.raises(InvalidMessage):  # held as int64, claimed into float64: refused
            await box.recv(1, 1, 5, torch.empty(2, dtype=torch.float64), 1.0, unit=CONTROL_UNIT)
        out = torch.empty(2)
        assert torch.equal(await box.recv(1, 1, 5, out, 1.0), floats)

    asyncio.run(claim())
    assert box.held_bytes == 0


def test_every_lane_refuses_the_same_bad_exchanges() -> None:
    g = group()
    for bad, key in (
        (torch.ones(2), 1),  # float32
        (torch.ones(2, dtype=torch.int32), 1),
        (torch.ones(1, 1, dtype=torch.int64), 1),
        (torch.ones(0, dtype=torch.int64), 1),
        (torch.ones(1, dtype=torch.int64), -1),
        (torch.ones(1, dtype=torch.int64), True),
    ):
        with pytest.raises(ValueError):
            check_exchange(g, key, bad)  # type: ignore[arg-type]
        with pytest.raises(ValueError):
            FakeHub(3).backend(0).exchange(bad, group=g, key=key, timeout=1.0)  # type: ignore[arg-type]


def test_a_fake_exchange_checks_its_peers_and_can_be_cancelled() -> None:
    hub = FakeHub(2)
    lanes, groups = [hub.backend(r) for r in range(2)], [group(r, 2) for r in range(2)]

    def call(r: int) -> torch.Tensor:
        values = torch.ones(r + 1, dtype=torch.int64)
        return lanes[r].exchange(values, group=groups[r], key=3, timeout=5.0).wait(10)

    with ThreadPoolExecutor(2) as pool:  # ranks that pass different numels: the exchange fails on both
        calls = [pool.submit(call, r) for r in range(2)]
        for future in calls:
            with pytest.raises(InvalidMessage):
                future.result(10)
    with pytest.raises(ValueError, match="used already"):
        lanes[0].exchange(torch.ones(1, dtype=torch.int64), group=groups[0], key=3, timeout=5.0)
    lonely = lanes[0].exchange(torch.ones(1, dtype=torch.float64), group=groups[0], key=4, timeout=30.0)
    assert lonely.cancel()
    with pytest.raises(Cancelled):
        lonely.wait(5)
    assert not lonely.cancel()
    both = [barrier(lanes[r], group=groups[r], key=5, timeout=5.0) for r in range(2)]
    assert [h.wait(5).tolist() for h in both] == [[[0], [0]], [[0], [0]]]


def test_a_grpc_exchange_waits_for_a_peer_that_installs_the_epoch_later() -> None:
    # The first call of a formation is an exchange: a peer may get this rank's message before it has
    # installed the epoch itself. The message waits for the install (bounded), it is not refused.
    from communication.grpc_backend import GrpcBackend

    lanes = [GrpcBackend("tok") for _ in range(2)]
    try:
        addresses = tuple(f"127.0.0.1:{lane.start()}" for lane in lanes)
        groups = [PeerGroup("job", 3, r, addresses) for r in range(2)]
        lanes[0].set_group(groups[0])
        early = lanes[0].exchange(torch.tensor([7, 2**62]), group=groups[0], key=0, timeout=10.0)
        time.sleep(0.3)  # rank 0's message reaches rank 1 before rank 1 knows epoch 3
        assert not early.done()
        lanes[1].set_group(groups[1])
        late = lanes[1].exchange(torch.tensor([8, -1]), group=groups[1], key=0, timeout=10.0)
        want = [[7, 2**62], [8, -1]]
        assert early.wait(15).tolist() == want and late.wait(15).tolist() == want
    finally:
        for lane in lanes:
            lane.close()
