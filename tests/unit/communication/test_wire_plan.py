"""The declared partition plan: its validation, the checks of peers' headers and requests against it (each
unit in its own codec), the per-sender bound on reserved bytes it yields, and this rank's own calls held to
it (gRPC and fake alike)."""

from __future__ import annotations

import pytest
import torch

from communication.accumulator import GradientAccumulator
from communication.backend import CONTROL_BASE, UnitSpec, control_unit
from communication.errors import InvalidMessage, ResourceExhausted
from communication.group import PeerGroup
from communication.grpc_backend import GrpcBackend
from communication.testing import FakeHub
from communication.wire_plan import WirePlan
from protos import zerowire_pb2 as pb
from tests.unit.communication.test_accumulator import header
from tests.unit.zero3.fixtures import UNITS, TinyNet
from worker.zero3.channels import BARRIER_SLOTS, KEYS_PER_STEP, MAX_STEP_KEY, Channel, control_key
from worker.zero3.plan import plan_model
from worker.zero3.sharded import ShardedModule

pytestmark = pytest.mark.timeout(60)


def group(world: int = 3, rank: int = 0, epoch: int = 1) -> PeerGroup:
    return PeerGroup("job", epoch, rank, tuple(f"h:{r}" for r in range(world)))


def raw(numels: dict[int, int]) -> dict[int, UnitSpec]:
    return {unit: UnitSpec(n) for unit, n in numels.items()}


def test_a_malformed_plan_is_a_value_error() -> None:
    for bad in ({}, {-1: 4}, {0: 0}, {0: 2.5}, {1 << 32: 4}):
        with pytest.raises(ValueError):
            WirePlan.build(1, raw(bad), 1024)  # type: ignore[arg-type]
    for bad_spec in ({0: 4}, {0: UnitSpec(4, "fp4")}, {control_unit(0): UnitSpec(4, "int8")}):  # type: ignore[arg-type]
        with pytest.raises(ValueError):
            WirePlan.build(1, bad_spec, 1024)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        WirePlan.build(1, {0: UnitSpec(4, "int8")}, 0)
    plan = WirePlan.build(1, {0: UnitSpec(10, "int8"), 3: UnitSpec(1, "int8"), 5: UnitSpec(2)}, 4)
    assert (plan.block, plan.payload_bytes(0), plan.payload_bytes(3), plan.payload_bytes(5)) == (4, 22, 5, 8)
    assert plan.step_bytes == (22 + 40) + (5 + 4) + 8  # int8 payloads plus their decoded float32 values
    assert (plan.codec(0), plan.codec(5)) == (pb.CODEC_INT8, pb.CODEC_NONE)
    assert control_unit(0) == CONTROL_BASE and WirePlan.build(1, {CONTROL_BASE: UnitSpec(1)}, 8).units


def test_fetch_requests_are_held_to_the_plan() -> None:
    plan = WirePlan.build(1, {0: UnitSpec(10), 1: UnitSpec(10, "int8")}, 8)

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
        req(unit=1),  # the int8 unit asked raw
        req(unit=1, codec=pb.CODEC_INT8, block_size=16),  # or in another block
    ):
        with pytest.raises(InvalidMessage):
            plan.check_fetch(bad)
    assert plan.check_fetch(req(unit=1, codec=pb.CODEC_INT8, block_size=8)) == (0, 4 * 2 + 10)


def test_pushes_off_the_plan_are_rejected_and_change_nothing() -> None:
    acc = GradientAccumulator()
    acc.set_group(group(epoch=1))
    acc.set_plan(WirePlan.build(1, {0: UnitSpec(8), 1: UnitSpec(4), 2: UnitSpec(8, "int8")}, 1024))
    x = torch.ones(8)
    acc.reserve(header(1, x), published=0)  # on the plan
    before = (acc.pending(), acc.pending_bytes, dict(acc.sender_bytes))
    for h in (
        header(2, x, unit=3),  # not a planned unit
        header(2, torch.ones(4)),  # the numel of another unit
        header(2, x, codec=pb.CODEC_INT8),  # another codec than the unit's
        header(2, x, unit=2),  # an int8 unit sent raw
    ):
        with pytest.raises(InvalidMessage):
            acc.reserve(h, published=0)
        assert (acc.pending(), acc.pending_bytes, dict(acc.sender_bytes)) == before
    with pytest.raises(InvalidMessage):  # this rank's own slice must follow its plan too
        acc.contribute_local(1, 0, 0, torch.ones(5))
    with pytest.raises(InvalidMessage):  # in the unit's codec
        acc.contribute_local(1, 0, 2, torch.ones(8), pb.CODEC_NONE)
    # a plan of another epoch does not apply; a new epoch drops the old plan
    acc.set_plan(WirePlan.build(7, raw({9: 1}), 1024))
    assert acc.plan is not None and acc.plan.epoch == 1
    acc.set_group(group(epoch=2))
    assert acc.plan is None


