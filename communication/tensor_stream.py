"""Tensors <-> streams of TensorChunk messages (a header, then payload chunks of at most 1 MiB).

Chunks are (de)serialized here rather than by the generated message classes, so payload bytes are
copied as little as possible: a data chunk is sent as the protobuf encoding of
`TensorChunk{data=...}` built straight from the tensor's memory, and received data is copied once,
into a preallocated buffer. Any other valid encoding of a TensorChunk is parsed with the generated
class, so the wire format is exactly the one in zerowire.proto.
"""

from __future__ import annotations

import asyncio
import importlib
import zlib
from collections.abc import Callable, Iterator
from concurrent.futures import Executor, Future
from dataclasses import dataclass
from typing import cast

import numpy as np
import torch

from communication.errors import InvalidMessage, ResourceExhausted
from protos import zerowire_pb2 as pb

CHUNK_BYTES = 1 << 20
MAX_MESSAGE_BYTES = 4 << 20  # gRPC's default receive limit; never raised
_DATA_TAG = 0x12  # field 2 (data), wire type 2 (length-delimited)

DTYPES: dict[torch.dtype, int] = {
    torch.float32: pb.DTYPE_FLOAT32,
    torch.float16: pb.DTYPE_FLOAT16,
    torch.bfloat16: pb.DTYPE_BFLOAT16,
    torch.int64: pb.DTYPE_INT64,  # control values only (the exchange)
    torch.float64: pb.DTYPE_FLOAT64,
}
TORCH_DTYPES: dict[int, torch.dtype] = {v: k for k, v in DTYPES.items()}


def dtype_id(dtype: torch.dtype) -> int:
    try:
        return DTYPES[dtype]
    except KeyError:
        raise ValueError(f"unsupported dtype {dtype} (supported: {sorted(map(str, DTYPES))})") from None


def torch_dtype(dtype: int) -> torch.dtype:
    try:
        return TORCH_DTYPES[dtype]
    except KeyError:
        raise InvalidMessage(f"unsupported dtype id {dtype}") from None


def _crc32_impl() -> Callable[[bytes | memoryview, int], int]:
    """CRC-32 (zlib's polynomial and values): ISA-L's carry-less-multiply version when the `isal`
    package is installed (about 10x faster than zlib's), else zlib's."""
    try:
        fast = importlib.import_module("isal.isal_zlib")
    except ImportError:
        return zlib.crc32
    crc: Callable[[bytes | memoryview, int], int] = fast.crc32
    return crc


crc32 = _crc32_impl()


def checksum(data: torch.Tensor | bytes | memoryview, value: int = 0) -> int:
    if isinstance(data, torch.Tensor):
        data = as_memoryview(data)
    return crc32(data, value) & 0xFFFFFFFF


def as_memoryview(t: torch.Tensor) -> memoryview:
    """A byte view of a contiguous CPU tensor's memory (no copy)."""
    if not t.is_contiguous():
        raise ValueError("tensor must be contiguous")
    return t.detach().view(-1).view(torch.uint8).numpy().data


# Whole-tensor work done on the wire's event loop (or its copy threads) goes through numpy: one
# pass on the calling thread that releases the GIL. A torch op called off the main thread starts an
# OpenMP team of its own, whose threads spin after every op and take the CPU from the transfer.


def _cpu_array(t: torch.Tensor, dtype: torch.dtype | None = None) -> np.ndarray | None:
    """A flat numpy view of a contiguous CPU tensor (as `dtype`: float32 or uint8), or None."""
    if t.device.type != "cpu" or not t.is_contiguous():
        return None
    flat = t.detach().view(-1)
    if dtype is not None:
        flat = flat.view(dtype)
    return flat.numpy() if flat.dtype in (torch.float32, torch.uint8) else None


