"""Admission on the wire with real gRPC on loopback: three GrpcBackends (ranks 0, 1, 2) holding data-plane
keys and a declared partition plan, and a misbehaving caller that holds the cluster token and, as rank 2,
rank 2's own keys. Each attack on rank 0 is rejected with its status code and changes nothing there;
then the real ranks run the same step and rank 0 receives the exact rank-order sum of their gradients."""

from __future__ import annotations

import itertools
import os
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
import torch

from communication import peer_auth
from communication.backend import UnitSpec
from communication.group import PeerGroup
from communication.grpc_backend import GrpcBackend
from communication.server import token_metadata
from communication.servicer import FETCH_METHOD, PUSH_METHOD
from communication.tensor_stream import Key, data_chunks, header_chunk, make_header, parse_chunk
from protos import zerowire_pb2 as pb

TOKEN = "s3cret"
AUTH = token_metadata(TOKEN)
EPOCH = 4
N = 1000  # values in every rank's shard of every planned unit
PLAN = {0: UnitSpec(N), 1: UnitSpec(N)}
UNIT = 0
IDLE_S, STREAM_S = 0.4, 1.5
pytestmark = pytest.mark.timeout(60)


@dataclass
class Cluster:
    backends: list[GrpcBackend]
    groups: list[PeerGroup]
    keys: dict[frozenset[int], bytes]
    channel: grpc.Channel  # to rank 0, for the misbehaving caller

    def key(self, a: int, b: int) -> bytes:
        return self.keys[frozenset((a, b))]

    def on_rank0(self, read: Callable[[Any], Any]) -> Any:
        """`read(backend)` evaluated on rank 0's event loop."""
        backend = self.backends[0]

        async def run() -> Any:
            return read(backend)

        return backend.call_soon(run()).result(5)

    def state(self) -> tuple[int, int, dict[int, int]]:
        """Rank 0's pending reductions, reserved bytes, and reserved bytes per sender."""

        def read(b: GrpcBackend) -> tuple[int, int, dict[int, int]]:
            assert b._wire is not None
            acc = b._wire.accumulator
            return acc.pending(), acc.pending_bytes, dict(acc.sender_bytes)

        return self.on_rank0(read)  # type: ignore[no-any-return]

    def waiting(self) -> int:
        def read(b: GrpcBackend) -> int:
            assert b._store is not None
            return b._store.waiting

        return self.on_rank0(read)  # type: ignore[no-any-return]


@pytest.fixture
def cluster() -> Iterator[Cluster]:
    backends = [GrpcBackend(TOKEN, idle_timeout=IDLE_S, stream_timeout=STREAM_S) for _ in range(3)]
    channel: grpc.Channel | None = None
    try:
        addresses = tuple(f"127.0.0.1:{b.start()}" for b in backends)
        keys = {frozenset(pair): os.urandom(32) for pair in itertools.combinations(range(3), 2)}
        groups = [
            PeerGroup(
                "job", EPOCH, r, addresses, peer_keys={p: keys[frozenset((r, p))] for p in range(3) if p != r}
            )
            for r in range(3)
        ]
        for backend, group in zip(backends, groups, strict=True):
            backend.set_group(group)
            backend.set_plan(group, PLAN)
        channel = grpc.insecure_channel(addresses[0])
        yield Cluster(backends, groups, keys, channel)
    finally:
        if channel is not None:
            channel.close()
        for b in backends:
            b.close()


# -- the real ranks --------------------------------------------------------------------------------------
def shard(rank: int, step: int) -> torch.Tensor:
    return torch.randn(N, generator=torch.Generator().manual_seed(100 * step + rank))


def grad(rank: int, step: int) -> torch.Tensor:
    # magnitudes far apart: a float32 sum in another order, or with a forged part, gives other bits
    scale = (1e7, 1.0, -1e7)[rank]
    return scale * torch.rand(3 * N, generator=torch.Generator().manual_seed(1000 + 100 * step + rank))


def expected_sum(step: int) -> torch.Tensor:
    acc = grad(0, step)[:N].clone()
    for r in (1, 2):
        acc.add_(grad(r, step)[:N])
    return acc


