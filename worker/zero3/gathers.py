"""The parameter gathers of the ZeRO-3 engine: issuing each unit's all-gather, waiting for it, prefetching
the next one, freeing the gathered parameters, and what a pass spent waiting.

The sharded module (``worker.zero3.sharded``) decides *when* a unit is needed or done with; ``Gathers``
does the rest:

- issuing: a unit's all-gather goes to the backend directly, or through the engine's ``OrderedLauncher``
  where the engine has one (then every call goes through it, in order). It is keyed by the pass's step.
- prefetching: one unit ahead, in a given order (forward order in forward, the reverse of it in backward):
  the gather of the next unit in that order is issued, or of the one after it when the next one is still
  gathered (kept for backward), so big units get a head start. One prefetch at a time, decided by the
  units' states alone, never by whether a future is done, so every rank issues its collectives in the same
  order (the torch.distributed lane runs them in call order), whatever the timing.
- freeing: a unit's full parameters are let go (after its gather if one is still in flight); the bytes of
  gathered parameters held at once are accounted, and their peak kept (``peak_full_bytes``).
- waiting and timing: the compute thread's time blocked on futures (``PassStats.wait_s``) and the summed
  in-flight time of the pass's collectives (``PassStats.comm_s``, also of the reductions, through
  ``track``). A wait gives up ``_WAIT_GRACE_S`` after the collective timeout.
- dropping: an unfinished pass's gathers in flight are waited (bounded by the timeout), its units freed.

On a lane that runs its collectives on device streams (NCCL: the handle's ``order_after``), waiting for a
gather means making the compute stream wait for it on the device: the host goes on queueing kernels while
the next unit is gathered, with one gather in flight ahead. Such a gather's own outcome is read once, on
the host, at the end of the pass (``settle_on_device``: from ``finish_backward``, or at the end of a
forward-only pass), where a failure raises; the pass's results are then not used.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass

import torch

from communication.backend import Codec, CollectiveBackend
from communication.errors import CollectiveTimeout
from communication.group import PeerGroup
from worker.zero3.device_waits import DeviceOrdered, DeviceWaits
from worker.zero3.flat_unit import FlatUnit, UnitState
from worker.zero3.launcher import OrderedLauncher

logger = logging.getLogger(__name__)

_WAIT_GRACE_S = 5.0  # on top of the collective timeout, before the compute thread gives up on a future


@dataclass
class PassStats:
    """Timings of one pass (reset by ``begin``)."""

    wait_s: float = 0.0  # compute thread blocked on futures
    comm_s: float = 0.0  # summed in-flight time of the pass's collectives
    gathers: int = 0
    reductions: int = 0


class Gathers:
    """The gathers of one engine's ``units``: what is gathered or in flight, the prefetch, the bytes held and
    the pass's timings. ``timeout`` is the collectives' (the engine sets it between passes)."""

    def __init__(
        self,
        units: list[FlatUnit],
        group: PeerGroup,
        backend: CollectiveBackend,
        *,
        device: torch.device,
        timeout: float,
        codec: Codec,
        launcher: OrderedLauncher | None,
    ) -> None:
        self.units = units
        self.group = group
        self.backend = backend
        self.device = device
        self.timeout = timeout
        self.codec: Codec = codec
        self.launcher = launcher
        self.step: int | None = None  # the pass's collective step key (``begin``)
        self._prefetching: FlatUnit | None = None
        self._full_bytes_now = 0
        self.peak_full_bytes = 0
        self.stats = PassStats()
        self._device_waits = DeviceWaits()  # this pass's gathers awaited on the device, not yet read

    def begin(self, step: int) -> None:
        """Start a pass whose gathers use step key ``step``, with fresh timings."""
        self.step = step
        self.stats = PassStats()

    def where(self) -> str:
        return f"{self.group.describe()} step={self.step}"

    # -- issuing and waiting -------------------------------------------------------------------------------
    def issue(self, unit: FlatUnit) -> None:
        if self.step is None:
            raise RuntimeError("call begin(step) before running the sharded model")
        out = unit.gather_target()
        self._account(unit.full_bytes)
        group, step, shard, backend = self.group, self.step, unit.shard_for_wire(), self.backend

        def launch() -> Future[torch.Tensor]:
            return backend.all_gather(group, step, unit.index, shard, out, self.timeout, codec=self.codec)

        fut = launch() if self.launcher is None else self.launcher.call(launch)
        self.track(fut)
        unit.future = fut
        self.stats.gathers += 1

    def ensure_ready(self, unit: FlatUnit, *, master: bool = False) -> None:
        """Wait until ``unit`` is gathered (issuing its gather if needed); with ``master`` its parameters
        are the fp32 master values whatever the compute dtype (for reading the model's state)."""
        if master and unit.state is UnitState.READY and unit.gathered_dtype != torch.float32:
            raise RuntimeError(f"{self.where()}: unit {unit.index} is gathered in {unit.gathered_dtype}")
        if unit.state is UnitState.FREE:
            self.issue(unit)
        if unit.state is UnitState.GATHERING:
            assert unit.future is not None
            if master:  # read on the host next: its outcome is needed now
                self.wait(unit.future)
            else:
                self._await_gather(unit.future)
            unit.mark_ready(master=master)
            if self._prefetching is unit:
                self._prefetching = None

    def _await_gather(self, fut: Future[torch.Tensor]) -> None:
        """Before the unit's parameters are used: the compute stream waits for its gather, on the device
        where the lane allows it (read on the host at the end of the pass), else the host waits."""
        if not isinstance(fut, DeviceOrdered):
            self.wait(fut)
            return
        stream = torch.cuda.current_stream(self.device) if self.device.type == "cuda" else None
        t0 = time.perf_counter()
        try:
            if fut.order_after(stream, self.timeout + _WAIT_GRACE_S):
                self._device_waits.watch(fut)
        finally:
            self.stats.wait_s += time.perf_counter() - t0

    def settle_on_device(self) -> None:
        """Read the outcome of the pass's gathers that were awaited on the device (raises the first
        failure: the pass computed on what a failed gather left)."""
        t0 = time.perf_counter()
        try:
            self._device_waits.settle(self.timeout + _WAIT_GRACE_S)
        finally:
            self.stats.wait_s += time.perf_counter() - t0

    def wait(self, fut: Future[torch.Tensor]) -> None:
        t0 = time.perf_counter()
        try:
            fut.result(timeout=self.timeout + _WAIT_GRACE_S)
        except FutureTimeout as exc:
            raise CollectiveTimeout(f"{self.where()}: a collective outlived its timeout") from exc
        finally:
            self.stats.wait_s += time.perf_counter() - t0

    def track(self, fut: Future[torch.Tensor]) -> None:
        """Add ``fut``'s in-flight time to the pass's ``comm_s`` once it is done."""
        t0, stats = time.perf_counter(), self.stats
        fut.add_done_callback(lambda _: setattr(stats, "comm_s", stats.comm_s + time.perf_counter() - t0))

    # -- prefetching ---------------------------------------------------------------------------------------
    def prefetch(self, unit: FlatUnit | None) -> None:
        """Issue `unit`'s gather unless another prefetch is still unconsumed. Decided by the units' states,
        never by whether a future is done: every rank must issue its collectives in the same order (the
        torch.distributed lane runs them in call order), whatever the timing."""
        if unit is None or unit.state is not UnitState.FREE:
            return
        if self._prefetching is not None and self._prefetching.state is UnitState.GATHERING:
            return
        self.issue(unit)
        self._prefetching = unit

    def prefetch_ahead(self, unit: FlatUnit, order: list[int], delta: int) -> None:
        """Prefetch the next unit in ``order``; if it is still gathered (kept for backward), the one
        after it, so big units get a head start."""
        nxt = self._next_in_order(unit, order, delta)
        if nxt is not None and nxt.state is UnitState.READY:
            nxt = self._next_in_order(nxt, order, delta)
        self.prefetch(nxt)

    def _next_in_order(self, unit: FlatUnit, order: list[int], delta: int) -> FlatUnit | None:
        nxt = order.index(unit.index) + delta if unit.index in order else -1
        return self.units[order[nxt]] if 0 <= nxt < len(order) else None

    def forget_prefetch(self) -> None:
        """No prefetch is outstanding any more (every unit has been freed)."""
        self._prefetching = None

    # -- freeing -------------------------------------------------------------------------------------------
    def free(self, unit: FlatUnit) -> None:
        if unit.state is UnitState.GATHERING:
            assert unit.future is not None
            self.wait(unit.future)
            if self._prefetching is unit:
                self._prefetching = None
        if unit.state is not UnitState.FREE:
            unit.free()
            self._account(-unit.full_bytes)

    def _account(self, delta: int) -> None:
        self._full_bytes_now += delta
        self.peak_full_bytes = max(self.peak_full_bytes, self._full_bytes_now)

    def abandon(self) -> None:
        """Forget an unfinished pass's gathers: wait what is in flight (bounded by the timeout), free every
        unit, drop the outcomes awaited on the device."""
        for unit in self.units:
            if unit.state is UnitState.GATHERING and unit.future is not None:
                try:
                    unit.future.result(timeout=self.timeout + _WAIT_GRACE_S)
                except Exception:
                    logger.debug("%s: dropped gather of unit %d", self.where(), unit.index)
                unit.mark_ready()
            if unit.state is not UnitState.FREE:
                self.free(unit)
        self._prefetching = None
        try:
            self._device_waits.settle(self.timeout + _WAIT_GRACE_S)
        except Exception:
            logger.debug("%s: dropped the gathers awaited on the device", self.where())
        self._device_waits = DeviceWaits()
