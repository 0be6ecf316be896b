"""The Wire service behind a real grpc.aio server on 127.0.0.1:0: authentication, health, shard
serving, and every kind of bad input (each mapped to its status code, none changing any state)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from communication.compression import encode
from communication.group import PeerGroup
from communication.grpc_backend import GrpcBackend
from communication.server import token_metadata
from communication.servicer import FETCH_METHOD, PUSH_METHOD
from communication.tensor_stream import CHUNK_BYTES, Key, data_chunks, header_chunk, make_header, parse_chunk
from protos import zerowire_pb2 as pb
from protos import zerowire_pb2_grpc

TOKEN = "s3cret"
AUTH = token_metadata(TOKEN)
pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module")
def server() -> Iterator[tuple[GrpcBackend, PeerGroup, grpc.Channel]]:
    backend = GrpcBackend(TOKEN, idle_timeout=0.5)
    port = backend.start("127.0.0.1:0")
    group = PeerGroup("job", 3, 0, (f"127.0.0.1:{port}", "127.0.0.1:9", "127.0.0.1:9"))
    backend.set_group(group)
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    try:
        yield backend, group, channel
    finally:
        channel.close()
        backend.close()


def pending(backend: GrpcBackend) -> tuple[int, int]:
    async def read() -> tuple[int, int]:
        assert backend._wire is not None
        acc = backend._wire.accumulator
        return acc.pending(), acc.pending_bytes

    return backend.call_soon(read()).result(5)


def fetch_raw(channel: grpc.Channel) -> grpc.UnaryStreamMultiCallable:
    return channel.unary_stream(
        FETCH_METHOD, request_serializer=lambda b: b, response_deserializer=lambda b: b
    )


def push_raw(channel: grpc.Channel) -> grpc.StreamUnaryMultiCallable:
    return channel.stream_unary(
        PUSH_METHOD, request_serializer=lambda b: b, response_deserializer=pb.PushAck.FromString
    )


def grad_header(x: torch.Tensor, step: int, sender: int = 1, epoch: int = 3) -> pb.TensorHeader:
    payload = x.view(torch.uint8)
    return make_header(
        Key("job", epoch, step, 0, 0), sender, torch.float32, x.numel(), pb.CODEC_NONE, 0, payload
    )


def gradient_stream(h: pb.TensorHeader, x: torch.Tensor) -> list[bytes]:
    return [header_chunk(h), *data_chunks(memoryview(x.numpy().tobytes()))]


def status_of(fn: object) -> grpc.StatusCode:
    assert callable(fn)
    with pytest.raises(grpc.RpcError) as info:
        fn()
    return info.value.code()  # type: ignore[no-any-return]


def test_calls_without_the_token_are_unauthenticated(
    server: tuple[GrpcBackend, PeerGroup, grpc.Channel],
) -> None:
    _, _, channel = server
    stub = zerowire_pb2_grpc.WireStub(channel)
    req = pb.FetchRequest(job_id="job", epoch=3, step=0, unit=0, shard=0, sender=1, codec=pb.CODEC_NONE)
    assert status_of(lambda: list(stub.FetchShard(req, timeout=5))) == grpc.StatusCode.UNAUTHENTICATED
    bad = (("authorization", "Bearer wrong"),)
    assert (
        status_of(lambda: list(stub.FetchShard(req, timeout=5, metadata=bad)))
        == grpc.StatusCode.UNAUTHENTICATED
    )
    x = torch.ones(4)
    push = push_raw(channel)
    assert status_of(lambda: push(iter(gradient_stream(grad_header(x, 0), x)), timeout=5)) == (
        grpc.StatusCode.UNAUTHENTICATED
    )


def test_health_is_served_without_the_token(server: tuple[GrpcBackend, PeerGroup, grpc.Channel]) -> None:
    _, _, channel = server
    reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_fetch_waits_for_the_shard_and_streams_it(
    server: tuple[GrpcBackend, PeerGroup, grpc.Channel],
) -> None:
    backend, group, channel = server
    shard = torch.randn(CHUNK_BYTES // 4 + 10)
    step = 100
    threading.Timer(0.2, lambda: backend.publish(group, step, 1, shard)).start()
    stub = zerowire_pb2_grpc.WireStub(channel)  # the generated stub: the wire format is the .proto's
    req = pb.FetchRequest(job_id="job", epoch=3, step=step, unit=1, shard=0, sender=2, codec=pb.CODEC_NONE)
    start = time.monotonic()
    chunks = list(stub.FetchShard(req, timeout=10, metadata=AUTH))
    assert time.monotonic() - start >= 0.15
    assert chunks[0].HasField("header") and not chunks[0].data
    h = chunks[0].header
    assert (h.job_id, h.epoch, h.step, h.unit, h.shard, h.sender, h.numel) == (
        "job",
        3,
        step,
        1,
        0,
        0,
        shard.numel(),
    )
    assert all(len(c.data) <= CHUNK_BYTES and not c.HasField("header") for c in chunks[1:])
    data = b"".join(c.data for c in chunks[1:])
    assert torch.equal(torch.frombuffer(bytearray(data), dtype=torch.float32), shard)
    # nothing is encoded on a peer's request: the shard travels only as this rank publishes it
    req8 = pb.FetchRequest(
        job_id="job", epoch=3, step=step, unit=1, shard=0, sender=2, codec=pb.CODEC_INT8, block_size=256
    )
    assert status_of(lambda: list(stub.FetchShard(req8, timeout=10, metadata=AUTH))) == (
        grpc.StatusCode.INVALID_ARGUMENT
    )
    backend.release(group, step)
    assert status_of(lambda: list(stub.FetchShard(req, timeout=5, metadata=AUTH))) == (
        grpc.StatusCode.FAILED_PRECONDITION
    )


def test_bad_fetch_requests(server: tuple[GrpcBackend, PeerGroup, grpc.Channel]) -> None:
    backend, group, channel = server
    backend.publish(group, 200, 0, torch.ones(10))
    fetch = fetch_raw(channel)

    def call(req: bytes, timeout: float = 5) -> grpc.StatusCode:
        return status_of(lambda: list(fetch(req, timeout=timeout, metadata=AUTH)))

    ok = {
        "job_id": "job",
        "epoch": 3,
        "step": 200,
        "unit": 0,
        "shard": 0,
        "sender": 1,
        "codec": pb.CODEC_NONE,
    }

    def req(**kw: object) -> bytes:
        return pb.FetchRequest(**{**ok, **kw}).SerializeToString()  # type: ignore[arg-type]

    assert len(list(fetch(req(), timeout=5, metadata=AUTH))) == 2
    assert call(b"\xff\xff\xff") == grpc.StatusCode.INVALID_ARGUMENT  # malformed
    assert call(req(job_id="other")) == grpc.StatusCode.INVALID_ARGUMENT
    assert call(req(shard=1)) == grpc.StatusCode.INVALID_ARGUMENT
    assert call(req(sender=7)) == grpc.StatusCode.INVALID_ARGUMENT  # non-member
    assert call(req(codec=pb.CODEC_UNSPECIFIED)) == grpc.StatusCode.INVALID_ARGUMENT
    assert call(req(epoch=2)) == grpc.StatusCode.FAILED_PRECONDITION  # stale epoch
    assert call(req(step=201), timeout=0.3) == grpc.StatusCode.DEADLINE_EXCEEDED  # never published
    changed = torch.ones(10)
    backend.publish(group, 202, 0, changed)
    assert len(list(fetch(req(step=202), timeout=5, metadata=AUTH))) == 2
    changed.add_(1)  # the owner must not modify a shard it serves before commit
    assert call(req(step=202)) == grpc.StatusCode.FAILED_PRECONDITION


def test_bad_gradient_streams_are_rejected_and_change_nothing(
    server: tuple[GrpcBackend, PeerGroup, grpc.Channel],
) -> None:
    backend, group, channel = server
    push = push_raw(channel)
    x = torch.randn(CHUNK_BYTES // 4 + 1)
    step = 300
    backend.release(group, step - 1)  # this rank is done with 299: it takes pushes of step 300 only
    h = grad_header(x, step)
    good = gradient_stream(h, x)
    before = pending(backend)

    def call(messages: Iterator[bytes] | list[bytes]) -> grpc.StatusCode:
        return status_of(lambda: push(iter(messages), timeout=10, metadata=AUTH))

    def endless() -> Iterator[bytes]:
        yield good[0]
        while True:
            yield pb.TensorChunk(data=b"\0" * 65536).SerializeToString()

    def idle() -> Iterator[bytes]:
        yield header_chunk(grad_header(x, step, sender=2))
        time.sleep(2)

    nan = x.clone()
    nan[3] = float("nan")
    corrupt = list(good)
    corrupt[-1] = pb.TensorChunk(data=bytes(parse_chunk(good[-1])[1])[:-1] + b"\x01").SerializeToString()
    assert call(good[1:]) == grpc.StatusCode.INVALID_ARGUMENT  # no header first
    assert call([]) == grpc.StatusCode.INVALID_ARGUMENT  # empty stream
    assert call([good[0], good[0], *good[1:]]) == grpc.StatusCode.INVALID_ARGUMENT  # header twice
    assert call([good[0], b"\x0a\xff\xff\xff"]) == grpc.StatusCode.INVALID_ARGUMENT  # malformed chunk
    assert call([good[0], pb.TensorChunk(data=b"\0" * (CHUNK_BYTES + 1)).SerializeToString()]) == (
        grpc.StatusCode.RESOURCE_EXHAUSTED  # oversized chunk
    )
    assert call(endless()) == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert call(good[:-1]) == grpc.StatusCode.INVALID_ARGUMENT  # short
    assert call(corrupt) == grpc.StatusCode.INVALID_ARGUMENT  # checksum
    assert call(gradient_stream(grad_header(nan, step), nan)) == grpc.StatusCode.INVALID_ARGUMENT
    assert call(gradient_stream(grad_header(x, step, epoch=2), x)) == grpc.StatusCode.FAILED_PRECONDITION
    assert call(gradient_stream(grad_header(x, step, sender=5), x)) == grpc.StatusCode.INVALID_ARGUMENT
    assert call(gradient_stream(grad_header(x, step + 1), x)) == grpc.StatusCode.FAILED_PRECONDITION  # ahead
    assert call(idle()) == grpc.StatusCode.DEADLINE_EXCEEDED
    # the NaN sender (rank 1) had its one chance at step 300; rank 2 still may contribute there
    assert pending(backend)[1] == before[1]
    h2 = grad_header(x, step, sender=2)
    ack = push(iter(gradient_stream(h2, x)), timeout=10, metadata=AUTH)
    assert ack.received_bytes == x.numel() * 4
    assert call(gradient_stream(h2, x)) == grpc.StatusCode.INVALID_ARGUMENT  # duplicate
    # int8 contributions are decoded on arrival (no plan declared: any codec)
    y = torch.randn(5000)
    payload = encode(y, pb.CODEC_INT8, 256)
    h8 = make_header(Key("job", 3, step, 1, 0), 1, torch.float32, y.numel(), pb.CODEC_INT8, 256, payload)
    ack = push(
        iter([header_chunk(h8), *data_chunks(memoryview(payload.numpy().tobytes()))]),
        timeout=10,
        metadata=AUTH,
    )
    assert ack.received_bytes == payload.numel()
