"""TorchDistBackend: the CollectiveBackend over torch.distributed, for members of an epoch that share a host.

Usage: `backend.set_group(group, rendezvous="host:port")` once per epoch. The rendezvous address comes
with the epoch (the coordinator hands one out per epoch); the group's rank 0 hosts a TCPStore on it, so
that address must be one rank 0 can bind and every member can reach. With `host_store=False` every
member joins a store already hosted there (a worker's `RendezvousStore`) as a client. There is no
default process group: each epoch gets its own standalone group (`communication/torchdist_group.py`),
created with the collective timeout, and every collective names it explicitly. NCCL when every member
has CUDA, gloo otherwise (tensors are then staged through host memory).

Calls return futures at once; one dispatcher thread per backend (communication/torchdist_dispatch.py)
forms the epoch's group and runs the collectives in call order (every member calls them in the same
order), so the compute thread can prefetch. The library uses a call's tensors in place where it can
(contiguous float32 where it works: the GPU for NCCL, host memory for gloo), so the caller keeps what a
call reads unchanged until the call settles, and after a failure `out` holds unspecified values (an
abandoned group's library may still write it until its work ends). Other tensors go through staging
buffers, reused across calls (up to `pool_bytes` kept idle): inputs copied when the call starts, results
copied into `out` on success.

- all_gather: one all-gather of equal shards (NCCL's); on gloo, one broadcast from each rank straight into
  its slice of the result, which costs about half the time and CPU of gloo's all-gather (that one copies
  through a fresh flat buffer).
- reduce_scatter: an all-to-all moves slice r of every rank to rank r; the owner then sums the N slices
  in rank order 0..N-1 in fp32, so the result equals the sequential sum bit for bit (a library
  reduce-scatter does not promise an order). With `reduce="native"` an NCCL group runs NCCL's own
  reduce-scatter instead (one kernel, no full-size buffer of slices; its summation order is NCCL's, so
  results differ from the sequential sum within fp32 rounding); gloo always sums in rank order.
- Raw fp32 only: a call's codec must be its unit's planned codec, and "int8" is served exactly (the
  local lane carries raw fp32 whatever the codec; compression pays only across hosts).
- send / recv: the group's own point-to-point calls, in call order too (communication/torchdist_calls.py).
- Handle.cancel() withdraws a call the dispatcher has not started yet; a started one runs to its end.
- all_gather(..., ready=future): the shard is only filled in once `future` resolves (another lane's
  result): the call keeps its place in the call order and reads the shard then. If `future` fails, the
  epoch's group fails with its error (the co-located members would run that collective without us).

On a GPU (NCCL) nothing of a call waits on the host: the caller's stream is marked at the call, the
dispatcher issues the collective from the lane's own stream (all-gathers on one, the rest on another;
communication/cuda_streams.py) after that mark, and an event recorded after it tells when it is done on
the device. The handle says so (`Handle.order_after`): the engine's compute stream waits for that event,
not the host, so unit k+1 is gathered while unit k computes. The handle settles once the deadline watcher
(communication/nccl_watch.py) saw the event pass.

Failure: a peer's death surfaces as PeerLost (the library reports the closed connection), a call past its
timeout as CollectiveTimeout, and `set_epoch`/`set_group` of a newer epoch fails every older call at once
with EpochChanged. In each case the group is abandoned: nothing stays blocked on it, it is aborted, and it
is kept aside until the library's own work on it ends, so the next epoch's group forms without delay.
Under NCCL the watcher aborts the communicator at the deadline (the library's own timeout is longer, and
its watchdog never ends the process: communication/nccl_group.py), and an old epoch's group with nothing
in flight is shut down cleanly instead. `close()` joins the dispatcher and waits, at most the collective
timeout, for abandoned groups to end.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Future
from typing import Any

import torch
import torch.distributed as dist

from communication.backend import Codec, CollectiveBackend, UnitSpec, WireStats
from communication.compression import DEFAULT_INT8_BLOCK, codec_id_for
from communication.cuda_streams import CudaStreams, LaneStreams
from communication.errors import CommError, EpochChanged, InvalidMessage
from communication.group import PeerGroup
from communication.handle import Handle
from communication.lane_buffers import StagingBuffers
from communication.nccl_watch import NcclWatch
from communication.torchdist_calls import CallEnd, Launch, QueuedCall, TorchDistCalls, gather_by_broadcasts
from communication.torchdist_dispatch import TorchDistDispatcher
from communication.torchdist_group import (
    POLL_S,
    EpochGroup,
    device_has_cuda,
    parse_rendezvous,
    settle,
)
from communication.wire_plan import WirePlan

CLOSE_WAIT_S = 2.0  # how long close() lets abandoned groups finish their work in flight
REDUCE_MODES = ("ordered", "native")  # reduce-scatter under NCCL: rank-order sums, or NCCL's own
log = logging.getLogger(__name__)


class TorchDistBackend(TorchDistCalls, TorchDistDispatcher):
    def __init__(
        self,
        *,
        device: str | torch.device = "cpu",
        collective_timeout: float = 30.0,
        rendezvous_timeout: float = 30.0,
        pool_bytes: int = 256 << 20,
        reduce: str = "ordered",
        streams: LaneStreams | None = None,
    ) -> None:
        """`reduce`: "ordered" (rank-order sums, the default) or "native" (NCCL's reduce-scatter, on NCCL
        groups only). `streams`: the device's streams and events (default: the GPU's when `device` is
        one; a unit test hands a stand-in)."""
        if collective_timeout <= 0 or rendezvous_timeout <= 0:
            raise ValueError("timeouts must be positive")
        if reduce not in REDUCE_MODES:
            raise ValueError(f"reduce must be one of {', '.join(REDUCE_MODES)}, got {reduce!r}")
        self.device = torch.device(device)
        self.reduce = reduce
        # the backend's GPU, where the library works when the group is NCCL (gloo works in host memory)
        self._cuda: torch.device | None = None
        if device_has_cuda(self.device):
            index = self.device.index
            self._cuda = torch.device("cuda", torch.cuda.current_device() if index is None else index)
        self._streams: LaneStreams | None = streams
        if streams is None and self._cuda is not None:
            self._streams = CudaStreams(self._cuda)
        self._watch = NcclWatch()
        self.collective_timeout = collective_timeout
        self.rendezvous_timeout = rendezvous_timeout
        self._lock = threading.Lock()
        self._epoch = -1
        self._current: EpochGroup | None = None
        self._pending: dict[EpochGroup, set[Handle]] = {}
        # ended groups whose library work (or shutdown) is still running
        self._aside: list[EpochGroup] = []
        self._plan: WirePlan | None = None
        self._sent = 0
        self._received = 0
        self._closed = False
        self._buffers = StagingBuffers(pool_bytes)
        self._jobs: queue.SimpleQueue[EpochGroup | QueuedCall | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._dispatch, name="torchdist-dispatch", daemon=True)
        self._thread.start()

    # -- membership ------------------------------------------------------------------------------

    def set_group(self, group: PeerGroup, rendezvous: str = "", *, host_store: bool = True) -> None:
        """Install `group`'s epoch and start forming its process group on `rendezvous` ("host:port",
        hosted by the group's rank 0, or with `host_store=False` already hosted: every member joins it
        as a client). Returns at once; the epoch's first call waits for the group."""
        parse_rendezvous(rendezvous)
        with self._lock:
            if self._closed:
                raise RuntimeError("backend is closed")
            if group.epoch < self._epoch or (
                self._current is not None and group.epoch == self._current.epoch
            ):
                raise EpochChanged(f"cannot install {group.describe()}: epoch {self._epoch} is known")
            ended = self._abandon_older(group.epoch)
            self._epoch = group.epoch
            eg = EpochGroup(group, rendezvous, self._cuda, host_store)
            self._current = eg
            self._pending[eg] = set()
        self._end_groups(ended)
        self._jobs.put(eg)

    def set_plan(self, group: PeerGroup, units: Mapping[int, UnitSpec]) -> None:
        self._plan = WirePlan.build(group.epoch, units, DEFAULT_INT8_BLOCK)

    def set_epoch(self, epoch: int) -> None:
        with self._lock:
            if epoch > self._epoch:
                self._epoch = epoch
            ended = self._abandon_older(epoch)
        self._end_groups(ended)

    def _abandon_older(self, epoch: int) -> list[tuple[EpochGroup, CommError, bool]]:
        """(Lock held.) Fail every call of an epoch older than `epoch` now; its group is dropped. Returns
        the dropped groups, their error and whether calls of them were still pending, for `_end_groups`
        (outside the lock)."""
        ended: list[tuple[EpochGroup, CommError, bool]] = []
        for eg in [eg for eg in self._pending if eg.epoch < epoch]:
            eg.abandoned.set()
            error = EpochChanged(f"{eg.group.describe()}: epoch is now {epoch}")
            pending = self._pending.pop(eg)
            for fut in pending:
                settle(fut, error=error)
            if self._current is eg:
                self._current = None
            ended.append((eg, error, bool(pending)))
        return ended

    def _end_groups(self, ended: list[tuple[EpochGroup, CommError, bool]]) -> None:
        """End dropped NCCL groups now: abort one that failed or had calls pending (its calls in flight fail
        with `error`), shut an idle one down cleanly (in the background). A gloo group is ended by the
        dispatcher as it meets it, as before."""
        for eg, error, busy in ended:
            if eg.backend_name != "nccl" or self._streams is None:
                continue
            if busy or eg.failed is not None:
                self._watch.fail(eg, error)
            else:
                eg.end_in_background()
            self._park(eg)

    # -- collectives -----------------------------------------------------------------------------

    def all_gather(
        self,
        group: PeerGroup,
        step: int,
        unit: int,
        shard: torch.Tensor,
        out: torch.Tensor,
        timeout: float,
        *,
        codec: Codec = "none",
        ready: Future[Any] | None = None,
    ) -> Handle:
        """See CollectiveBackend; with `ready`, `shard` is read once `ready` resolved (module doc)."""
        codec_id = codec_id_for(codec)
        n = shard.numel()
        if out.numel() != n * group.world_size:
            raise ValueError(f"out has {out.numel()} elements, expected {n * group.world_size}")
        if shard.dtype != torch.float32:
            raise ValueError(f"shard must be float32, got {shard.dtype}")

        def launch(eg: EpochGroup, end: CallEnd) -> tuple[Any, Callable[[], torch.Tensor]]:
            src, staged = self._input(shard, eg)
            dst, private = self._output(out, eg)
            if eg.backend_name == "nccl":
                work = eg.pg._allgather_base(dst, src)
            else:
                work = gather_by_broadcasts(eg.pg, dst, src, group.rank, group.world_size)

            return work, end.deliver(dst, out, private, staged)

        nbytes = 4 * n * (group.world_size - 1)
        return self._submit(
            group, unit, n, codec_id, "this rank's shard", launch, timeout, nbytes, ready, kind="gather"
        )

    def reduce_scatter(
        self,
        group: PeerGroup,
        step: int,
        unit: int,
        full: torch.Tensor,
        out: torch.Tensor,
        timeout: float,
        *,
        codec: Codec = "none",
    ) -> Handle:
        codec_id = codec_id_for(codec)
        n, world = out.numel(), group.world_size
        if full.numel() != n * world:
            raise ValueError(f"full has {full.numel()} elements, expected {n * world}")

        def launch(eg: EpochGroup, end: CallEnd) -> tuple[Any, Callable[[], torch.Tensor]]:
            src, staged = self._input(full, eg)
            if eg.backend_name == "nccl" and self.reduce == "native":
                return self._native_reduce(eg, end, src, staged, out)
            slices = self._buffers.take(n * world, self._lib(eg))
            work = eg.pg.alltoall_base(slices, src, [n] * world, [n] * world)

            def finish() -> torch.Tensor:
                parts = slices.view(world, n)
                acc, private = self._output(out, eg)
                if world == 1:
                    acc.copy_(parts[0])
                else:  # rank order, fp32: equal to the sequential sum
                    torch.add(parts[0], parts[1], out=acc)
                    for r in range(2, world):
                        acc.add_(parts[r])
                if private:
                    end.copy(acc, out)
                end.give(*staged, slices, *private)
                return out

            return work, finish

        nbytes = 4 * n * (world - 1)
        return self._submit(group, unit, n, codec_id, "this rank's gradient", launch, timeout, nbytes)

    def _native_reduce(
        self,
        eg: EpochGroup,
        end: CallEnd,
        src: torch.Tensor,
        staged: tuple[torch.Tensor, ...],
        out: torch.Tensor,
    ) -> tuple[Any, Callable[[], torch.Tensor]]:
        """NCCL's own reduce-scatter of `src` into `out` (sum; NCCL's order of summation)."""
        dst, private = self._output(out, eg)
        opts = dist.ReduceScatterOptions()
        opts.reduceOp = dist.ReduceOp(dist.ReduceOp.SUM)
        work = eg.pg._reduce_scatter_base(dst, src, opts)

        return work, end.deliver(dst, out, private, staged)

    def _submit(
        self,
        group: PeerGroup,
        unit: int,
        numel: int,
        codec: int,
        what: str,
        launch: Launch,
        timeout: float,
        nbytes: int,
        ready: Future[Any] | None = None,
        kind: str = "reduce",
    ) -> Handle:
        """A collective: checked against the plan, then queued in call order."""
        plan = self._plan
        if plan is not None and plan.epoch == group.epoch:
            try:
                plan.check_local(unit, numel, codec, what)
            except InvalidMessage as exc:
                failed = Handle()
                failed.set_exception(exc)
                return failed
        return self._enqueue(group, launch, timeout, nbytes, nbytes, ready, kind)

    def release(self, group: PeerGroup, step: int) -> None:
        """Nothing is kept per step on this lane (shards are not served after their collective)."""

    # -- misc --------------------------------------------------------------------------------------

    def stats(self) -> WireStats:
        with self._lock:
            return WireStats(self._sent, self._received)

    def accepts_device(self, group: PeerGroup, device: torch.device) -> bool:
        """Device tensors go as they are: NCCL uses them in place, gloo's calls stage them via the host."""
        return True

    def bytes_by_lane(self) -> dict[str, int]:
        """Bytes this rank sent, by lane (this backend is the local lane)."""
        return {"grpc": 0, "local": self.stats().bytes_sent}

    def close(self) -> None:
        """Fail what is in flight, end the groups (an idle NCCL group is shut down cleanly), join the
        threads."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            ended = self._abandon_older(self._epoch + 1)
        self._end_groups(ended)
        self._jobs.put(None)
        self._thread.join(self.rendezvous_timeout + self.collective_timeout + 5)
        deadline = time.monotonic() + min(self.collective_timeout, CLOSE_WAIT_S)
        while self._aside and time.monotonic() < deadline:
            self._reap_aside()
            time.sleep(POLL_S)
        if self._aside:  # kept referenced: destroying a group with work in flight may abort the process
            log.warning(
                "closing with %d abandoned group(s) still busy; left to the process exit", len(self._aside)
            )
        self._watch.close()
        if self._streams is not None:
            self._streams.close()
        self._buffers.clear()


# mypy checks this lane against the contract (communication/backend.py).
_CONTRACT: type[CollectiveBackend] = TorchDistBackend
