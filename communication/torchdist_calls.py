"""The call queue of the torch.distributed lane: every call (collective or point-to-point) is queued in
call order for the backend's dispatcher, and its handle can withdraw it until the dispatcher starts it.

Point-to-point `send` / `recv` (communication/p2p.py for the semantics) are the epoch's process group's
own send / recv, with the key as the library's tag. The exact control `exchange` is one all-gather of
the values in their own dtype (int64 or float64), in call order like everything else.

Like the collectives, they run in call order on the backend's dispatcher, one at a time, so the two
sides of a transfer must reach it at the same place of their call order: a rank's sends and receives
are matched in the order the ranks make them (a send waits for its receive to be posted). A call can be
withdrawn (Handle.cancel) until the dispatcher starts it; a running one cannot. A message of another
numel than the receive buffer surfaces as the library's error, and the epoch's group fails with it.

Also here, shared by the calls: which tensors the library can use in place (`_input`, `_output`), what a
call does once it has completed (`CallEnd`), the Work adapters the dispatcher waits on (`ThreadedWork`
for gloo's point-to-point, `AllWorks` for several library calls issued as one), and gloo's all-gather as
one broadcast per rank (`gather_by_broadcasts`).

On a GPU (NCCL) a call's `finish` runs right after the library call, on the lane's stream (it only queues
device work, such as the rank-order sums); what needs the call to have completed (copies of results into
host memory, buffers given back to the pool) waits in its `CallEnd` until the deadline watcher saw the
call's end (communication/nccl_watch.py), and is dropped if the call failed.
"""

from __future__ import annotations

import datetime
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from communication.backend import check_exchange
from communication.cuda_streams import LaneStreams
from communication.errors import EpochChanged
from communication.group import PeerGroup
from communication.handle import Handle
from communication.lane_buffers import StagingBuffers
from communication.p2p import check_call
from communication.torchdist_group import EpochGroup


class CallEnd:
    """What a call does with its results once it has completed (module doc): at once on the host path
    (`host_copy` None: `finish` runs after the call completed), else kept for `run()`."""

    def __init__(
        self, buffers: StagingBuffers, host_copy: Callable[[torch.Tensor, torch.Tensor], None] | None = None
    ) -> None:
        self._buffers = buffers
        self._host_copy = host_copy
        self._later: list[Callable[[], None]] = []

    def copy(self, src: torch.Tensor, dst: torch.Tensor) -> None:
        """Copy the library's result `src` into `dst` (flat): now where `dst` is on the device (queued on
        the call's stream) or the call has completed; into host memory only once it has."""
        host_copy = self._host_copy
        if host_copy is None or dst.device.type != "cpu":
            dst.view(-1).copy_(src)
        else:
            self._later.append(lambda: host_copy(src, dst))

    def give(self, *buffers: torch.Tensor) -> None:
        """Give staging buffers back to the pool once nothing reads or writes them any more."""
        if self._host_copy is None:
            self._buffers.give(*buffers)
        else:
            self._later.append(lambda: self._buffers.give(*buffers))

    def deliver(
        self,
        dst: torch.Tensor,
        out: torch.Tensor,
        private: tuple[torch.Tensor, ...],
        staged: tuple[torch.Tensor, ...],
    ) -> Callable[[], torch.Tensor]:
        """The `finish` of a call whose library wrote `dst`: its values into `out` where `dst` is a private
        buffer, the staging buffers given back, and `out` its result."""

        def finish() -> torch.Tensor:
            if private:
                self.copy(dst, out)
            self.give(*staged, *private)
            return out

        return finish

    def run(self) -> None:
        """The call has completed: do what waited for it."""
        later, self._later = self._later, []
        for step in later:
            step()


# Issues the library call on the formed group; returns its Work and what to do once the library's work
# ended (on a GPU: queued after it on the lane's stream; see CallEnd).
Launch = Callable[[Any, CallEnd], tuple[Any, Callable[[], torch.Tensor]]]


@dataclass(eq=False)
class QueuedCall:
    eg: EpochGroup
    launch: Launch
    future: Handle
    deadline: float
    sent: int  # bytes this rank sends and receives by the call
    received: int
    ready: Future[Any] | None = None  # what the input waits for (deferred all_gather)
    started: bool = False  # handed to the library: it can no longer be withdrawn
    kind: str = "reduce"  # the lane's stream it is issued from on a GPU ("gather" or "reduce")
    mark: int | None = None  # on a GPU: the event after the call's inputs, on the caller's stream


