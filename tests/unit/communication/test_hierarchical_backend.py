"""HierarchicalBackend in one process (each rank its own gRPC server, torch.distributed lane and, per
simulated host, the lowest rank's RendezvousStore; real sockets on loopback): the host layout, the
choice of path, bad input, an epoch change mid-collective, and no thread left after close.

Tolerance of a hierarchical reduce-scatter against the flat rank-order sum: per value
2 (N-1) * 2^-24 * sum_r |x_r| (tests/integration/wire_harness.rounding_bound)."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future

import pytest
import torch

from communication.backend import UnitSpec
from communication.errors import EpochChanged
from communication.group import PeerGroup
from communication.grpc_backend import GrpcBackend
from communication.hierarchical import HierarchicalBackend
from communication.host_layout import HostLayout, host_layout
from communication.rendezvous_store import RendezvousStore
from communication.testing import FakeHub
from communication.torchdist import TorchDistBackend
from tests.integration.wire_harness import rounding_bound, rounding_units

pytestmark = pytest.mark.timeout(90)


def _group(rank: int, hosts: str, stores: tuple[str, ...] = (), epoch: int = 1) -> PeerGroup:
    ids = tuple(hosts.split(","))
    addresses = tuple(f"127.0.0.1:{1000 + r}" for r in range(len(ids)))
    keys = {r: bytes([rank, r]) * 16 for r in range(len(ids)) if r != rank}
    return PeerGroup("job", epoch, rank, addresses, ids, keys, stores)


def test_layout_of_interleaved_ranks() -> None:
    stores = tuple(f"127.0.0.1:{2000 + r}" for r in range(6))
    layouts = [host_layout(_group(r, "x,y,x,y,x,y", stores)) for r in range(6)]
    assert all(isinstance(lay, HostLayout) for lay in layouts)
    lay = layouts[4]
    assert isinstance(lay, HostLayout)
    assert lay.hosts == ((0, 2, 4), (1, 3, 5)) and (lay.host, lay.local) == (0, 2)
    assert lay.rendezvous == "127.0.0.1:2000"
    assert lay.local_group.rank == 2 and lay.local_group.addresses == (
        "127.0.0.1:1000",
        "127.0.0.1:1002",
        "127.0.0.1:1004",
    )
    remote = lay.remote_group
    assert remote is not None and remote.rank == 0
    assert remote.addresses == ("127.0.0.1:1004", "127.0.0.1:1005")
    assert remote.peer_keys == {1: bytes([4, 5]) * 16}  # this rank's key with global rank 5
    assert lay.order.tolist() == [0, 1, 2, 3, 4, 5]  # (h0,l0) (h1,l0) (h0,l1) ...: here rank order
    lay1 = layouts[1]
    assert isinstance(lay1, HostLayout) and lay1.rendezvous == "127.0.0.1:2001"
    # chunks to local-major order and back
    full = torch.arange(12.0)
    arranged = lay.to_local_major(full, 2)
    back = torch.empty(12)
    lay.from_local_major(arranged, back, 2)
    assert torch.equal(back, full)


def test_layout_reorders_host_major_chunks() -> None:
    lay = host_layout(_group(1, "a,a,b,b", ("s:1", "s:2", "s:3", "s:4")))
    assert isinstance(lay, HostLayout)
    assert lay.order.tolist() == [0, 2, 1, 3]
    assert lay.to_local_major(torch.arange(4.0), 1).tolist() == [0.0, 2.0, 1.0, 3.0]
    assert lay.remote_group is not None and lay.remote_group.addresses == ("127.0.0.1:1001", "127.0.0.1:1003")


@pytest.mark.parametrize(
    ("hosts", "stores", "reason"),
    [
        ("a,b,c", ("s:1", "s:2", "s:3"), "one member per host"),
        ("a,a,b", ("s:1", "s:2", "s:3"), "hosts of uneven size"),
        ("a,a,b,b", (), "no rendezvous store"),
        ("a,a,b,b", ("s:1", "s:2", "", "s:4"), "no rendezvous store"),
    ],
)
def test_flat_when_hosts_do_not_fit(hosts: str, stores: tuple[str, ...], reason: str) -> None:
    found = host_layout(_group(0, hosts, stores))
    assert isinstance(found, str) and found.startswith(reason)
    assert host_layout(PeerGroup("job", 1, 0, ("a:1", "a:2"))) == "no host ids"


def test_malformed_store_address_is_refused() -> None:
    with pytest.raises(ValueError, match="host:port"):
        host_layout(_group(0, "a,a", ("nope", "")))


class _Cluster:
    """`hosts` as simulated hosts: every rank a GrpcBackend + TorchDistBackend (library collective
    timeout 4 s), every rank a store."""

    def __init__(self, hosts: str) -> None:
        ids = hosts.split(",")
        self.world = len(ids)
        self.stores = [RendezvousStore() for _ in ids]
        self.backends = [
            HierarchicalBackend(
                GrpcBackend("tok"), TorchDistBackend(collective_timeout=4, rendezvous_timeout=20)
            )
            for _ in ids
        ]
        ports = [b.remote.start() for b in self.backends]
        self.addresses = tuple(f"127.0.0.1:{p}" for p in ports)
        self.ids = tuple(ids)
        self.store_addresses = tuple(s.address for s in self.stores)

    def group(self, rank: int, epoch: int = 1, stores: bool = True) -> PeerGroup:
        st = self.store_addresses if stores else ()
        return PeerGroup("job", epoch, rank, self.addresses, self.ids, store_addresses=st)

    def close(self) -> None:
        for b in self.backends:
            b.close()
        for s in self.stores:
            s.close()


@pytest.fixture
def cluster(request: pytest.FixtureRequest) -> Iterator[_Cluster]:
    c = _Cluster(request.param)
    try:
        yield c
    finally:
        began = time.monotonic()
        c.close()
        # an abandoned local group's library work ends at the library's collective timeout (4 s)
        assert time.monotonic() - began < 8
    assert not [t for t in threading.enumerate() if t.name.startswith(("torchdist", "zerowire"))]


def _all(futs: list[Future[torch.Tensor]]) -> None:
    for f in futs:
        f.result(30)


@pytest.mark.parametrize("cluster", ["a,a,b,b"], indirect=True)
def test_reduce_scatter_within_rounding_and_epoch_change_fails_calls(cluster: _Cluster) -> None:
    world, n = cluster.world, 300_001
    groups = [cluster.group(r) for r in range(world)]
    for b, g in zip(cluster.backends, groups, strict=True):
        b.set_group(g)
        b.set_plan(g, {7: UnitSpec(n)})
        assert b.mode == "hierarchical"
    shards = [torch.randn(n) for _ in range(world)]
    gathered = [torch.empty(world * n) for _ in range(world)]
    _all(
        [
            b.all_gather(g, 0, 7, s, o, 20)
            for b, g, s, o in zip(cluster.backends, groups, shards, gathered, strict=True)
        ]
    )
    assert all(torch.equal(o, torch.cat(shards)) for o in gathered)
    fulls = [torch.randn(world * n) * 10 ** (r % 3) for r in range(world)]
    outs = [torch.empty(n) for _ in range(world)]
    _all(
        [
            b.reduce_scatter(g, 0, 7, f, o, 20)
            for b, g, f, o in zip(cluster.backends, groups, fulls, outs, strict=True)
        ]
    )
    for r in range(world):
        parts = [f[r * n : (r + 1) * n] for f in fulls]
        want = parts[0].clone()
        for p in parts[1:]:
            want.add_(p)
        assert rounding_units(outs[r], want, parts) <= rounding_bound(world)
    for b, g in zip(cluster.backends, groups, strict=True):
        b.release(g, 0)
    lanes = cluster.backends[0].bytes_by_lane()
    assert lanes == {"grpc": 2 * 4 * n, "local": 2 * 4 * 2 * n}
    assert cluster.backends[0].stats().bytes_sent == sum(lanes.values())
    # several calls in flight at once per rank (prefetch). The members of a host call in the same
    # order, host b in another than host a: there the small unit's gRPC stage completes first, yet
    # the local lane keeps the call order
    sizes = {7: n, 8: 3}
    for b, g in zip(cluster.backends, groups, strict=True):
        b.set_plan(g, {u: UnitSpec(m) for u, m in sizes.items()})
    data = {u: [torch.randn(m) for _ in range(world)] for u, m in sizes.items()}
    grads = {u: [torch.randn(world * m) for _ in range(world)] for u, m in sizes.items()}
    got: dict[tuple[int, int, str], torch.Tensor] = {}
    calls = []
    for r, (b, g) in enumerate(zip(cluster.backends, groups, strict=True)):
        for u in (7, 8) if r < 2 else (8, 7):
            got[(r, u, "ag")] = torch.empty(world * sizes[u])
            calls.append(b.all_gather(g, 1, u, data[u][r], got[(r, u, "ag")], 20))
        for u in (7, 8):
            got[(r, u, "rs")] = torch.empty(sizes[u])
            calls.append(b.reduce_scatter(g, 1, u, grads[u][r], got[(r, u, "rs")], 20))
    _all(calls)
    for r in range(world):
        for u, m in sizes.items():
            assert torch.equal(got[(r, u, "ag")], torch.cat(data[u]))
            parts = [f[r * m : (r + 1) * m] for f in grads[u]]
            assert rounding_units(got[(r, u, "rs")], torch.stack(parts).sum(0), parts) <= rounding_bound(
                world
            )
    for b, g in zip(cluster.backends, groups, strict=True):
        b.release(g, 1)
    # rank 3 never joins step 2: the others wait inside both collectives until the epoch moves on
    futs = [
        call
        for b, g in zip(cluster.backends[:3], groups[:3], strict=True)
        for call in (
            b.all_gather(g, 2, 7, shards[g.rank], torch.empty(world * n), 30),
            b.reduce_scatter(g, 2, 7, fulls[g.rank], torch.empty(n), 30),
        )
    ]
    time.sleep(0.5)
    assert not any(f.done() for f in futs)
    began = time.monotonic()
    for b in cluster.backends:
        b.set_epoch(2)
    for f in futs:
        with pytest.raises(EpochChanged):
            f.result(5)
    assert time.monotonic() - began < 2.0
    # a call of the old epoch now fails at once
    with pytest.raises(EpochChanged):
        cluster.backends[0].all_gather(groups[0], 3, 7, shards[0], torch.empty(world * n), 5).result(1)


@pytest.mark.parametrize("cluster", ["a,a,b"], indirect=True)
def test_uneven_hosts_take_the_flat_path_and_warn_once(
    cluster: _Cluster, caplog: pytest.LogCaptureFixture
) -> None:
    backend = cluster.backends[0]
    with caplog.at_level(logging.WARNING, logger="communication.hierarchical"):
        backend.set_group(cluster.group(0, 1))
        backend.set_group(cluster.group(0, 2))
    assert backend.mode == "flat"
    assert len([r for r in caplog.records if "uneven" in r.getMessage()]) == 1
    # bad input changes nothing: an older epoch, a different group for the installed epoch
    with pytest.raises(EpochChanged):
        backend.set_group(cluster.group(0, 1))
    with pytest.raises(ValueError, match="different group"):
        backend.set_group(cluster.group(0, 2, stores=False))
    assert backend.mode == "flat" and backend.bytes_by_lane() == {"grpc": 0, "local": 0}


@pytest.mark.parametrize("cluster", ["a,a"], indirect=True)
def test_without_store_addresses_co_located_members_use_grpc(
    cluster: _Cluster, caplog: pytest.LogCaptureFixture
) -> None:
    groups = [cluster.group(r, stores=False) for r in range(2)]
    with caplog.at_level(logging.WARNING, logger="communication.hierarchical"):
        for b, g in zip(cluster.backends, groups, strict=True):
            b.set_group(g)
    assert [b.mode for b in cluster.backends] == ["flat", "flat"]
    assert any("no rendezvous store" in r.getMessage() for r in caplog.records)
    shards = [torch.randn(5) for _ in range(2)]
    outs = [torch.empty(10) for _ in range(2)]
    _all(
        [
            b.all_gather(g, 0, 0, s, o, 10)
            for b, g, s, o in zip(cluster.backends, groups, shards, outs, strict=True)
        ]
    )
    assert torch.equal(outs[1], torch.cat(shards))
    assert cluster.backends[0].bytes_by_lane() == {"grpc": 20, "local": 0}
    with pytest.raises(ValueError, match="float32"):
        cluster.backends[0].all_gather(groups[0], 1, 0, shards[0], torch.empty(3), 5)


def test_rendezvous_store_serves_client_only_groups_across_epochs() -> None:
    """Two ranks of one host join each epoch's group as clients of one long-lived store."""
    store = RendezvousStore()
    backends = [TorchDistBackend(collective_timeout=10, rendezvous_timeout=20) for _ in range(2)]
    try:
        host, port = store.address.rsplit(":", 1)
        assert host == "127.0.0.1" and int(port) == store.port > 0
        for epoch in (1, 2):
            groups = [PeerGroup("job", epoch, r, ("a:1", "a:2")) for r in range(2)]
            for b, g in zip(backends, groups, strict=True):
                b.set_group(g, store.address, host_store=False)
            shards = [torch.full((3,), float(r + epoch)) for r in range(2)]
            outs = [torch.empty(6) for _ in range(2)]
            _all(
                [
                    b.all_gather(g, 0, 0, s, o, 10)
                    for b, g, s, o in zip(backends, groups, shards, outs, strict=True)
                ]
            )
            assert all(torch.equal(o, torch.cat(shards)) for o in outs)
        assert backends[1].bytes_by_lane() == {"grpc": 0, "local": 24}
    finally:
        for b in backends:
            b.close()
        store.close()
    assert store.closed
    with pytest.raises(ValueError):
        RendezvousStore("")


