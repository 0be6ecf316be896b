"""GrpcBackend: the CollectiveBackend over gRPC streams between workers.

One asyncio event loop in a background thread runs the grpc.aio server (serving this rank's shards
and receiving gradients) and the client calls to peers. The Protocol methods are called from the
compute thread: they encode what this rank sends right there (so the loop only moves bytes), then
schedule the collective on the loop and return a concurrent Future.

Every in-flight collective is registered under its epoch; `set_epoch`/`set_group` with a newer
epoch cancels all older ones at once and their futures fail with EpochChanged.

The codec is chosen per call (module doc of communication/backend.py); the int8 block size is this
backend's (the job's). Error feedback applies to int8 reduce-scatters only. Calls return Handles:
`cancel()` stops a call's streams (peers free what they reserved for them); what this rank published or
contributed for the step stays until it is released or the epoch ends, as for a failed step.
The collectives: communication/grpc_collectives.py; point-to-point send / recv and the exchange:
communication/grpc_p2p.py.

By default a payload travels over one stream per peer and is copied and checksummed on the loop
thread: on a CPU-bound worker, parallel stripes and copy threads cost more CPU (extra connections,
a thread hop per chunk) than they gain; both remain options.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable, Coroutine, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar

import grpc
import torch

from communication import collectives
from communication.accumulator import GradientAccumulator
from communication.backend import UnitSpec, WireStats, WorkerLane
from communication.compression import DEFAULT_INT8_BLOCK, MAX_INT8_BLOCK, ErrorFeedback
from communication.epoch_tasks import EpochTasks
from communication.errors import EpochChanged
from communication.group import PeerGroup
from communication.grpc_channels import ChannelCache
from communication.grpc_collectives import GrpcCollectives
from communication.grpc_p2p import GrpcPointToPoint
from communication.handle import Handle
from communication.mailbox import Mailbox
from communication.peer_limits import STREAMS_PER_PEER
from communication.server import create_server, token_metadata
from communication.servicer import IDLE_TIMEOUT_S, STREAM_TIMEOUT_S, WireCounters, WireServicer
from communication.shard_store import ShardStore
from communication.tls import TlsConfig
from communication.wire_plan import WirePlan
from protos import zerowire_pb2 as pb

log = logging.getLogger(__name__)
T = TypeVar("T")


class GrpcBackend(GrpcCollectives, GrpcPointToPoint):
    def __init__(
        self,
        token: str,
        *,
        int8_block: int = DEFAULT_INT8_BLOCK,
        window: int = 1,
        max_pending_bytes: int = 4 << 30,
        idle_timeout: float = IDLE_TIMEOUT_S,
        stream_timeout: float = STREAM_TIMEOUT_S,
        copy_threads: int = 0,
        stripes: int = 1,
        stripe_min_bytes: int = 4 << 20,
        tls: TlsConfig | None = None,
        max_mailbox_bytes: int = 1 << 30,
    ) -> None:
        if not token:
            raise ValueError("GrpcBackend needs the cluster token")
        self.block = int8_block  # of every int8 call (the job's setting)
        if not isinstance(int8_block, int) or not 1 <= int8_block <= MAX_INT8_BLOCK:
            raise ValueError(f"int8_block must be in 1..{MAX_INT8_BLOCK}, got {int8_block}")
        self._token = token
        self._window = window
        self._max_pending_bytes = max_pending_bytes
        self._idle_timeout = idle_timeout
        self._stream_timeout = stream_timeout  # longest push or fetch served; >= the collective timeout
        if not 0 < idle_timeout <= stream_timeout:
            raise ValueError(f"need 0 < idle_timeout ({idle_timeout:g}) <= stream_timeout ({stream_timeout})")
        self._copy_threads = copy_threads
        if stripes < 1:
            raise ValueError(f"stripes must be >= 1, got {stripes}")
        self._stripes = stripes
        self._stripe_min_bytes = stripe_min_bytes
        self._tls = tls  # TLS for the server and the channels to peers (mutual with a CA); None: plaintext
        self._feedback = ErrorFeedback(pb.CODEC_INT8, int8_block)  # int8 reduce-scatters only
        self._epoch = -1
        self._groups: dict[int, PeerGroup] = {}
        self._inflight = EpochTasks(lambda: self._epoch)
        self._counters = WireCounters()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: grpc.aio.Server | None = None
        self._wire: collectives.Wire | None = None
        self._store: ShardStore | None = None
        self._mailbox = Mailbox(max_mailbox_bytes)  # point-to-point messages received, not claimed yet
        self.port: int | None = None

    # -- lifecycle ----------------------------------------------------------------------------
    def start(self, bind: str = "127.0.0.1:0", timeout: float = 30.0) -> int:
        if self._loop is not None:
            raise RuntimeError("GrpcBackend already started")
        loop = asyncio.new_event_loop()
        self._loop = loop
        self._thread = threading.Thread(target=loop.run_forever, name="zerowire-wire", daemon=True)
        self._thread.start()
        self.port = asyncio.run_coroutine_threadsafe(self._astart(bind), loop).result(timeout)
        log.info("wire server listening on %s (port %d)", bind, self.port)
        return self.port

    async def _astart(self, bind: str) -> int:
        self._store = ShardStore()
        accumulator = GradientAccumulator(window=self._window, max_pending_bytes=self._max_pending_bytes)
        self._wire = collectives.Wire(
            ChannelCache(self._tls),
            accumulator,
            self._counters,
            token_metadata(self._token),
            collectives.BufferPool(),
            [ThreadPoolExecutor(1, thread_name_prefix="zerowire-copy") for _ in range(self._copy_threads)],
            stripes=self._stripes,
            stripe_min_bytes=self._stripe_min_bytes,
        )
        servicer = WireServicer(
            self._store,
            accumulator,
            self._counters,
            idle_timeout=self._idle_timeout,
            stream_timeout=self._stream_timeout,
            streams_per_peer=STREAMS_PER_PEER * self._stripes,  # a striped fetch is several streams
            copier=self._wire.copier,
            mailbox=self._mailbox,
        )
        self._server, port = create_server(bind, servicer, self._token, self._tls)
        await self._server.start()
        return port

    def close(self) -> None:
        loop, self._loop = self._loop, None
        if loop is None:
            return
        try:
            asyncio.run_coroutine_threadsafe(self._aclose(), loop).result(10)
        except Exception:
            log.exception("error while closing the wire backend")
        finally:
            loop.call_soon_threadsafe(loop.stop)
            if self._thread is not None:
                self._thread.join(10)
            if not loop.is_running():
                loop.close()

    async def _aclose(self) -> None:
        await self._inflight.cancel_all()
        if self._server is not None:
            await self._server.stop(grace=0.5)
        if self._wire is not None:
            await self._wire.channels.close()
            for copier in self._wire.copiers:
                copier.shutdown(wait=False, cancel_futures=True)

    # -- plumbing -----------------------------------------------------------------------------
    def _require_loop(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            raise RuntimeError("GrpcBackend is not started (call start())")
        return self._loop

    def _on_loop(self, fn: Callable[[], None]) -> None:
        self._require_loop().call_soon_threadsafe(fn)

    def _submit(self, group: PeerGroup, make: Callable[[], Coroutine[Any, Any, torch.Tensor]]) -> Handle:
        """Run `make()` on the loop as a call of `group`'s epoch; cancelling the handle cancels it."""
        result = Handle()
        self._on_loop(lambda: self._inflight.launch(group, make, result, self._require_loop()))
        return result

    def _cancel_older(self, epoch: int) -> None:
        """On the loop: fail everything of epochs before `epoch` at once."""
        assert self._store is not None and self._wire is not None
        self._store.set_epoch(epoch)
        self._wire.accumulator.set_epoch(epoch)
        self._mailbox.set_epoch(epoch)
        self._inflight.cancel_older(epoch)

    def _check_group(self, group: PeerGroup) -> None:
        if group.epoch < self._epoch:
            raise EpochChanged(f"{group.describe()}: epoch is now {self._epoch}")
        if self._groups.get(group.epoch) != group:
            self.set_group(group)

    def _stale(self, group: PeerGroup) -> Handle | None:
        """A failed handle for a call naming an old epoch (installs a newer group first-time seen)."""
        try:
            self._check_group(group)
        except EpochChanged as exc:
            failed = Handle()
            failed.set_exception(exc)
            return failed
        return None

    # -- CollectiveBackend --------------------------------------------------------------------
    def set_group(self, group: PeerGroup) -> None:
        self._require_loop()
        if group.epoch < self._epoch:
            raise EpochChanged(f"cannot install {group.describe()}: epoch {self._epoch} is known")
        if group.epoch in self._groups and self._groups[group.epoch] != group:
            raise ValueError(f"a different group was installed for epoch {group.epoch}")
        self._groups = {group.epoch: group}
        newer = group.epoch > self._epoch
        self._epoch = group.epoch
        if newer:
            self._feedback.reset()

        def install() -> None:
            assert self._store is not None and self._wire is not None
            self._cancel_older(group.epoch)
            self._store.set_group(group)
            self._wire.accumulator.set_group(group)
            self._mailbox.set_group(group)
            self._wire.pool.clear()

        self._on_loop(install)
        log.info("installed %s", group.describe())

    def set_plan(self, group: PeerGroup, units: Mapping[int, UnitSpec]) -> None:
        """See CollectiveBackend: the plan of `group`'s epoch (int8 units in this backend's block)."""
        plan = WirePlan.build(group.epoch, units, self.block)
        self._check_group(group)

        def install() -> None:
            assert self._store is not None and self._wire is not None
            self._store.set_plan(plan)
            self._wire.accumulator.set_plan(plan)

        self._on_loop(install)

    def set_epoch(self, epoch: int) -> None:
        self._require_loop()
        if epoch <= self._epoch:
            return
        self._epoch = epoch
        self._feedback.reset()  # ranks and shards are re-partitioned in a new epoch
        self._on_loop(lambda: self._cancel_older(epoch))

    def release(self, group: PeerGroup, step: int) -> None:
        def run() -> None:
            assert self._store is not None and self._wire is not None
            self._store.release(group.epoch, step)
            self._wire.accumulator.release(group.epoch, step)

        self._on_loop(run)

    def stats(self) -> WireStats:
        return WireStats(self._counters.bytes_sent, self._counters.bytes_received)

    def accepts_device(self, group: PeerGroup, device: torch.device) -> bool:
        """Host memory only: the wire encodes from and decodes into host tensors."""
        return device.type == "cpu"

    @property
    def store_port(self) -> int | None:
        """None: the gRPC lane hosts no rendezvous store (the hierarchical lane does)."""
        return None

    def bytes_by_lane(self) -> dict[str, int]:
        """Bytes this rank sent, by lane (this backend is the gRPC lane)."""
        return {"grpc": self._counters.bytes_sent, "local": 0}

    def inflight(self) -> int:
        """Number of collectives still running (diagnostics and tests)."""
        return self._inflight.count()

    def call_soon(self, coro: Coroutine[Any, Any, T]) -> Future[T]:
        """Run a coroutine on the wire's loop (diagnostics and tests)."""
        return asyncio.run_coroutine_threadsafe(coro, self._require_loop())


# mypy checks this lane against the contract (communication/backend.py).
_CONTRACT: type[WorkerLane] = GrpcBackend
