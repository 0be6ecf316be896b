"""The Wire gRPC service: FetchShard (serve a published parameter shard), PushGradient (receive a
gradient contribution into the accumulator) and SendTensor (receive a point-to-point message into the
mailbox, communication/mailbox.py).

Messages are (de)serialized by communication.tensor_stream (see there why). Every domain error is
mapped to one gRPC status code; a rejected message changes nothing.

Admission of a call, in order, before anything is allocated or waited on for it: the job and epoch it
names are the installed ones (a fetch or a message for a newer epoch waits for it, in a bounded pool; a
push follows a gather of its step, so it never comes first), the sender is
another member, its MAC proves it is that member (communication.peer_auth, when the group has keys),
it holds at most its share of concurrent streams (communication.peer_limits), and the unit, numel,
codec, block and byte range match the declared partition plan (communication.wire_plan), or a message
the mailbox's checks. A push or a message must
finish within the call's deadline and `stream_timeout`, with no gap over `idle_timeout` between
messages; a stream that does not loses its reservation.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Executor
from contextlib import ExitStack
from dataclasses import dataclass

import grpc
import torch

from communication import peer_auth
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
from communication.group import PeerGroup
from communication.mailbox import Mailbox
from communication.peer_limits import STREAMS_PER_PEER, StreamLimits
from communication.shard_store import Published, ShardStore
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
SEND_METHOD = f"/{SERVICE}/SendTensor"
IDLE_TIMEOUT_S = 10.0  # longest gap between two messages of a push
STREAM_TIMEOUT_S = 120.0  # longest push or fetch, whatever deadline its caller set

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
        idle_timeout: float = IDLE_TIMEOUT_S,
        stream_timeout: float = STREAM_TIMEOUT_S,
        streams_per_peer: int = STREAMS_PER_PEER,
        copier: Callable[[], Executor | None] | None = None,
        mailbox: Mailbox | None = None,
    ) -> None:
        if not 0 < idle_timeout <= stream_timeout:
            raise ValueError(
                f"timeouts must nest: 0 < idle timeout ({idle_timeout:g} s) <= stream timeout "
                f"({stream_timeout:g} s)"
            )
        self.copier = copier
        self.store = store
        self.accumulator = accumulator
        self.mailbox = mailbox or Mailbox()
        self.counters = counters
        self.max_wait = max_wait
        self.idle_timeout = idle_timeout
        self.stream_timeout = stream_timeout
        self.limits = StreamLimits(streams_per_peer)

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
                "SendTensor": grpc.stream_unary_rpc_method_handler(
                    self.send_tensor,
                    request_deserializer=_identity,
                    response_serializer=pb.PushAck.SerializeToString,
                ),
            },
        )

    @staticmethod
    def _time_left(context: grpc.aio.ServicerContext, cap: float) -> float:
        remaining = context.time_remaining()
        return cap if remaining is None else min(remaining, cap)

    def _admit(
        self,
        group: PeerGroup,
        job_id: str,
        epoch: int,
        sender: int,
        method: str,
        message: bytes,
        context: grpc.aio.ServicerContext,
    ) -> None:
        """The call names the installed job and epoch, another member as sender, and proves it is that
        member (when the group has keys)."""
        if job_id != group.job_id:
            raise InvalidMessage(f"job {job_id!r} is not {group.job_id!r}")
        if epoch != group.epoch:
            raise StaleMessage(f"epoch {epoch} is not the installed epoch {group.epoch} ({group.describe()})")
        if not 0 <= sender < group.world_size or sender == group.rank:
            raise InvalidMessage(f"sender {sender} is not a peer in {group.describe()}")
        presented = peer_auth.presented_mac(context.invocation_metadata())
        peer_auth.verify(group, sender, method, message, presented)

    async def _installed(self, epoch: int, time_limit: float) -> PeerGroup:
        """The installed group of `epoch`; a newer epoch is waited for (its keys are not known before)."""
        group = self.store.group
        if group is not None and group.epoch == epoch:
            return group
        if epoch < self.store.epoch:
            raise StaleMessage(f"epoch {epoch} is over (now {self.store.epoch})")
        with self.limits.waiting():
            return await self.store.wait_group(epoch, time_limit)

    async def _prepare_fetch(
        self, request: bytes, context: grpc.aio.ServicerContext, held: ExitStack, deadline: float
    ) -> tuple[Published, int, int, int]:
        try:
            req = pb.FetchRequest.FromString(request)
        except Exception as exc:
            raise InvalidMessage(f"malformed FetchRequest: {exc}") from None
        loop = asyncio.get_running_loop()
        installed = self.store.group
        if installed is not None and req.job_id != installed.job_id:
            raise InvalidMessage(f"job {req.job_id!r} is not {installed.job_id!r}")
        get_codec(req.codec)
        group = await self._installed(req.epoch, deadline - loop.time())
        self._admit(group, req.job_id, req.epoch, req.sender, FETCH_METHOD, request, context)
        if req.shard != group.rank:
            raise InvalidMessage(f"asked rank {group.rank} for the shard of rank {req.shard}")
        held.enter_context(self.limits.slot("FetchShard", req.sender))
        self.store.check_fetch(req)
        pub = await self.store.wait(
            (req.epoch, req.step, req.unit), req.codec, req.block_size, deadline - loop.time()
        )
        total = pub.payload.numel()
        offset, length = req.offset, (req.length or total - req.offset)
        if offset + length > total or length <= 0:
            raise InvalidMessage(f"range [{offset}, +{length}) outside the payload of {total} bytes")
        crc = await pub.range_checksum(offset, length, self.copier() if self.copier else None)
        return pub, offset, length, crc

    async def fetch_shard(self, request: bytes, context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._time_left(context, self.max_wait)
        with ExitStack() as held:  # this sender's stream slot, until the last chunk is out
            try:
                pub, offset, length, crc = await self._prepare_fetch(request, context, held, deadline)
            except CommError as exc:
                log.info("FetchShard rejected: %s", exc)
                await context.abort(status_for(exc), str(exc))
                return
            serve_until = loop.time() + self._time_left(context, self.stream_timeout)
            yield header_chunk(range_header(pub.header, offset, length, crc))
            for chunk in data_chunks(as_memoryview(pub.payload[offset : offset + length])):
                if loop.time() > serve_until:
                    await context.abort(
                        grpc.StatusCode.DEADLINE_EXCEEDED,
                        f"the fetch was not read within {self.stream_timeout:.1f}s",
                    )
                yield chunk
            self.counters.bytes_sent += length

    async def push_gradient(
        self, requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext
    ) -> pb.PushAck:
        acc = self.accumulator

        def accept(header: pb.TensorHeader, payload: torch.Tensor) -> None:
            if header.codec == pb.CODEC_NONE:
                part = payload.view(torch.float32)
            else:
                part = acc.decode_buffer(header)
                get_codec(header.codec).decode_into(payload, header.block_size, part)
            acc.contribute(header, part)  # owns the slot from here (it frees it if it rejects)

        return await self._receive(
            requests,
            context,
            PUSH_METHOD,
            lambda h: acc.reserve(h, self.store.published(h.epoch)),
            accept,
            acc.abandon,
            self._push_limit(),
        )

    async def send_tensor(
        self, requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext
    ) -> pb.PushAck:
        box = self.mailbox
        return await self._receive(
            requests, context, SEND_METHOD, box.reserve, lambda h, _: box.deliver(h), box.abandon, None
        )

    async def _receive(
        self,
        requests: AsyncIterator[bytes],
        context: grpc.aio.ServicerContext,
        method: str,
        reserve: Callable[[pb.TensorHeader], torch.Tensor],
        accept: Callable[[pb.TensorHeader, torch.Tensor], None],
        abandon: Callable[[pb.TensorHeader], None],
        limit: int | None,
    ) -> pb.PushAck:
        """Receive one stream (header, then payload chunks): admitted, reserved, received, accepted."""
        name = method.rsplit("/", 1)[-1]
        header: pb.TensorHeader | None = None
        receiver: PayloadReceiver | None = None
        reserved = False
        deadline = asyncio.get_running_loop().time() + self._time_left(context, self.stream_timeout)
        held = ExitStack()  # this sender's stream slot, until the stream is settled
        try:
            it = requests.__aiter__()
            first = await self._next(it, deadline)
            if first is None:
                raise InvalidMessage("empty stream: the first message must carry a header")
            header, data = parse_chunk(first)
            if header is None:
                raise InvalidMessage("the first message of a stream must carry a header")
            if method == SEND_METHOD:  # a peer's first message of an epoch may beat this rank's install
                group = await self._installed(header.epoch, deadline - asyncio.get_running_loop().time())
            else:  # a push follows a gather of the same step, which waited for the install
                installed = self.accumulator.group
                if installed is None:
                    raise StaleMessage("no membership epoch installed yet")
                group = installed
            message = peer_auth.push_message(header)
            self._admit(group, header.job_id, header.epoch, header.sender, method, message, context)
            held.enter_context(self.limits.slot(name, header.sender, limit))
            buffer = reserve(header)
            reserved = True
            receiver = PayloadReceiver(header, buffer, self.copier() if self.copier else None)
            if len(data):
                receiver.add(data)
            while (msg := await self._next(it, deadline)) is not None:
                again, data = parse_chunk(msg)
                if again is not None:
                    raise InvalidMessage("a header in the middle of a stream")
                receiver.add(data)
            await receiver.drain()
            payload = receiver.finish()
            self.counters.bytes_received += payload.numel()
            reserved = False  # accept() owns the slot from here (it frees it if it rejects)
            accept(header, payload)
            return pb.PushAck(received_bytes=payload.numel())
        except CommError as exc:
            self._release(header if reserved else None, receiver, abandon)
            held.close()
            log.info("%s rejected: %s", name, exc)
            await context.abort(status_for(exc), str(exc))
            raise AssertionError("unreachable") from None
        except BaseException:
            self._release(header if reserved else None, receiver, abandon)
            raise
        finally:
            held.close()

    def _push_limit(self) -> int:
        """Concurrent pushes one sender may have: streams_per_peer, or one per planned unit if more
        (a peer may push every unit of a step at once)."""
        plan = self.accumulator.plan
        return max(self.limits.per_peer, len(plan) if plan is not None else 0)

    @staticmethod
    def _release(
        header: pb.TensorHeader | None,
        receiver: PayloadReceiver | None,
        abandon: Callable[[pb.TensorHeader], None],
    ) -> None:
        """Free a failed stream's slot, once no copy into its buffer is pending."""
        if receiver is not None:
            receiver.settle()
        if header is not None:
            abandon(header)

    async def _next(self, it: AsyncIterator[bytes], deadline: float) -> bytes | None:
        """The next message, within the idle timeout and the stream's deadline (loop time)."""
        left = deadline - asyncio.get_running_loop().time()
        wait = min(self.idle_timeout, left)
        try:
            if wait <= 0:
                raise TimeoutError
            return await asyncio.wait_for(it.__anext__(), wait)
        except StopAsyncIteration:
            return None
        except TimeoutError:
            if wait < self.idle_timeout:
                raise CollectiveTimeout("the stream did not finish within its time limit") from None
            raise CollectiveTimeout(f"stream idle for {self.idle_timeout:.1f}s") from None