def gather(c: Cluster, step: int) -> None:
    futs = [
        c.backends[r].all_gather(c.groups[r], step, UNIT, shard(r, step), torch.empty(3 * N), 10)
        for r in range(3)
    ]
    outs = [f.result(15) for f in futs]
    want = torch.cat([shard(r, step) for r in range(3)])
    assert all(torch.equal(o, want) for o in outs)


def reduce(c: Cluster, step: int, ranks: tuple[int, ...] = (0, 1, 2)) -> list[Future[torch.Tensor]]:
    return [
        c.backends[r].reduce_scatter(c.groups[r], step, UNIT, grad(r, step), torch.empty(N), 10)
        for r in ranks
    ]


def finish_step(c: Cluster, step: int, futs: list[Future[torch.Tensor]] | None = None) -> None:
    """The real ranks reduce `step` (or wait for reductions already started, rank 0 first) and commit;
    rank 0 holds exactly the rank-order float32 sum of its slices."""
    outs = [f.result(15) for f in (futs if futs is not None else reduce(c, step))]
    assert torch.equal(outs[0], expected_sum(step))
    for r in range(3):
        c.backends[r].release(c.groups[r], step)


# -- the misbehaving caller ------------------------------------------------------------------------------
def grad_header(step: int, sender: int, x: torch.Tensor, **fields: Any) -> pb.TensorHeader:
    h = make_header(
        Key("job", EPOCH, step, UNIT, 0),
        sender,
        torch.float32,
        x.numel(),
        pb.CODEC_NONE,
        0,
        x.view(torch.uint8),
    )
    for name, value in fields.items():
        if name == "shape":
            del h.shape[:]
            h.shape.extend(value)
        else:
            setattr(h, name, value)
    return h


def payload_of(messages: list[bytes]) -> bytes:
    """The payload bytes of a fetched stream (after its header message)."""
    return b"".join(bytes(parse_chunk(m)[1]) for m in messages[1:])


def mac_of(key: bytes | None, method: str, message: bytes) -> tuple[tuple[str, str], ...]:
    return AUTH if key is None else (*AUTH, (peer_auth.MAC_METADATA_KEY, peer_auth.mac(key, method, message)))


def push(
    c: Cluster,
    h: pb.TensorHeader,
    payload: bytes,
    key: bytes | None,
    *,
    mac_for: pb.TensorHeader | None = None,
) -> pb.PushAck:
    """Stream a gradient to rank 0 with the MAC of `mac_for` (default `h`) under `key` (None: no MAC)."""
    call = c.channel.stream_unary(
        PUSH_METHOD, request_serializer=lambda b: b, response_deserializer=pb.PushAck.FromString
    )
    metadata = mac_of(key, PUSH_METHOD, peer_auth.push_message(mac_for or h))
    messages = [header_chunk(h), *data_chunks(memoryview(payload))]
    return call(iter(messages), timeout=10, metadata=metadata)  # type: ignore[no-any-return]


def fetch_request(step: int, sender: int, **fields: Any) -> bytes:
    base: dict[str, Any] = dict(job_id="job", epoch=EPOCH, step=step, unit=UNIT, shard=0, sender=sender)
    return pb.FetchRequest(**{"codec": pb.CODEC_NONE, **base, **fields}).SerializeToString()


def fetch(
    c: Cluster, raw: bytes, key: bytes | None, *, mac_for: bytes | None = None, timeout: float = 10
) -> Any:
    """A FetchShard call to rank 0 (started at once; iterate it for the chunks)."""
    call = c.channel.unary_stream(
        FETCH_METHOD, request_serializer=lambda b: b, response_deserializer=lambda b: b
    )
    return call(raw, timeout=timeout, metadata=mac_of(key, FETCH_METHOD, mac_for or raw))


def status_of(fn: Callable[[], object]) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as info:
        fn()
    return info.value.code()  # type: ignore[no-any-return]


def raw(x: torch.Tensor) -> bytes:
    return x.numpy().tobytes()


UNAUTHENTICATED = grpc.StatusCode.UNAUTHENTICATED
INVALID = grpc.StatusCode.INVALID_ARGUMENT
STALE = grpc.StatusCode.FAILED_PRECONDITION