class ThreadedWork:
    """A library Work without a future (gloo's send / recv: `get_future` is not implemented there), waited
    on by a thread of its own for at most `timeout` seconds, that looks like one with a future. The thread
    lets go of the library's Work before it reports, and `wait()` joins it, so no thread outlives the call
    on the normal path."""

    def __init__(self, work: Any, timeout: float) -> None:
        self._done: Future[None] = Future()
        self._work: Any = work
        self._thread = threading.Thread(
            target=self._wait, args=(timeout,), name="torchdist-p2p-wait", daemon=True
        )
        self._thread.start()

    def _wait(self, timeout: float) -> None:
        work, self._work = self._work, None
        error: BaseException | None = None
        try:
            work.wait(datetime.timedelta(seconds=max(timeout, 0.001)))
        except Exception as exc:  # the library's error, raised again by wait()
            error = exc
        del work  # released on this thread, before anyone is told
        if error is None:
            self._done.set_result(None)
        else:
            self._done.set_exception(error)

    def get_future(self) -> Future[None]:
        return self._done

    def is_completed(self) -> bool:
        return self._done.done()

    def wait(self) -> None:
        self._thread.join()
        exc = self._done.exception()
        if exc is not None:
            raise RuntimeError(str(exc))


class AllWorks:
    """Several library Works issued together, as one Work: complete once every one is."""

    def __init__(self, works: list[Any]) -> None:
        self._works = works
        self._future = torch.futures.collect_all([w.get_future() for w in works])

    def get_future(self) -> Any:
        return self._future

    def is_completed(self) -> bool:
        return all(w.is_completed() for w in self._works)

    def wait(self) -> None:
        for w in self._works:
            w.wait()


def gather_by_broadcasts(pg: Any, out: torch.Tensor, shard: torch.Tensor, rank: int, world: int) -> AllWorks:
    """All-gather of equal shards into flat `out` as `world` broadcasts, rank r's from its slice of
    `out` (this rank's filled in first), every rank issuing them in rank order."""
    n = shard.numel()
    out[rank * n : (rank + 1) * n].copy_(shard)
    works = []
    for root in range(world):
        opts = dist.BroadcastOptions()
        opts.rootRank, opts.rootTensor = root, 0
        works.append(pg.broadcast([out[root * n : (root + 1) * n]], opts))
    return AllWorks(works)


def waitable(work: Any, timeout: float) -> Any:
    """`work` if it has a future (NCCL), else a ThreadedWork around it (gloo's point-to-point)."""
    try:
        work.get_future()
    except RuntimeError:
        return ThreadedWork(work, timeout)
    return work


def _in_place(t: torch.Tensor, device: torch.device) -> bool:
    """Whether the library can use `t` as it is: contiguous float32 on its device."""
    return (
        t.dtype == torch.float32
        and t.is_contiguous()
        and t.device.type == device.type
        and (t.device.index or 0) == (device.index or 0)
    )