def copy_into(dest: torch.Tensor, src: torch.Tensor) -> None:
    """dest[:] = src (same dtype and numel)."""
    if dest.dtype != src.dtype or dest.numel() != src.numel():
        raise ValueError(f"cannot copy {src.dtype}[{src.numel()}] into {dest.dtype}[{dest.numel()}]")
    d, s = _cpu_array(dest, torch.uint8), _cpu_array(src, torch.uint8)
    if d is None or s is None:
        dest.view(-1).copy_(src.view(-1))
    else:
        np.copyto(d, s)


def add_into(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """out[:] = a + b elementwise (`out` may be `a`); float32 sums are IEEE, the same bits as torch.add."""
    if not out.numel() == a.numel() == b.numel():
        raise ValueError(f"cannot add {a.numel()} and {b.numel()} values into {out.numel()}")
    o, x, y = _cpu_array(out), _cpu_array(a), _cpu_array(b)
    if o is None or x is None or y is None or not out.dtype == a.dtype == b.dtype == torch.float32:
        torch.add(a.reshape(-1), b.reshape(-1), out=out.view(-1))
    else:
        np.add(x, y, out=o)


def all_finite(t: torch.Tensor) -> bool:
    """Whether every value is finite. One pass in the common case: NaN and infinities propagate through
    a sum, so a finite sum proves every value finite; a sum that is not (a NaN, an infinity, or an
    overflow of finite values) is settled by max and min, which cannot overflow."""
    if t.numel() == 0:
        return True
    if bool(torch.isfinite(t.sum(dtype=torch.float32))):
        return True
    x = _cpu_array(t)
    if x is None:
        return bool(torch.isfinite(t.amax())) and bool(torch.isfinite(t.amin()))
    return bool(np.isfinite(x.max())) and bool(np.isfinite(x.min()))


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def header_chunk(header: pb.TensorHeader) -> bytes:
    return pb.TensorChunk(header=header).SerializeToString()


def data_chunks(payload: memoryview, chunk_bytes: int = CHUNK_BYTES) -> Iterator[bytes]:
    """Serialized TensorChunk{data} messages over `payload`, one copy per chunk."""
    if not 0 < chunk_bytes <= CHUNK_BYTES:
        raise ValueError(f"chunk size must be in 1..{CHUNK_BYTES}")
    for off in range(0, len(payload), chunk_bytes):
        piece = payload[off : off + chunk_bytes]
        yield b"".join((bytes((_DATA_TAG,)), _varint(len(piece)), piece))


def parse_chunk(message: bytes) -> tuple[pb.TensorHeader | None, memoryview]:
    """Split one serialized TensorChunk into (header or None, data view)."""
    if len(message) > CHUNK_BYTES + 64:
        raise ResourceExhausted(f"chunk of {len(message)} bytes exceeds {CHUNK_BYTES} bytes of payload")
    if message and message[0] == _DATA_TAG:
        # Fast path: a message holding only `data`.
        length, shift, pos = 0, 0, 1
        while pos < len(message) and pos < 6:
            b = message[pos]
            length |= (b & 0x7F) << shift
            pos += 1
            shift += 7
            if not b & 0x80:
                if length > CHUNK_BYTES:
                    raise ResourceExhausted(f"chunk of {length} bytes exceeds {CHUNK_BYTES}")
                if pos + length == len(message):
                    return None, memoryview(message)[pos:]
                break
    try:
        chunk = pb.TensorChunk.FromString(message)
    except Exception as exc:  # protobuf raises DecodeError and others
        raise InvalidMessage(f"malformed TensorChunk: {exc}") from None
    if len(chunk.data) > CHUNK_BYTES:
        raise ResourceExhausted(f"chunk of {len(chunk.data)} bytes exceeds {CHUNK_BYTES}")
    return (chunk.header if chunk.HasField("header") else None), memoryview(chunk.data)


@dataclass(frozen=True, slots=True)
class Key:
    """What a tensor stream is about."""

    job_id: str
    epoch: int
    step: int
    unit: int
    shard: int


def make_header(
    key: Key,
    sender: int,
    dtype: torch.dtype,
    numel: int,
    codec: int,
    block: int,
    payload: torch.Tensor,
    *,
    with_checksum: bool = True,
) -> pb.TensorHeader:
    """The header of a stream carrying the whole payload (checksum left 0 if not `with_checksum`)."""
    return pb.TensorHeader(
        job_id=key.job_id,
        epoch=key.epoch,
        step=key.step,
        unit=key.unit,
        shard=key.shard,
        sender=sender,
        dtype=cast("pb.DType", dtype_id(dtype)),
        numel=numel,
        shape=[numel],
        codec=cast("pb.Codec", codec),
        block_size=block if codec == pb.CODEC_INT8 else 0,
        payload_bytes=payload.numel(),
        checksum=checksum(payload) if with_checksum else 0,
        offset=0,
        length=payload.numel(),
    )


def range_header(base: pb.TensorHeader, offset: int, length: int, crc: int) -> pb.TensorHeader:
    """`base` for a stream that carries payload bytes [offset, offset + length)."""
    header = pb.TensorHeader()
    header.CopyFrom(base)
    header.offset = offset
    header.length = length
    header.checksum = crc
    return header


def split_ranges(nbytes: int, parts: int) -> list[tuple[int, int]]:
    """`parts` contiguous (offset, length) ranges covering nbytes, sizes differing by at most one."""
    parts = max(1, min(parts, nbytes))
    base, extra = divmod(nbytes, parts)
    ranges, offset = [], 0
    for i in range(parts):
        length = base + (1 if i < extra else 0)
        ranges.append((offset, length))
        offset += length
    return ranges


def stream_tensor(header: pb.TensorHeader, payload: torch.Tensor) -> Iterator[bytes]:
    """The whole stream: header chunk, then data chunks read from `payload`'s memory."""
    yield header_chunk(header)
    yield from data_chunks(as_memoryview(payload))


class PayloadReceiver:
    """Receives payload chunks into a preallocated uint8 tensor, checking length and checksum.

    With an `executor` (one worker thread), copying and checksumming a chunk happen there, off the
    event loop (both release the GIL), while the loop reads the next chunk; `drain()` waits for them.
    """

    def __init__(
        self, header: pb.TensorHeader, buffer: torch.Tensor, executor: Executor | None = None
    ) -> None:
        if buffer.numel() != header.length or buffer.dtype != torch.uint8:
            raise ValueError("receive buffer does not match the header's payload length")
        self.header = header
        self.buffer = buffer
        self._array = buffer.numpy()
        self.received = 0
        self._crc = 0
        self._executor = executor
        self._last: Future[None] | None = None

    def add(self, data: memoryview) -> None:
        start, end = self.received, self.received + len(data)
        if end > self.buffer.numel():
            raise ResourceExhausted(
                f"stream sent more than the {self.buffer.numel()} payload bytes its header announced"
            )
        self.received = end
        if not len(data):
            return
        if self._executor is None:
            self._store(data, start, end)
        else:
            self._last = self._executor.submit(self._store, data, start, end)

    def _store(self, data: memoryview, start: int, end: int) -> None:
        self._array[start:end] = np.frombuffer(data, dtype=np.uint8)
        self._crc = crc32(data, self._crc)

    async def drain(self) -> None:
        if self._last is not None:
            await asyncio.wrap_future(self._last)

    def settle(self) -> None:
        """Block until no copy into the buffer is pending (before the buffer is reused after a failure)."""
        if self._last is not None:
            try:
                self._last.result()
            except BaseException:  # the copy failed or was cancelled: nothing more will be written
                pass

    def finish(self) -> torch.Tensor:
        """Check length and checksum (after `drain()` when an executor is used)."""
        assert self._last is None or self._last.done(), "drain() before finish()"
        if self._last is not None:
            self._last.result()
        if self.received != self.buffer.numel():
            raise InvalidMessage(f"stream ended after {self.received} of {self.buffer.numel()} payload bytes")
        if (self._crc & 0xFFFFFFFF) != self.header.checksum:
            raise InvalidMessage(
                f"payload checksum mismatch (got {self._crc & 0xFFFFFFFF:#x}, "
                f"header says {self.header.checksum:#x})"
            )
        return self.buffer
