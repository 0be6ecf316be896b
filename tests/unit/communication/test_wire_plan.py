"""The declared partition plan: its validation, the checks of peers' headers and requests against it, the
per-sender bound on reserved bytes it yields, and this rank's own calls held to it (gRPC and fake alike)."""

from __future__ import annotations

import pytest
import torch

from communication.accumulator import GradientAccumulator
from communication.errors import InvalidMessage, ResourceExhausted
from communication.group import PeerGroup
from communication.grpc_backend import GrpcBackend
from communication.testing import FakeHub
from communication.wire_plan import WirePlan
from protos import zerowire_pb2 as pb
from tests.unit.communication.test_accumulator import header
from tests.unit.zero3.fixtures import UNITS, TinyNet
from worker.zero3.channels import BARRIER, BARRIER_SLOTS, EVAL, METRICS
from worker.zero3.plan import plan_model
from worker.zero3.sharded import ShardedModule

pytestmark = pytest.mark.timeout(60)


def group(world: int = 3, rank: int = 0, epoch: int = 1) -> PeerGroup:
    return PeerGroup("job", epoch, rank, tuple(f"h:{r}" for r in range(world)))


def test_a_malformed_plan_is_a_value_error() -> None:
    for bad in ({}, {-1: 4}, {0: 0}, {0: 2.5}, {1 << 32: 4}):
        with pytest.raises(ValueError):
            WirePlan.build(1, bad, pb.CODEC_NONE, 0)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        WirePlan.build(1, {0: 4}, pb.CODEC_UNSPECIFIED, 0)
    with pytest.raises(ValueError):
        WirePlan.build(1, {0: 4}, pb.CODEC_INT8, 0)
    plan = WirePlan.build(1, {0: 10, 3: 1}, pb.CODEC_INT8, 4)
    assert (plan.block, plan.payload_bytes(0), plan.payload_bytes(3)) == (4, 3 * 4 + 10, 4 + 1)
    assert plan.step_bytes == (22 + 40) + (5 + 4)  # payload plus the decoded float32 values
    assert WirePlan.build(1, {0: 10}, pb.CODEC_NONE, 1024).block == 0  # raw values have no block


def test_fetch_requests_are_held_to_the_plan() -> None:
    plan = WirePlan.build(1, {0: 10}, pb.CODEC_NONE, 0)

    def req(**kw: object) -> pb.FetchRequest:
        return pb.FetchRequest(**{"unit": 0, "codec": pb.CODEC_NONE, **kw})  # type: ignore[arg-type]

    assert plan.check_fetch(req()) == (0, 40)
    assert plan.check_fetch(req(offset=12, length=28)) == (12, 28)
    for bad in (
        req(unit=1),
        req(codec=pb.CODEC_INT8, block_size=1024),
        req(block_size=8),
        req(offset=40),
        req(offset=12, length=29),
        req(offset=1 << 62, length=1 << 62),
    ):
        with pytest.raises(InvalidMessage):
            plan.check_fetch(bad)


def test_pushes_off_the_plan_are_rejected_and_change_nothing() -> None:
    acc = GradientAccumulator()
    acc.set_group(group(epoch=1))
    acc.set_plan(WirePlan.build(1, {0: 8, 1: 4}, pb.CODEC_NONE, 0))
    x = torch.ones(8)
    acc.reserve(header(1, x), published=0)  # on the plan
    before = (acc.pending(), acc.pending_bytes, dict(acc.sender_bytes))
    for h in (
        header(2, x, unit=2),  # not a planned unit
        header(2, torch.ones(4)),  # the numel of another unit
        header(2, x, codec=pb.CODEC_INT8),  # another codec
    ):
        with pytest.raises(InvalidMessage):
            acc.reserve(h, published=0)
        assert (acc.pending(), acc.pending_bytes, dict(acc.sender_bytes)) == before
    with pytest.raises(InvalidMessage):  # this rank's own slice must follow its plan too
        acc.contribute_local(1, 0, 0, torch.ones(5))
    # a plan of another epoch does not apply; a new epoch drops the old plan
    acc.set_plan(WirePlan.build(7, {9: 1}, pb.CODEC_NONE, 0))
    assert acc.plan is not None and acc.plan.epoch == 1
    acc.set_group(group(epoch=2))
    assert acc.plan is None