class TorchDistCalls:
    """Mixed into TorchDistBackend, whose state and dispatcher it uses."""

    _buffers: StagingBuffers
    device: torch.device
    _lock: threading.Lock
    _epoch: int
    _current: EpochGroup | None
    _pending: dict[EpochGroup, set[Handle]]
    _jobs: queue.SimpleQueue[EpochGroup | QueuedCall | None]

    _cuda: torch.device | None  # the backend's GPU, when it has one (the library's device under NCCL)
    _streams: LaneStreams | None  # its streams and events (None: a lane on the host)

    def _lib(self, eg: EpochGroup) -> torch.device:
        """Where `eg`'s library works: the GPU for NCCL, host memory for gloo."""
        return self._cuda if eg.backend_name == "nccl" and self._cuda is not None else torch.device("cpu")

    def _input(self, tensor: torch.Tensor, eg: EpochGroup) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        """What `eg`'s library reads for `tensor` (flat), and the staging buffers to give back once the
        call ended: `tensor` itself where the library can read it in place, else a copy."""
        flat = tensor.detach().reshape(-1)
        if _in_place(flat, self._lib(eg)):
            return flat, ()
        staged = self._buffers.take(flat.numel(), self._lib(eg))
        staged.copy_(flat)
        return staged, (staged,)

    def _output(self, out: torch.Tensor, eg: EpochGroup) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        """Where `eg`'s library writes `out`'s values (flat): `out` itself where it can, else a reused
        buffer that the call copies into `out` on success (and gives back)."""
        if _in_place(out, self._lib(eg)):
            return out.view(-1), ()
        buf = self._buffers.take(out.numel(), self._lib(eg))
        return buf, (buf,)

    def _enqueue(
        self,
        group: PeerGroup,
        launch: Launch,
        timeout: float,
        sent: int,
        received: int,
        ready: Future[Any] | None = None,
        kind: str = "reduce",
    ) -> Handle:
        """Queue a call in call order; its handle can withdraw it until the dispatcher starts it. On a GPU
        the caller's stream is marked here: the call is issued after what the caller queued so far."""
        fut = Handle()
        with self._lock:
            eg = self._current
            if eg is None or eg.epoch != group.epoch or eg.group != group:
                fut.set_exception(
                    EpochChanged(f"{group.describe()}: not the installed group (epoch {self._epoch})")
                )
                return fut
            self._pending[eg].add(fut)
        mark = None
        if self._streams is not None:
            self._streams.collect()  # this thread's marks of calls issued since
            mark = self._streams.mark_input()
        deadline = time.monotonic() + timeout
        call = QueuedCall(eg, launch, fut, deadline, sent, received, ready, kind=kind, mark=mark)
        fut.bind(lambda: self._withdraw(call))
        self._jobs.put(call)
        return fut

    def _withdraw(self, call: QueuedCall) -> bool:
        with self._lock:
            if call.started or call.future.done():
                return False
            self._pending.get(call.eg, set()).discard(call.future)
        call.future.fail_cancelled(call.eg.group.describe())
        return True

    def exchange(self, values: torch.Tensor, *, group: PeerGroup, key: int, timeout: float) -> Handle:
        """See CollectiveBackend: one all-gather of the values in their own dtype, in call order (the key
        is checked, and the order of calls names the exchange on this lane)."""
        flat = check_exchange(group, key, values)
        n, world = flat.numel(), group.world_size

        def launch(eg: EpochGroup, end: CallEnd) -> tuple[Any, Callable[[], torch.Tensor]]:
            lib = self._lib(eg)
            src = flat.to(lib, copy=True)
            dst = torch.empty(world * n, dtype=flat.dtype, device=lib)
            if eg.backend_name == "nccl":
                work = eg.pg._allgather_base(dst, src)
            else:
                work = gather_by_broadcasts(eg.pg, dst, src, group.rank, world)

            def finish() -> torch.Tensor:
                if dst.device.type == "cpu":
                    return dst.view(world, n)
                rows = torch.empty(world * n, dtype=flat.dtype)
                end.copy(dst, rows)
                return rows.view(world, n)

            return work, finish

        nbytes = flat.element_size() * n * (world - 1)
        return self._enqueue(group, launch, timeout, nbytes, nbytes)

    def send(self, tensor: torch.Tensor, *, group: PeerGroup, dest: int, key: int, timeout: float) -> Handle:
        """See CollectiveBackend: resolves once the library delivered the tensor (copied at the call)."""
        check_call(group, dest, key, tensor, "send")

        def launch(eg: EpochGroup, end: CallEnd) -> tuple[Any, Callable[[], torch.Tensor]]:
            src, staged = self._input(tensor, eg)
            work = waitable(eg.pg.send([src], dest, key), timeout)

            def finish() -> torch.Tensor:
                end.give(*staged)
                return tensor

            return work, finish

        return self._enqueue(group, launch, timeout, 4 * tensor.numel(), 0)

    def recv(self, out: torch.Tensor, *, group: PeerGroup, src: int, key: int, timeout: float) -> Handle:
        """See CollectiveBackend: `out` is written only once the message arrived whole."""
        flat = check_call(group, src, key, out, "recv")

        def launch(eg: EpochGroup, end: CallEnd) -> tuple[Any, Callable[[], torch.Tensor]]:
            buf = self._buffers.take(flat.numel(), self._lib(eg))  # `out` is written only once it all arrived
            work = waitable(eg.pg.recv([buf], src, key), timeout)

            def finish() -> torch.Tensor:
                end.copy(buf, flat)
                end.give(buf)
                return out

            return work, finish

        return self._enqueue(group, launch, timeout, 0, 4 * flat.numel())