def test_every_lane_counts_its_bytes_under_its_own_name() -> None:
    hub = FakeHub(1)
    assert hub.backend(0).bytes_by_lane() == {"grpc": 0, "local": 0}
    assert GrpcBackend("t").bytes_by_lane() == {"grpc": 0, "local": 0}
    local = TorchDistBackend.__new__(TorchDistBackend)
    local._lock, local._sent, local._received = threading.Lock(), 7, 3
    assert local.bytes_by_lane() == {"grpc": 0, "local": 7}


def _listeners(port: int) -> set[str]:
    """Local addresses (hex, as the kernel lists them) listening on `port`, over IPv4 and IPv6."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = open(table).read().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            local, state = line.split()[1], line.split()[3]
            address, port_hex = local.rsplit(":", 1)
            if state == "0A" and int(port_hex, 16) == port:
                found.add(address)
    return found


def test_a_rendezvous_store_listens_on_loopback_only() -> None:
    store = RendezvousStore()
    try:
        assert _listeners(store.port) == {"0100007F"}  # 127.0.0.1, and no wildcard listener
    finally:
        store.close()
    assert _listeners(store.port) == set()


@pytest.mark.parametrize("cluster", ["a,a,b,b"], indirect=True)
def test_point_to_point_takes_the_lane_that_reaches_the_peer(cluster: _Cluster) -> None:
    groups = [cluster.group(r) for r in range(cluster.world)]
    for b, g in zip(cluster.backends, groups, strict=True):
        b.set_group(g)
    x, y = torch.randn(1000), torch.randn(7)
    got = [torch.full((1000,), float("nan")), torch.full((7,), float("nan"))]
    b0, b1, b2 = cluster.backends[:3]
    before = b0.bytes_by_lane()
    handles: list[Future[torch.Tensor]] = [
        b0.send(x, group=groups[0], dest=1, key=3, timeout=20),  # same host: the local lane
        b1.recv(got[0], group=groups[1], src=0, key=3, timeout=20),
        b0.send(y, group=groups[0], dest=2, key=3, timeout=20),  # host b, local index 0: gRPC
        b2.recv(got[1], group=groups[2], src=0, key=3, timeout=20),
    ]
    _all(handles)
    assert torch.equal(got[0], x) and torch.equal(got[1], y)
    after = b0.bytes_by_lane()
    assert {lane: after[lane] - before[lane] for lane in after} == {"grpc": 4 * 7, "local": 4 * 1000}
    with pytest.raises(ValueError, match="no lane reaches rank 3"):  # host b, local index 1
        b0.send(x, group=groups[0], dest=3, key=3, timeout=20)


def test_device_tensors_only_where_every_member_shares_the_host() -> None:
    cuda = torch.device("cuda", 0)  # a device object only: nothing is allocated on it
    stores = tuple(f"127.0.0.1:{2000 + r}" for r in range(4))
    hier = HierarchicalBackend.__new__(HierarchicalBackend)  # accepts_device reads the group alone
    assert hier.accepts_device(_group(0, "h,h,h,h", stores), cuda)  # one host: torch.distributed only
    assert not hier.accepts_device(_group(0, "h,h,g,g", stores), cuda)  # a gRPC stage takes host memory
    assert not hier.accepts_device(_group(0, "a,b,c,d", stores), cuda)  # the flat gRPC path
    cpu = torch.device("cpu")
    grpc, local = GrpcBackend.__new__(GrpcBackend), TorchDistBackend.__new__(TorchDistBackend)
    for lane in (hier, grpc, local, FakeHub(4).backend(0)):  # host memory: every lane
        assert lane.accepts_device(_group(0, "a,b,c,d", stores), cpu)
    assert not grpc.accepts_device(_group(0, "h,h,h,h", stores), cuda)
    assert not FakeHub(4).backend(0).accepts_device(_group(0, "h,h,h,h", stores), cuda)
    assert local.accepts_device(_group(0, "h,h", stores[:2]), cuda)
