"""all_gather and reduce_scatter over a PeerGroup, as coroutines on the backend's event loop.

all_gather: this rank publishes its shard (peers fetch it with FetchShard) and fetches every peer's
shard concurrently, straight into its slice of `out` (raw codec) or into a reused buffer that is then
decoded into the slice (int8). reduce_scatter: this rank pushes slice d of its flat gradient to rank d
(PushGradient, all peers concurrently) and waits for its own accumulator to sum every rank's slice in
rank order. Both fail as a whole on the first failure (the other streams are cancelled) and within
`timeout`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, cast

import grpc
import torch

from communication import peer_auth
from communication.accumulator import GradientAccumulator
from communication.compression import get_codec
from communication.errors import (
    CollectiveTimeout,
    CommError,
    InvalidMessage,
    PeerLost,
    ResourceExhausted,
    StaleMessage,
    Unauthenticated,
)
from communication.group import PeerGroup
from communication.grpc_channels import ChannelCache
from communication.servicer import FETCH_METHOD, PUSH_METHOD, WireCounters
from communication.shard_store import Published
from communication.tensor_stream import (
    PayloadReceiver,
    checksum,
    copy_into,
    dtype_id,
    parse_chunk,
    range_header,
    split_ranges,
    stream_tensor,
)
from communication.tls import connect_hint
from protos import zerowire_pb2 as pb

log = logging.getLogger(__name__)

_ERRORS: dict[grpc.StatusCode, type[CommError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidMessage,
    grpc.StatusCode.FAILED_PRECONDITION: StaleMessage,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhausted,
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
    grpc.StatusCode.DEADLINE_EXCEEDED: CollectiveTimeout,
}


def comm_error(exc: grpc.aio.AioRpcError, what: str, peer: str | None = None) -> CommError:
    """A failed call as a domain error; anything but a clear rejection means the peer (address) is lost."""
    cls = _ERRORS.get(exc.code(), PeerLost)
    err = cls(f"{what}: {exc.code().name}: {exc.details()}{connect_hint(exc.details())}")
    err.peer = peer
    return err


def _identity(b: bytes) -> bytes:
    return b


class BufferPool:
    """Receive buffers reused across steps, keyed by (unit, peer, bytes)."""

    def __init__(self, per_key: int = 2) -> None:
        self.per_key = per_key
        self._free: dict[tuple[int, int, int], list[torch.Tensor]] = {}

    def take(self, key: tuple[int, int, int]) -> torch.Tensor:
        free = self._free.get(key)
        return free.pop() if free else torch.empty(key[2], dtype=torch.uint8)

    def give(self, key: tuple[int, int, int], buf: torch.Tensor) -> None:
        free = self._free.setdefault(key, [])
        if len(free) < self.per_key:
            free.append(buf)

    def clear(self) -> None:
        self._free.clear()


@dataclass
class Wire:
    """What the collectives need from the backend (all used on its event loop)."""

    channels: ChannelCache
    accumulator: GradientAccumulator
    counters: WireCounters
    metadata: tuple[tuple[str, str], ...]
    pool: BufferPool
    copiers: list[ThreadPoolExecutor] = field(default_factory=list)
    stripes: int = 2
    stripe_min_bytes: int = 4 << 20
    _next_copier: int = 0

    def ranges(self, nbytes: int) -> list[tuple[int, int]]:
        """The byte ranges a payload of `nbytes` is fetched in (one per parallel stream)."""
        return split_ranges(nbytes, self.stripes if nbytes >= self.stripe_min_bytes else 1)

    def precompute_checksums(self, pub: Published) -> None:
        """Start the checksums of the ranges peers will fetch now, in the copy threads (on the loop)."""
        for offset, length in self.ranges(pub.payload.numel()):
            pub.range_checksum(offset, length, self.copier())

    def copier(self) -> ThreadPoolExecutor | None:
        """A single-thread executor for one stream's copies and checksums (round robin)."""
        if not self.copiers:
            return None
        self._next_copier = (self._next_copier + 1) % len(self.copiers)
        return self.copiers[self._next_copier]


