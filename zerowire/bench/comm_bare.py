"""The bare-gRPC contender of `zerowire bench comm`: the same bytes as the wire's collectives, over
grpc.aio with nothing of ours on top.

Raw bytes in chunks of the wire's chunk size, on generic method handlers with identity serializers
(no protobuf, no header, no checksum, no accumulator, no token check), over a channel and a server
built with the wire's own options. Like the wire, the calls run on an event loop in a background
thread and the bench waits on them from its main thread. Two methods, shaped like the wire's:
`Fetch` (unary request, streamed reply: the all-gather half a peer serves) and `Push` (streamed
request, unary reply: the reduce-scatter half a peer owns). A receiver copies every chunk into its
destination tensor once, as any receiver of a collective must; nothing else is done with the bytes (no
copy of the local half into the gathered tensor, no sum): the difference to ours is what our layer
costs. Both peers `connect` before either exchanges (the bench puts a barrier between).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterable, AsyncIterator, Coroutine, Iterator
from typing import Any, TypeVar

import grpc
import numpy as np
import torch

from communication.grpc_channels import ChannelCache
from communication.server import SERVER_OPTIONS
from communication.tensor_stream import CHUNK_BYTES, as_memoryview

SERVICE = "zerowire.bench.Bare"
FETCH_METHOD = f"/{SERVICE}/Fetch"
PUSH_METHOD = f"/{SERVICE}/Push"
T = TypeVar("T")


def _identity(b: bytes) -> bytes:
    return b


def _chunks(view: memoryview) -> Iterator[bytes]:
    for off in range(0, len(view), CHUNK_BYTES):
        yield bytes(view[off : off + CHUNK_BYTES])


async def _receive(messages: AsyncIterable[bytes], dest: np.ndarray) -> int:
    got = 0
    async for message in messages:
        end = got + len(message)
        if end > dest.size:
            raise ValueError(f"peer sent more than the {dest.size} bytes expected")
        dest[got:end] = np.frombuffer(message, dtype=np.uint8)
        got = end
    return got


class BareGrpc:
    """One peer of a 2-process exchange: serves `served` on Fetch, receives Push into `pushed_into`."""

    def __init__(self, timeout: float) -> None:
        self._served = memoryview(b"")
        self._pushed_into = np.empty(0, dtype=np.uint8)
        self._timeout = timeout
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="bench-bare-grpc", daemon=True)
        self._server: grpc.aio.Server | None = None
        self._channels: ChannelCache | None = None
        self._pushes: asyncio.Queue[int] | None = None
        self._peer = ""

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(self._timeout + 5)

    def start(self, bind: str = "127.0.0.1:0") -> int:
        self._thread.start()
        return self._run(self._astart(bind))

    async def _astart(self, bind: str) -> int:
        self._pushes = asyncio.Queue()
        self._channels = ChannelCache()
        server = self._server = grpc.aio.server(options=SERVER_OPTIONS)
        handlers = {
            "Fetch": grpc.unary_stream_rpc_method_handler(
                self._fetch, request_deserializer=_identity, response_serializer=_identity
            ),
            "Push": grpc.stream_unary_rpc_method_handler(
                self._push, request_deserializer=_identity, response_serializer=_identity
            ),
        }
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
        port = server.add_insecure_port(bind)
        if port == 0:
            raise OSError(f"cannot bind the bare gRPC server to {bind}")
        await server.start()
        return port

    def connect(self, address: str, served: torch.Tensor, pushed_into: torch.Tensor) -> None:
        """Exchange with the peer at `address`: serve `served`, receive its push into `pushed_into`."""
        self._peer = address
        self._served = as_memoryview(served)
        self._pushed_into = pushed_into.view(-1).view(torch.uint8).numpy()

    async def _fetch(self, request: bytes, context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
        for chunk in _chunks(self._served):
            yield chunk

    async def _push(self, requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> bytes:
        got = await _receive(requests, self._pushed_into)
        assert self._pushes is not None
        self._pushes.put_nowait(got)
        return b""

    def all_gather(self, into: torch.Tensor) -> None:
        """Fetch the peer's served bytes into `into` (while the peer fetches ours)."""
        self._run(self._all_gather(into.view(-1).view(torch.uint8).numpy()))

    async def _all_gather(self, dest: np.ndarray) -> None:
        assert self._channels is not None
        call = self._channels.get(self._peer).unary_stream(
            FETCH_METHOD, request_serializer=_identity, response_deserializer=_identity
        )
        got = await _receive(call(b"", timeout=self._timeout), dest)
        if got != dest.size:
            raise ConnectionError(f"fetched {got} of {dest.size} bytes")

    def reduce_scatter(self, send: torch.Tensor) -> None:
        """Push `send` to the peer and wait until the peer's push has landed in `pushed_into`."""
        self._run(self._reduce_scatter(as_memoryview(send)))

    async def _reduce_scatter(self, view: memoryview) -> None:
        assert self._channels is not None and self._pushes is not None
        call = self._channels.get(self._peer).stream_unary(
            PUSH_METHOD, request_serializer=_identity, response_deserializer=_identity
        )
        _, got = await asyncio.wait_for(
            asyncio.gather(call(_chunks(view), timeout=self._timeout), self._pushes.get()), self._timeout
        )
        if got != self._pushed_into.size:
            raise ConnectionError(f"received a push of {got} of {self._pushed_into.size} bytes")

    def close(self) -> None:
        async def aclose() -> None:
            if self._server is not None:
                await self._server.stop(grace=0.5)
            if self._channels is not None:
                await self._channels.close()

        try:
            self._run(aclose())
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
            if not self._loop.is_running():
                self._loop.close()
