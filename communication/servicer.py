"""The Wire gRPC service: FetchShard (serve a published parameter shard) and PushGradient (receive a
gradient contribution into the accumulator).

Messages are (de)serialized by communication.tensor_stream (see there why). Every domain error is
mapped to one gRPC status code; a rejected message changes nothing.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Executor
from dataclasses import dataclass

import grpc
import torch

from communication.accumulator import GradientAccumulator
from communication.compression import get_codec
from communication.errors import (
    CollectiveTimeout,
    CommError,
    EpochChanged,
    InvalidMessage,
    PeerLost,
    ResourceExhausted,
    StaleMessage,
    Unauthenticated,
)
from communication.shard_store import ShardStore
from communication.tensor_stream import (
    PayloadReceiver,
    as_memoryview,
    data_chunks,
    header_chunk,
    parse_chunk,
    range_header,
)
from protos import zerowire_pb2 as pb

log = logging.getLogger(__name__)

SERVICE = "zerowire.v1.Wire"
FETCH_METHOD = f"/{SERVICE}/FetchShard"
PUSH_METHOD = f"/{SERVICE}/PushGradient"

STATUS_FOR: dict[type[CommError], grpc.StatusCode] = {
    InvalidMessage: grpc.StatusCode.INVALID_ARGUMENT,
    StaleMessage: grpc.StatusCode.FAILED_PRECONDITION,
    EpochChanged: grpc.StatusCode.FAILED_PRECONDITION,
    ResourceExhausted: grpc.StatusCode.RESOURCE_EXHAUSTED,
    Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
    CollectiveTimeout: grpc.StatusCode.DEADLINE_EXCEEDED,
    PeerLost: grpc.StatusCode.UNAVAILABLE,
}


def status_for(exc: CommError) -> grpc.StatusCode:
    for cls in type(exc).__mro__:
        if cls in STATUS_FOR:
            return STATUS_FOR[cls]  # type: ignore[index]
    return grpc.StatusCode.INTERNAL


@dataclass
class WireCounters:
    bytes_sent: int = 0
    bytes_received: int = 0


def _identity(b: bytes) -> bytes:
    return b


class WireServicer:
    def __init__(
        self,
        store: ShardStore,
        accumulator: GradientAccumulator,
        counters: WireCounters,
        *,
        max_wait: float = 600.0,
        idle_timeout: float = 30.0,
        copier: Callable[[], Executor | None] | None = None,
    ) -> None:
        self.copier = copier
        self.store = store
        self.accumulator = accumulator
        self.counters = counters
        self.max_wait = max_wait
        self.idle_timeout = idle_timeout

    def handler(self) -> grpc.GenericRpcHandler:
        return grpc.method_handlers_generic_handler(
            SERVICE,
            {
                "FetchShard": grpc.unary_stream_rpc_method_handler(
                    self.fetch_shard, request_deserializer=_identity, response_serializer=_identity
                ),
                "PushGradient": grpc.stream_unary_rpc_method_handler(
                    self.push_gradient,
                    request_deserializer=_identity,
                    response_serializer=pb.PushAck.SerializeToString,
                ),
            },
        )

    async def fetch_shard(self, request: bytes, context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
        try:
            try:
                req = pb.FetchRequest.FromString(request)
            except Exception as exc:
                raise InvalidMessage(f"malformed FetchRequest: {exc}") from None
            group = self.store.group
            if group is not None and req.job_id != group.job_id:
                raise InvalidMessage(f"job {req.job_id!r} is not {group.job_id!r}")
            get_codec(req.codec)
            remaining = context.time_remaining()
            timeout = self.max_wait if remaining is None else min(remaining, self.max_wait)
            pub = await self.store.wait((req.epoch, req.step, req.unit), req.codec, req.block_size, timeout)
            group = self.store.group
            assert group is not None and group.epoch == req.epoch
            if req.shard != group.rank:
                raise InvalidMessage(f"asked rank {group.rank} for the shard of rank {req.shard}")
            if not 0 <= req.sender < group.world_size or req.sender == group.rank:
                raise InvalidMessage(f"sender {req.sender} is not a peer in {group.describe()}")
            total = pub.payload.numel()
            offset, length = req.offset, (req.length or total - req.offset)
            if offset + length > total or length <= 0:
                raise InvalidMessage(f"range [{offset}, +{length}) outside the payload of {total} bytes")
            crc = await pub.range_checksum(offset, length, self.copier() if self.copier else None)
        except CommError as exc:
            log.info("FetchShard rejected: %s", exc)
            await context.abort(status_for(exc), str(exc))
            return
        yield header_chunk(range_header(pub.header, offset, length, crc))
        for chunk in data_chunks(as_memoryview(pub.payload[offset : offset + length])):
            yield chunk
        self.counters.bytes_sent += length

    async def push_gradient(
        self, requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext
    ) -> pb.PushAck:
        header: pb.TensorHeader | None = None
        receiver: PayloadReceiver | None = None
        reserved = False
        try:
            it = requests.__aiter__()
            first = await self._next(it)
            if first is None:
                raise InvalidMessage("empty stream: the first message must carry a header")
            header, data = parse_chunk(first)
            if header is None:
                raise InvalidMessage("the first message of a stream must carry a header")
            buffer = self.accumulator.reserve(header)
            reserved = True
            receiver = PayloadReceiver(header, buffer, self.copier() if self.copier else None)
            if len(data):
                receiver.add(data)
            while (msg := await self._next(it)) is not None:
                again, data = parse_chunk(msg)
                if again is not None:
                    raise InvalidMessage("a header in the middle of a stream")
                receiver.add(data)
            await receiver.drain()
            payload = receiver.finish()
            if header.codec == pb.CODEC_NONE:
                part = payload.view(torch.float32)
            else:
                part = self.accumulator.decode_buffer(header)
                get_codec(header.codec).decode_into(payload, header.block_size, part)
            self.counters.bytes_received += payload.numel()
            reserved = False  # contribute() owns the slot from here (it frees it if it rejects)
            self.accumulator.contribute(header, part)
            return pb.PushAck(received_bytes=payload.numel())
        except CommError as exc:
            self._release(header if reserved else None, receiver)
            log.info("PushGradient rejected: %s", exc)
            await context.abort(status_for(exc), str(exc))
            raise AssertionError("unreachable") from None
        except BaseException:
            self._release(header if reserved else None, receiver)
            raise

    def _release(self, header: pb.TensorHeader | None, receiver: PayloadReceiver | None) -> None:
        """Free a failed contribution's slot, once no copy into its buffer is pending."""
        if receiver is not None:
            receiver.settle()
        if header is not None:
            self.accumulator.abandon(header)

    async def _next(self, it: AsyncIterator[bytes]) -> bytes | None:
        try:
            return await asyncio.wait_for(it.__anext__(), self.idle_timeout)
        except StopAsyncIteration:
            return None
        except TimeoutError:
            raise CollectiveTimeout(f"stream idle for {self.idle_timeout:.1f}s") from None