# -- the attacks -----------------------------------------------------------------------------------------
def test_a_peer_claiming_another_rank_or_without_a_mac_is_unauthenticated(cluster: Cluster) -> None:
    c = cluster
    gather(c, 0)
    before = c.state()
    forged = torch.full((N,), 1e6)  # what "rank 1" would contribute if the forgery got in
    h = grad_header(0, 1, forged)
    assert status_of(lambda: push(c, h, raw(forged), c.key(0, 2))) == UNAUTHENTICATED  # rank 2's own key
    assert status_of(lambda: push(c, h, raw(forged), os.urandom(32))) == UNAUTHENTICATED  # a guessed key
    assert status_of(lambda: push(c, h, raw(forged), None)) == UNAUTHENTICATED  # no MAC at all
    # rank 1's genuine MAC of another header does not carry over (here: of step 1)
    genuine_other = grad_header(1, 1, forged)
    assert status_of(lambda: push(c, h, raw(forged), c.key(0, 1), mac_for=genuine_other)) == UNAUTHENTICATED
    # nor does a MAC for the other direction (rank 0 -> rank 1) reflected back
    reflected = grad_header(0, 0, forged, shard=1)
    assert status_of(lambda: push(c, h, raw(forged), c.key(0, 1), mac_for=reflected)) == UNAUTHENTICATED
    # fetches: the requester must prove the rank it names
    req = fetch_request(0, sender=1)
    assert status_of(lambda: list(fetch(c, req, c.key(0, 2)))) == UNAUTHENTICATED
    assert status_of(lambda: list(fetch(c, req, None))) == UNAUTHENTICATED
    assert status_of(lambda: list(fetch(c, req, c.key(0, 1), mac_for=fetch_request(1, sender=1)))) == (
        UNAUTHENTICATED
    )
    assert len(list(fetch(c, req, c.key(0, 1)))) == 2  # the genuine MAC: header + one chunk
    assert c.state() == before
    finish_step(c, 0)


def test_off_plan_and_oversized_headers_are_rejected_before_anything_is_allocated(cluster: Cluster) -> None:
    c = cluster
    gather(c, 0)
    before = c.state()
    k = c.key(0, 2)  # rank 2, under its own name
    x = grad(2, 0)[:N].contiguous()
    huge = 1 << 30  # a header claiming 4 GiB of float32
    cases = {
        "unit not in the plan": grad_header(0, 2, x, unit=7),
        "oversized": grad_header(0, 2, x, numel=huge, payload_bytes=4 * huge, length=4 * huge, shape=[huge]),
        "numel not the plan's": grad_header(
            0, 2, x, numel=N + 1, payload_bytes=4 * (N + 1), length=4 * (N + 1), shape=[N + 1]
        ),
        "another codec": grad_header(0, 2, x, codec=pb.CODEC_INT8, block_size=64),
        "another dtype": grad_header(0, 2, x, dtype=pb.DTYPE_FLOAT16),
    }
    for what, h in cases.items():
        assert status_of(lambda h=h: push(c, h, b"", k)) == INVALID, what
        assert c.state() == before, what
    # fetches off the plan are refused at once, not after waiting for step 1 to be published
    off_plan = {
        "unit not in the plan": fetch_request(1, 2, unit=7),
        "another codec": fetch_request(1, 2, codec=pb.CODEC_INT8, block_size=256),
        "another block": fetch_request(1, 2, block_size=64),
        "range past the payload": fetch_request(1, 2, offset=4 * N),
        "range longer than the payload": fetch_request(1, 2, offset=8, length=4 * N),
    }
    for what, req in off_plan.items():
        start = time.monotonic()
        assert status_of(lambda req=req: list(fetch(c, req, k, timeout=20))) == INVALID, what
        assert time.monotonic() - start < 5.0, what
    served = payload_of(list(fetch(c, fetch_request(0, 2, offset=8, length=4 * N - 8), k)))  # in the plan
    assert served == raw(shard(0, 0))[8:]
    assert c.state() == before
    finish_step(c, 0)


