"""Chunk framing: byte-identical to the generated protobuf encoding, 1 MiB bounds, receiver checks."""

from __future__ import annotations

import zlib

import pytest
import torch

from communication.errors import InvalidMessage, ResourceExhausted
from communication.tensor_stream import (
    CHUNK_BYTES,
    Key,
    PayloadReceiver,
    add_into,
    all_finite,
    as_memoryview,
    checksum,
    copy_into,
    data_chunks,
    make_header,
    parse_chunk,
    stream_tensor,
)
from protos import zerowire_pb2 as pb


@pytest.mark.parametrize("nbytes", [1, 127, 128, CHUNK_BYTES, CHUNK_BYTES + 1, 3 * CHUNK_BYTES - 5])
def test_chunks_match_generated_encoding_and_reassemble(nbytes: int) -> None:
    payload = torch.randint(0, 256, (nbytes,), dtype=torch.uint8)
    chunks = list(data_chunks(as_memoryview(payload)))
    assert len(chunks) == -(-nbytes // CHUNK_BYTES)
    joined = b""
    for chunk in chunks:
        header, data = parse_chunk(chunk)
        assert header is None and len(data) <= CHUNK_BYTES
        assert chunk == pb.TensorChunk(data=bytes(data)).SerializeToString()
        assert pb.TensorChunk.FromString(chunk).data == bytes(data)
        joined += bytes(data)
    assert joined == payload.numpy().tobytes()


def _header(payload: torch.Tensor) -> pb.TensorHeader:
    return make_header(
        Key("job", 1, 2, 3, 0), 1, torch.float32, payload.numel() // 4, pb.CODEC_NONE, 0, payload
    )


def test_stream_roundtrip_into_preallocated_buffer() -> None:
    x = torch.randn(CHUNK_BYTES // 4 + 3)
    payload = x.view(torch.uint8)
    messages = list(stream_tensor(_header(payload), payload))
    header, rest = parse_chunk(messages[0])
    assert header is not None and len(rest) == 0
    assert header.payload_bytes == payload.numel() and header.numel == x.numel()
    buffer = torch.empty(header.payload_bytes, dtype=torch.uint8)
    ptr = buffer.data_ptr()
    receiver = PayloadReceiver(header, buffer)
    for message in messages[1:]:
        receiver.add(parse_chunk(message)[1])
    out = receiver.finish()
    assert out.data_ptr() == ptr
    assert torch.equal(out.view(torch.float32), x)


def test_receiver_rejects_extra_short_and_corrupt_payloads() -> None:
    payload = torch.arange(100, dtype=torch.uint8)
    header = _header(payload)
    receiver = PayloadReceiver(header, torch.empty(100, dtype=torch.uint8))
    receiver.add(memoryview(payload.numpy().tobytes()))
    with pytest.raises(ResourceExhausted):
        receiver.add(memoryview(b"x"))
    short = PayloadReceiver(header, torch.empty(100, dtype=torch.uint8))
    short.add(memoryview(payload.numpy().tobytes()[:99]))
    with pytest.raises(InvalidMessage, match="ended after"):
        short.finish()
    corrupt = PayloadReceiver(header, torch.empty(100, dtype=torch.uint8))
    bad = bytearray(payload.numpy().tobytes())
    bad[7] ^= 1
    corrupt.add(memoryview(bytes(bad)))
    with pytest.raises(InvalidMessage, match="checksum"):
        corrupt.finish()


def test_oversized_and_malformed_chunks_rejected() -> None:
    with pytest.raises(ResourceExhausted):
        parse_chunk(pb.TensorChunk(data=b"x" * (CHUNK_BYTES + 1)).SerializeToString())
    with pytest.raises(InvalidMessage, match="malformed"):
        parse_chunk(b"\x0a\xff\xff\xff\xff\x0f")
    with pytest.raises(ValueError):
        list(data_chunks(memoryview(b"abc"), CHUNK_BYTES + 1))
    # a non-canonical but valid encoding (header after data) still parses through the generated class
    mixed = (
        pb.TensorChunk(data=b"ab").SerializeToString()
        + pb.TensorChunk(header=pb.TensorHeader(job_id="j")).SerializeToString()
    )
    header, data = parse_chunk(mixed)
    assert header is not None and header.job_id == "j" and bytes(data) == b"ab"


@pytest.mark.parametrize("nbytes", [0, 1, 4095, CHUNK_BYTES + 3])
def test_checksum_is_zlib_crc32_whole_and_chained(nbytes: int) -> None:
    payload = torch.randint(0, 256, (nbytes,), dtype=torch.uint8)
    data = payload.numpy().tobytes()
    assert checksum(payload) == zlib.crc32(data)
    cut = nbytes // 3
    assert checksum(payload[cut:], checksum(payload[:cut])) == zlib.crc32(data)


def test_array_helpers_match_torch_bit_for_bit() -> None:
    gen = torch.Generator().manual_seed(7)
    a, b = torch.randn(100_003, generator=gen) * 1e30, torch.randn(100_003, generator=gen)
    b[::7] = torch.finfo(torch.float32).tiny / 3  # subnormals are kept, as torch keeps them
    out = torch.empty_like(a)
    add_into(out, a, b)
    assert torch.equal(out, torch.add(a, b))
    add_into(out, out, a)  # in place, as the accumulator sums rank after rank
    assert torch.equal(out, torch.add(a, b).add_(a))
    copy_into(out, b)
    assert torch.equal(out, b)
    half, strided = torch.empty(5, dtype=torch.bfloat16), torch.arange(10.0)[::2]
    copy_into(half, strided.to(torch.bfloat16))  # not a numpy dtype: torch does it
    add_into(out[:5], strided, strided)  # not contiguous: torch does it
    assert torch.equal(half, strided.to(torch.bfloat16)) and torch.equal(out[:5], strided * 2)
    with pytest.raises(ValueError):
        copy_into(out, a[:-1])
    with pytest.raises(ValueError):
        add_into(out, a, b[:1])  # no broadcasting


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_all_finite_finds_any_non_finite_value(bad: float) -> None:
    x = torch.randn(10_001)
    assert all_finite(x) and all_finite(x[:0]) and all_finite(torch.full((3,), 3e38))
    for pos in (0, 5_000, 10_000):
        y = x.clone()
        y[pos] = bad
        assert not all_finite(y) and not all_finite(y.to(torch.bfloat16))