def test_one_sender_holds_at_most_window_plus_one_steps_of_the_plan() -> None:
    acc = GradientAccumulator(window=1)
    acc.set_group(group(epoch=1))
    acc.set_plan(WirePlan.build(1, raw({0: 8, 1: 8}), 1024))  # 64 bytes a step
    acc.release(1, 0)
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
    acc.release(1, 3)
    assert acc.sender_bytes == {} and acc.pending_bytes == 0


def test_calls_off_the_plan_fail_on_the_fake_and_on_grpc() -> None:
    hub = FakeHub(1)
    fake = hub.backend(0)
    g = group(world=1)
    fake.set_plan(g, {0: UnitSpec(4), 1: UnitSpec(4, "int8")})
    assert torch.equal(fake.all_gather(g, 0, 0, torch.ones(4), torch.empty(4), 5).result(5), torch.ones(4))
    with pytest.raises(InvalidMessage):
        fake.all_gather(g, 0, 1, torch.ones(4), torch.empty(4), 5).result(5)
    with pytest.raises(InvalidMessage):
        fake.reduce_scatter(g, 0, 0, torch.ones(5), torch.empty(5), 5).result(5)
    with pytest.raises(InvalidMessage):  # another codec than the unit's
        fake.all_gather(g, 0, 0, torch.ones(4), torch.empty(4), 5, codec="int8").result(5)
    x = torch.randn(4)  # the fake serves int8 calls exactly (raw fp32)
    assert torch.equal(fake.all_gather(g, 0, 1, x, torch.empty(4), 5, codec="int8").result(5), x)
    fake.close()
    grpc_backend = GrpcBackend("tok")
    try:
        port = grpc_backend.start()
        g = PeerGroup("job", 1, 0, (f"127.0.0.1:{port}",))
        grpc_backend.set_plan(g, raw({0: 4}))
        with pytest.raises(ValueError):
            grpc_backend.set_plan(g, raw({0: -4}))
        with pytest.raises(ValueError):
            grpc_backend.set_plan(g, {0: 4})  # type: ignore[dict-item]
        assert torch.equal(
            grpc_backend.all_gather(g, 0, 0, torch.ones(4), torch.empty(4), 5).result(5), torch.ones(4)
        )
        with pytest.raises(InvalidMessage):
            grpc_backend.all_gather(g, 0, 0, torch.ones(5), torch.empty(5), 5).result(5)
        with pytest.raises(InvalidMessage):
            grpc_backend.reduce_scatter(g, 0, 3, torch.ones(4), torch.empty(4), 5).result(5)
        with pytest.raises(InvalidMessage):
            grpc_backend.all_gather(g, 1, 0, torch.ones(4), torch.empty(4), 5, codec="int8").result(5)
    finally:
        grpc_backend.close()


def test_the_engine_declares_its_units_and_keeps_control_values_off_the_plan() -> None:
    hub = FakeHub(2)
    model = TinyNet()
    g = PeerGroup("job", 1, 0, ("a:1", "b:1"))
    plan_units = plan_model(model, 2, UNITS)
    engine = ShardedModule(model, g, hub.backend(0), plan=plan_units, timeout=5.0, codec="int8")
    try:
        plan = engine.wire_plan()
        n = len(engine.units)
        assert {u: plan[u] for u in range(n)} == {
            u.index: UnitSpec(u.plan.shard_numel, "int8") for u in engine.units
        }
        # control values are off the plan: they travel on the exact exchange, each under its own key
        assert set(plan) == set(range(n))
        keys = {
            control_key(s, c, k)
            for s in (0, 1, MAX_STEP_KEY)
            for c in Channel
            if c < Channel.HANDOVER
            for k in range(BARRIER_SLOTS if c == Channel.BARRIER else 1)
        }
        assert len(keys) == 3 * (len([c for c in Channel if c < Channel.HANDOVER]) - 1 + BARRIER_SLOTS)
        assert control_key(1, Channel.VOTE) == KEYS_PER_STEP + Channel.VOTE
        for bad in (
            lambda: control_key(0, Channel.BARRIER, BARRIER_SLOTS),
            lambda: control_key(0, Channel.VOTE, 1),
            lambda: control_key(MAX_STEP_KEY + 1, Channel.VOTE),
            lambda: control_key(0, Channel.HANDOVER),
        ):
            with pytest.raises(ValueError):
                bad()
    finally:
        engine.close()