def test_a_replayed_push_is_a_duplicate_then_stale(cluster: Cluster) -> None:
    c = cluster
    gather(c, 0)
    sent = c.backends[1].stats().bytes_sent
    futs = reduce(c, 0, ranks=(0, 1))
    deadline = time.monotonic() + 10
    while c.backends[1].stats().bytes_sent < sent + 2 * 4 * N:  # both of rank 1's pushes acknowledged
        assert time.monotonic() < deadline
        time.sleep(0.01)
    # the very bytes rank 1 sent: same header, same payload, same MAC
    mine = grad(1, 0)[:N].contiguous()
    replay = make_header(
        Key("job", EPOCH, 0, UNIT, 0), 1, torch.float32, N, pb.CODEC_NONE, 0, mine.view(torch.uint8)
    )
    before = c.state()
    assert status_of(lambda: push(c, replay, raw(mine), c.key(0, 1))) == INVALID  # duplicate contribution
    assert c.state() == before
    futs.append(reduce(c, 0, ranks=(2,))[0])
    finish_step(c, 0, futs)
    assert status_of(lambda: push(c, replay, raw(mine), c.key(0, 1))) == STALE  # the step is committed
    assert c.state() == (0, 0, {})


def test_pushes_before_publication_and_far_in_the_future_are_stale(cluster: Cluster) -> None:
    c = cluster
    k = c.key(0, 2)
    x = grad(2, 0)[:N].contiguous()
    # rank 0 has published nothing in this epoch: no peer can have gathered from it, so no push is due
    assert status_of(lambda: push(c, grad_header(0, 2, x), raw(x), k)) == STALE
    assert c.state() == (0, 0, {})
    gather(c, 0)
    for step in (2, 3, 4096, 1 << 40):  # only steps 0 (published) and 1 (the next) are accepted
        assert status_of(lambda step=step: push(c, grad_header(step, 2, x), raw(x), k)) == STALE, step
    assert c.state() == (0, 0, {})
    finish_step(c, 0)


def test_a_trickling_sender_loses_its_reservation(cluster: Cluster) -> None:
    c = cluster
    gather(c, 0)
    futs = reduce(c, 0, ranks=(0, 1))
    x = grad(2, 0)[:N].contiguous()
    payload = raw(x)
    h = grad_header(0, 2, x)

    def trickle() -> Iterator[bytes]:  # 100 bytes every 0.25 s: each gap under the idle timeout
        yield header_chunk(h)
        for i in range(0, len(payload), 100):
            time.sleep(0.25)
            yield pb.TensorChunk(data=payload[i : i + 100]).SerializeToString()

    call = c.channel.stream_unary(
        PUSH_METHOD, request_serializer=lambda b: b, response_deserializer=pb.PushAck.FromString
    )
    metadata = mac_of(c.key(0, 2), PUSH_METHOD, peer_auth.push_message(h))
    start = time.monotonic()
    assert (
        status_of(lambda: call(trickle(), timeout=30, metadata=metadata)) == grpc.StatusCode.DEADLINE_EXCEEDED
    )
    elapsed = time.monotonic() - start
    assert STREAM_S - 0.1 <= elapsed < STREAM_S + 4.0, (
        elapsed
    )  # cut at the stream limit, not the caller's 30 s
    assert 2 not in c.state()[2]  # rank 2's reservation is gone: its real push is welcome
    futs.append(reduce(c, 0, ranks=(2,))[0])
    finish_step(c, 0, futs)


def test_one_sender_holds_at_most_its_share_of_streams(cluster: Cluster) -> None:
    c = cluster
    k2, k1 = c.key(0, 2), c.key(0, 1)
    flood = [fetch(c, fetch_request(0, 2), k2, timeout=30) for _ in range(8)]  # all wait: nothing published
    deadline = time.monotonic() + 10
    while c.waiting() < 8:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert status_of(lambda: list(fetch(c, fetch_request(0, 2), k2))) == grpc.StatusCode.RESOURCE_EXHAUSTED
    honest = fetch(c, fetch_request(0, 1), k1, timeout=30)  # rank 1's streams are its own
    while c.waiting() < 9:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    for call in flood:
        call.cancel()
    while c.waiting() > 1:  # the flood's slots are free again
        assert time.monotonic() < deadline
        time.sleep(0.01)
    gather(c, 0)
    assert payload_of(list(honest)) == raw(shard(0, 0))
    finish_step(c, 0)