async def run_all(coros: list[Coroutine[Any, Any, Any]], time_limit: float, what: str) -> None:
    """Run concurrently; the first failure cancels the rest and is raised; CollectiveTimeout at timeout."""
    tasks = [asyncio.ensure_future(c) for c in coros]
    if not tasks:
        return
    try:
        done, pending = await asyncio.wait(tasks, timeout=time_limit, return_when=asyncio.FIRST_EXCEPTION)
        for task in done:
            if task.exception() is not None:
                raise task.exception()  # type: ignore[misc]
        if pending:
            raise CollectiveTimeout(f"{what} timed out after {time_limit:.1f}s")
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def fetch_into(
    wire: Wire,
    group: PeerGroup,
    peer: int,
    step: int,
    unit: int,
    dest: torch.Tensor,
    codec: int,
    block: int,
    time_limit: float,
) -> None:
    """Fetch `peer`'s shard and write it, decoded, into `dest` (flat, the shard's dtype).

    A large payload is fetched as `wire.stripes` byte ranges over parallel streams (one connection
    each), received straight into `dest` (raw codec) or into a reused buffer that is then decoded.
    """
    codec_impl = get_codec(codec)
    expected = codec_impl.payload_bytes(dest.numel(), dest.dtype, block)
    pool_key: tuple[int, int, int] | None = None
    if codec == pb.CODEC_NONE:
        buf = dest.view(torch.uint8)
    else:
        pool_key = (unit, peer, expected)
        buf = wire.pool.take(pool_key)
    try:
        ranges = wire.ranges(expected)
        fetches = [
            _fetch_range(
                wire, group, peer, step, unit, dest, codec, block, buf, offset, length, lane, time_limit
            )
            for lane, (offset, length) in enumerate(ranges)
        ]
        if len(fetches) == 1:
            await fetches[0]
        else:
            await run_all(fetches, time_limit, f"{group.describe()} fetch of rank {peer}")
        if codec != pb.CODEC_NONE:
            codec_impl.decode_into(buf, block, dest)
        wire.counters.bytes_received += expected
    finally:
        if pool_key is not None:
            wire.pool.give(pool_key, buf)


async def _fetch_range(
    wire: Wire,
    group: PeerGroup,
    peer: int,
    step: int,
    unit: int,
    dest: torch.Tensor,
    codec: int,
    block: int,
    buf: torch.Tensor,
    offset: int,
    length: int,
    lane: int,
    time_limit: float,
) -> None:
    what = f"{group.describe()} step={step} unit={unit}: fetch shard of rank {peer} [{offset}, +{length})"
    req = pb.FetchRequest(
        job_id=group.job_id,
        epoch=group.epoch,
        step=step,
        unit=unit,
        shard=peer,
        sender=group.rank,
        codec=cast("pb.Codec", codec),
        block_size=block if codec == pb.CODEC_INT8 else 0,
        offset=offset,
        length=length,
    )
    call = wire.channels.get(group.addresses[peer], lane).unary_stream(
        FETCH_METHOD, request_serializer=_identity, response_deserializer=_identity
    )
    raw = req.SerializeToString()  # the MAC covers these very bytes
    metadata = (*wire.metadata, *peer_auth.mac_metadata(group, peer, FETCH_METHOD, raw))
    receiver: PayloadReceiver | None = None
    try:
        stream = call(raw, timeout=time_limit, metadata=metadata)
        async for message in stream:
            header, data = parse_chunk(message)
            if receiver is None:
                if header is None:
                    raise InvalidMessage(f"{what}: the stream did not start with a header")
                _check_fetched(header, req, dest, buf.numel(), what)
                receiver = PayloadReceiver(header, buf[offset : offset + length], wire.copier())
            elif header is not None:
                raise InvalidMessage(f"{what}: a header in the middle of the stream")
            receiver.add(data)
        if receiver is None:
            raise InvalidMessage(f"{what}: empty stream")
        await receiver.drain()
        receiver.finish()
    except grpc.aio.AioRpcError as exc:
        raise comm_error(exc, what, group.addresses[peer]) from None
    finally:
        if receiver is not None:
            receiver.settle()  # nothing may write into `buf` once this returns