def test_one_sender_holds_at_most_window_plus_one_steps_of_the_plan() -> None:
    acc = GradientAccumulator(window=1)
    acc.set_group(group(epoch=1))
    acc.set_plan(WirePlan.build(1, {0: 8, 1: 8}, pb.CODEC_NONE, 0))  # 64 bytes a step
    acc.commit(1, 0)
    published = 2  # committed 0, published 2: steps 1..3 are in the window
    for step in (1, 2):
        for unit in (0, 1):
            acc.reserve(header(1, torch.ones(8), step=step, unit=unit), published)
    assert acc.sender_bytes == {1: 128}
    with pytest.raises(ResourceExhausted, match="more than 2 steps"):
        acc.reserve(header(1, torch.ones(8), step=3, unit=0), published)
    acc.reserve(header(2, torch.ones(8), step=3, unit=0), published)  # another sender has its own share
    assert acc.sender_bytes == {1: 128, 2: 32}
    acc.abandon(header(1, torch.ones(8), step=1, unit=0))
    assert acc.sender_bytes == {1: 96, 2: 32}
    acc.reserve(header(1, torch.ones(8), step=3, unit=0), published)
    acc.commit(1, 3)
    assert acc.sender_bytes == {} and acc.pending_bytes == 0


def test_calls_off_the_plan_fail_on_the_fake_and_on_grpc() -> None:
    hub = FakeHub(1)
    fake = hub.backend(0)
    g = group(world=1)
    fake.set_plan(g, {0: 4})
    assert torch.equal(fake.all_gather(g, 0, 0, torch.ones(4), torch.empty(4), 5).result(5), torch.ones(4))
    with pytest.raises(InvalidMessage):
        fake.all_gather(g, 0, 1, torch.ones(4), torch.empty(4), 5).result(5)
    with pytest.raises(InvalidMessage):
        fake.reduce_scatter(g, 0, 0, torch.ones(5), torch.empty(5), 5).result(5)
    fake.close()
    grpc_backend = GrpcBackend("tok")
    try:
        port = grpc_backend.start()
        g = PeerGroup("job", 1, 0, (f"127.0.0.1:{port}",))
        grpc_backend.set_plan(g, {0: 4})
        with pytest.raises(ValueError):
            grpc_backend.set_plan(g, {0: -4})
        assert torch.equal(
            grpc_backend.all_gather(g, 0, 0, torch.ones(4), torch.empty(4), 5).result(5), torch.ones(4)
        )
        with pytest.raises(InvalidMessage):
            grpc_backend.all_gather(g, 0, 0, torch.ones(5), torch.empty(5), 5).result(5)
        with pytest.raises(InvalidMessage):
            grpc_backend.reduce_scatter(g, 0, 3, torch.ones(4), torch.empty(4), 5).result(5)
    finally:
        grpc_backend.close()


def test_the_engine_declares_its_units_and_control_channels() -> None:
    hub = FakeHub(2)
    model = TinyNet()
    g = PeerGroup("job", 1, 0, ("a:1", "b:1"))
    engine = ShardedModule(model, g, hub.backend(0), plan=plan_model(model, 2, UNITS), timeout=5.0)
    try:
        plan = engine.wire_plan()
        n = len(engine.units)
        assert {u: plan[u] for u in range(n)} == {u.index: u.plan.shard_numel for u in engine.units}
        assert plan[n + METRICS] == plan[n + EVAL] - 10 == 6  # 1 value: 5 digits + 1 anchor; 3: 15 + 1
        assert all(plan[n + BARRIER + k] == 1 for k in range(BARRIER_SLOTS))
        assert max(plan) == n + BARRIER + BARRIER_SLOTS - 1
    finally:
        engine.close()
