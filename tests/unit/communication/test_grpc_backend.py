"""GrpcBackend in one process (two ranks, each with its own event-loop thread and real gRPC on
loopback): epoch changes cancel in-flight collectives at once, dead peers fail fast, nothing leaks."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
import torch

from communication.backend import UnitSpec, control_unit
from communication.errors import CommError, EpochChanged, InvalidMessage, PeerLost
from communication.group import PeerGroup
from communication.grpc_backend import GrpcBackend
from tests.conftest import free_port

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def pair() -> Iterator[tuple[list[GrpcBackend], list[PeerGroup]]]:
    # tiny stripes: every fetch is split into 3 parallel range streams, received by copy threads
    backends = [
        GrpcBackend("tok", int8_block=256, stripes=3, stripe_min_bytes=1024, copy_threads=2) for _ in range(2)
    ]
    try:
        ports = [b.start() for b in backends]
        addresses = tuple(f"127.0.0.1:{p}" for p in ports)
        groups = [PeerGroup("job", 1, r, addresses) for r in range(2)]
        for b, g in zip(backends, groups, strict=True):
            b.set_group(g)
        yield backends, groups
    finally:
        for b in backends:
            b.close()


def test_collectives_then_epoch_change_cancels_in_flight_at_once(
    pair: tuple[list[GrpcBackend], list[PeerGroup]],
) -> None:
    backends, groups = pair
    n = 5000
    shards = [torch.randn(n) for _ in range(2)]
    outs = [torch.empty(2 * n) for _ in range(2)]
    futs = [backends[r].all_gather(groups[r], 0, 0, shards[r], outs[r], 10, codec="int8") for r in range(2)]
    for f in futs:
        f.result(15)
    assert torch.equal(outs[0], outs[1])  # both ranks see the same decoded parameters
    expected = torch.cat(shards)
    assert float((outs[0] - expected).norm() / expected.norm()) < 0.01
    assert backends[0]._wire is not None
    assert {lane for _, lane in backends[0]._wire.channels._channels} == {0, 1, 2}  # striped
    for r in range(2):
        backends[r].release(groups[r], 0)
    # rank 1 never joins step 1: rank 0's gather and reduce wait until the epoch moves on
    gather = backends[0].all_gather(groups[0], 1, 0, shards[0], outs[0], 30, codec="int8")
    reduce = backends[0].reduce_scatter(groups[0], 1, 0, torch.ones(2 * n), torch.empty(n), 30, codec="int8")
    time.sleep(0.3)
    assert not gather.done() and not reduce.done()
    assert backends[0].inflight() == 2
    start = time.monotonic()
    backends[0].set_epoch(2)
    for f in (gather, reduce):
        with pytest.raises(EpochChanged):
            f.result(5)
    assert time.monotonic() - start < 1.0
    assert backends[0].inflight() == 0
    # a call that names the old epoch fails at once
    with pytest.raises(EpochChanged):
        backends[0].all_gather(groups[0], 2, 0, shards[0], outs[0], 30).result(1)
    with pytest.raises(EpochChanged):
        backends[0].set_group(groups[0])


def test_set_group_of_a_newer_epoch_cancels_older_calls(
    pair: tuple[list[GrpcBackend], list[PeerGroup]],
) -> None:
    backends, groups = pair
    fut = backends[0].all_gather(groups[0], 0, 0, torch.ones(10), torch.empty(20), 30)
    newer = PeerGroup("job", 2, 0, groups[0].addresses)
    backends[0].set_group(newer)
    with pytest.raises(EpochChanged):
        fut.result(2)


def test_unreachable_peer_is_lost_fast() -> None:
    backend = GrpcBackend("tok")
    try:
        port = backend.start()
        group = PeerGroup("job", 1, 0, (f"127.0.0.1:{port}", f"127.0.0.1:{free_port()}"))
        backend.set_group(group)
        start = time.monotonic()
        with pytest.raises(PeerLost):
            backend.all_gather(group, 0, 0, torch.ones(10), torch.empty(20), 20).result(25)
        with pytest.raises(PeerLost):
            backend.reduce_scatter(group, 0, 0, torch.ones(20), torch.empty(10), 20).result(25)
        assert time.monotonic() - start < 5.0
        assert backend.inflight() == 0
    finally:
        backend.close()


def test_close_fails_in_flight_calls(pair: tuple[list[GrpcBackend], list[PeerGroup]]) -> None:
    backends, groups = pair
    # both gather step 0 (so each takes pushes of it), then only rank 0 reduces: it waits for rank 1
    gathers = [backends[r].all_gather(groups[r], 0, 0, torch.ones(10), torch.empty(20), 10) for r in range(2)]
    for g in gathers:
        g.result(15)
    fut = backends[0].reduce_scatter(groups[0], 0, 0, torch.ones(20), torch.empty(10), 30)
    time.sleep(0.2)
    assert not fut.done()
    backends[0].close()
    with pytest.raises(CommError, match="closing"):
        fut.result(5)
    with pytest.raises(RuntimeError, match="not started"):
        backends[0].set_epoch(3)


def test_bad_arguments_are_value_errors(pair: tuple[list[GrpcBackend], list[PeerGroup]]) -> None:
    backends, groups = pair
    with pytest.raises(ValueError):
        backends[0].all_gather(groups[0], 0, 0, torch.ones(10), torch.empty(21), 5)
    with pytest.raises(ValueError):
        backends[0].reduce_scatter(groups[0], 0, 0, torch.ones(21), torch.empty(10), 5)
    with pytest.raises(ValueError):
        backends[0].all_gather(groups[0], 0, 0, torch.ones(10), torch.empty(20), 5, codec="fp4")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        backends[0].reduce_scatter(groups[0], 0, 0, torch.ones(20), torch.empty(10), 5, codec="fp4")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        GrpcBackend("")
    with pytest.raises(ValueError):
        GrpcBackend("tok", int8_block=0)


def test_world_of_one() -> None:
    backend = GrpcBackend("tok")
    try:
        port = backend.start()
        group = PeerGroup("job", 0, 0, (f"127.0.0.1:{port}",))
        backend.set_group(group)
        x = torch.randn(10)
        assert torch.equal(backend.all_gather(group, 0, 0, x, torch.empty(10), 5).result(5), x)
        assert torch.equal(backend.reduce_scatter(group, 0, 0, x, torch.empty(10), 5).result(5), x)
        backend.release(group, 0)
    finally:
        backend.close()


def test_one_backend_carries_each_call_in_its_own_codec(
    pair: tuple[list[GrpcBackend], list[PeerGroup]],
) -> None:
    """In one step, unit 0 travels int8 (approximate, with error feedback on its reduction) and the
    control channel travels raw (bit for bit, no residual kept); a call in another codec than its unit's
    is off the plan."""
    backends, groups = pair
    n, control = 3000, control_unit(0)
    plan = {0: UnitSpec(n, "int8"), control: UnitSpec(3)}
    for b, g in zip(backends, groups, strict=True):
        b.set_plan(g, plan)
    gen = torch.Generator().manual_seed(7)
    shards = [torch.randn(n, generator=gen) for _ in range(2)]
    values = [torch.randn(3, generator=gen) / 3e4 for _ in range(2)]  # nothing an int8 block keeps exactly
    fulls = [torch.randn(2 * n, generator=gen) for _ in range(2)]
    outs = [torch.empty(2 * n) for _ in range(2)]
    exact = [torch.empty(6) for _ in range(2)]
    reduced = [torch.empty(n) for _ in range(2)]
    sums = [torch.empty(3) for _ in range(2)]
    gathers = []
    for r in range(2):  # a step gathers first: a peer's pushes are taken once this rank has published
        b, g = backends[r], groups[r]
        gathers += [
            b.all_gather(g, 0, 0, shards[r], outs[r], 10, codec="int8"),
            b.all_gather(g, 0, control, values[r], exact[r], 10, codec="none"),
        ]
    for f in gathers:
        f.result(15)
    reductions = []
    for r in range(2):
        b, g = backends[r], groups[r]
        reductions += [
            b.reduce_scatter(g, 0, 0, fulls[r], reduced[r], 10, codec="int8"),
            b.reduce_scatter(g, 0, control, torch.cat(values), sums[r], 10),
        ]
    for f in reductions:
        f.result(15)
    want = torch.cat(shards)
    for r in range(2):
        assert torch.equal(exact[r], torch.cat(values))  # raw: bit for bit
        assert torch.equal(sums[r], values[r] + values[r])  # own slice first, then the peer's: same values
        assert not torch.equal(outs[r], want) and float((outs[r] - want).norm() / want.norm()) < 0.01
        part = fulls[0][r * n : (r + 1) * n] + fulls[1][r * n : (r + 1) * n]
        assert float((reduced[r] - part).norm() / part.norm()) < 0.03
        # one residual, for the int8 unit's slice to the peer: n values + one fp32 scale per 256-block
        assert backends[r]._feedback.residual_bytes == n + 4 * -(-n // 256)
    with pytest.raises(InvalidMessage, match="plan says"):
        backends[0].all_gather(groups[0], 1, 0, shards[0], outs[0], 5, codec="none").result(5)
    with pytest.raises(InvalidMessage, match="plan says"):
        backends[0].reduce_scatter(groups[0], 1, control, torch.ones(6), sums[0], 5, codec="int8").result(5)