def _check_fetched(
    h: pb.TensorHeader, req: pb.FetchRequest, dest: torch.Tensor, expected: int, what: str
) -> None:
    got = (h.job_id, h.epoch, h.step, h.unit, h.shard, h.sender)
    want = (req.job_id, req.epoch, req.step, req.unit, req.shard, req.shard)
    if got != want:
        raise InvalidMessage(f"{what}: header names {got}, expected {want}")
    if h.dtype != dtype_id(dest.dtype) or h.numel != dest.numel() or list(h.shape) != [h.numel]:
        raise InvalidMessage(
            f"{what}: got dtype {h.dtype} numel {h.numel}, expected {dtype_id(dest.dtype)} {dest.numel()}"
        )
    if h.codec != req.codec or h.payload_bytes != expected:
        raise InvalidMessage(f"{what}: codec {h.codec} with {h.payload_bytes} bytes, expected {expected}")
    if (h.offset, h.length) != (req.offset, req.length):
        raise InvalidMessage(f"{what}: got range [{h.offset}, +{h.length})")


async def all_gather(
    wire: Wire,
    group: PeerGroup,
    step: int,
    unit: int,
    pub: Published,
    own: torch.Tensor,
    out: torch.Tensor,
    codec: int,
    block: int,
    time_limit: float,
) -> torch.Tensor:
    n = own.numel()
    flat = out.view(-1)
    mine = flat[group.rank * n : (group.rank + 1) * n]
    local: asyncio.Future[None] | None = None
    if codec == pb.CODEC_NONE:  # copied off the loop while the fetches run
        local = asyncio.get_running_loop().run_in_executor(wire.copier(), copy_into, mine, own.reshape(-1))
    else:  # every rank computes with the same (decoded) values of every shard, this one included
        get_codec(codec).decode_into(pub.payload, block, mine)
    fetches = [
        fetch_into(wire, group, p, step, unit, flat[p * n : (p + 1) * n], codec, block, time_limit)
        for p in group.peers()
        if p != group.rank
    ]
    try:
        await run_all(fetches, time_limit, f"{group.describe()} all_gather step={step} unit={unit}")
    finally:
        if local is not None:  # nothing may write into `out` once this returns
            await asyncio.wait([local])
    if local is not None:
        local.result()
    return out


async def push(
    wire: Wire,
    group: PeerGroup,
    dest: int,
    header: pb.TensorHeader,
    payload: torch.Tensor,
    time_limit: float,
    method: str = PUSH_METHOD,
) -> None:
    """Stream `payload` to `dest` (a gradient push, or with SEND_METHOD a point-to-point message); a
    header without a checksum gets it computed here, off the loop."""
    what = f"{group.describe()} step={header.step} unit={header.unit}: {method} to rank {dest}"
    call = wire.channels.get(group.addresses[dest]).stream_unary(
        method, request_serializer=_identity, response_deserializer=pb.PushAck.FromString
    )
    if not header.checksum:
        crc = await asyncio.get_running_loop().run_in_executor(wire.copier(), checksum, payload)
        header = range_header(header, 0, payload.numel(), crc)
    chunks: Iterator[bytes] = stream_tensor(header, payload)
    mac = peer_auth.mac_metadata(group, dest, method, peer_auth.push_message(header))
    try:
        ack = await call(chunks, timeout=time_limit, metadata=(*wire.metadata, *mac))
    except grpc.aio.AioRpcError as exc:
        raise comm_error(exc, what, group.addresses[dest]) from None
    if ack.received_bytes != payload.numel():
        raise InvalidMessage(f"{what}: peer acknowledged {ack.received_bytes} of {payload.numel()} bytes")
    wire.counters.bytes_sent += payload.numel()


async def reduce_scatter(
    wire: Wire,
    group: PeerGroup,
    step: int,
    unit: int,
    own_slice: torch.Tensor,
    sends: dict[int, tuple[pb.TensorHeader, torch.Tensor]],
    out: torch.Tensor,
    codec: int,
    time_limit: float,
) -> torch.Tensor:
    wire.accumulator.contribute_local(group.epoch, step, unit, own_slice, codec)
    coros: list[Coroutine[Any, Any, Any]] = [
        push(wire, group, dest, header, payload, time_limit) for dest, (header, payload) in sends.items()
    ]
    coros.append(wire.accumulator.wait_ready(group.epoch, step, unit, out, time_limit))
    await run_all(coros, time_limit, f"{group.describe()} reduce_scatter step={step} unit={unit}")
    return out
