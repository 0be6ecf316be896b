"""The ZeRO-3 sharded module: hooks that gather a unit's parameters just in time and reduce-scatter its
gradient as soon as it is complete.

Per training pass (``begin(step)``, forward, ``loss.backward()``, ``finish_backward()``):

- forward: before unit k runs, its gather is waited (issued earlier as a prefetch, or now); then the gather
  of the next unit in forward order is issued, or of the one after it when the next one is still
  gathered. One prefetch at a time, decided by the units' states alone, so every rank issues its
  collectives in the same order. After unit k its full parameters are freed, except those of the last
  ``keep_last`` units (default 2), which backward needs first.
- backward: a hook on unit k's outputs fires when their gradient is ready, i.e. just before unit k's
  backward; it waits unit k's gather and prefetches the unit before it (or the one before that, as in
  forward). When every parameter of unit k has its gradient accumulated, the gradient is flattened
  (padded), its reduction is started (``worker.zero3.reductions``) and the full parameters are freed. Only
  ``finish_backward`` waits for the reductions. A gradient shard exists from then to the next ``begin``.
- the root unit (parameters outside every unit) is gathered at the start of the forward pass and reduced at
  the end of backward.
- mixed precision (``param_dtype``, see ``worker.zero3.precision``): gathered parameters are cast to it for
  compute, gradients are converted to fp32 before their reduction, the fp32 shards stay the master copy.
  The caller casts the model's inputs (``precision.cast_input``) and computes the loss in fp32.

On a lane that runs its collectives on device streams (NCCL: the handle's ``order_after``), waiting for a
gather means making the compute stream wait for it on the device: the host goes on queueing kernels while
the next unit is gathered, with one gather in flight ahead. Such a gather's own outcome is read once, on
the host, at the end of the pass (``finish_backward``, or the end of a forward-only pass), where a failure
raises; the pass's results are then not used.

Forward-only passes (``torch.no_grad()``) gather and free the same way and reduce nothing. The collective
step key of a pass is the training step it belongs to; evaluation and state gathering after step ``s`` use
key ``s + 1`` (the parameters are the ones step ``s + 1`` will gather), and a key is never all-gathered
with two different values.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_flatten

from communication.backend import Codec, CollectiveBackend, UnitSpec
from communication.errors import CollectiveTimeout
from communication.group import PeerGroup
from worker.zero3 import precision
from worker.zero3.device_waits import DeviceOrdered, DeviceWaits
from worker.zero3.flat_unit import FlatUnit, UnitState
from worker.zero3.launcher import OrderedLauncher
from worker.zero3.plan import PartitionPlan, plan_model
from worker.zero3.reductions import HostStaging, Reductions
from worker.zero3.staging import StagingPool

logger = logging.getLogger(__name__)

_WAIT_GRACE_S = 5.0  # on top of the collective timeout, before the compute thread gives up on a future
STAGING_BUFFERS = 3  # host staging of accelerator units: two gathers outstanding at most, and one spare


@dataclass
class PassStats:
    """Timings of one pass (reset by ``begin``)."""

    wait_s: float = 0.0  # compute thread blocked on futures
    comm_s: float = 0.0  # summed in-flight time of the pass's collectives
    gathers: int = 0
    reductions: int = 0


class ShardedModule:
    """Wraps ``model`` in place: afterwards each rank holds only its shards; call it like the model."""

    def __init__(
        self,
        model: nn.Module,
        group: PeerGroup,
        backend: CollectiveBackend,
        *,
        device: torch.device | None = None,
        plan: PartitionPlan | None = None,
        timeout: float = 30.0,
        keep_last: int = 2,
        codec: Codec = "none",
        param_dtype: torch.dtype = torch.float32,
        shards: Sequence[torch.Tensor] | None = None,
        host_staging: HostStaging | None = None,
    ) -> None:
        """``shards``: this rank's materialized shard of every unit of ``plan`` (which they require).
        ``host_staging``: how gradients reach a lane that takes host memory (default: pinned buffers and
        CUDA events for CUDA units on such a lane, none otherwise)."""
        if keep_last < 0:
            raise ValueError(f"keep_last must be >= 0, got {keep_last}")
        self.keep_last = keep_last
        self.codec: Codec = codec  # of parameter gathers and gradient reductions (control values: raw)
        self.device = device or torch.device("cpu")
        self.model = model.to(self.device)
        self.group = group
        self.backend = backend
        self.timeout = timeout
        if shards is not None and (plan is None or len(shards) != len(plan.units)):
            raise ValueError("shards need the plan they were cut for, one shard per unit")
        self.plan = plan or plan_model(model, group.world_size)
        if self.plan.world_size != group.world_size:
            raise ValueError(f"plan is for {self.plan.world_size} ranks, group has {group.world_size}")
        params = dict(model.named_parameters())
        modules = dict(model.named_modules())
        missing = set(params) - set(self.plan.param_names())
        if missing:
            raise ValueError(f"parameters outside the plan: {sorted(missing)[:5]}")
        self.units = [
            FlatUnit(
                u,
                [params[s.name] for s in u.params],
                group.rank,
                self.device,
                None if shards is None else shards[u.index],
            )
            for u in self.plan.units
        ]
        self.param_dtype = precision.configure_units(model, self.units, param_dtype)
        self.staging = StagingPool.share(self.units, self.device, STAGING_BUFFERS)
        self.declare_plan()
        comm = self.device if backend.accepts_device(group, self.device) else torch.device("cpu")
        for unit in self.units:  # device-resident where the lane takes device tensors (NCCL on one host)
            unit.comm_device = comm
        staging = host_staging or HostStaging.for_units(self.units, self.device)
        # gradients staged asynchronously are sent by a launcher: then every call goes through it, in order
        self.launcher = OrderedLauncher(timeout) if staging is not None else None
        self.reductions = Reductions(backend, codec, self.launcher, staging)
        self.root: FlatUnit | None = next((u for u in self.units if u.plan.is_root), None)
        self._body = [u for u in self.units if not u.plan.is_root]
        self._order: list[int] = [u.index for u in self._body]  # predicted forward order
        self._seen: list[int] = []  # this pass's forward order
        self._step: int | None = None
        self._prefetching: FlatUnit | None = None
        self._callback_queued = False
        self._full_bytes_now = 0
        self.peak_full_bytes = 0
        self.stats = PassStats()
        self._device_waits = DeviceWaits()  # this pass's gathers awaited on the device, not yet read
        self._handles: list[Any] = []
        self._handles.append(model.register_forward_pre_hook(self._root_pre_forward))
        self._handles.append(model.register_forward_hook(self._root_post_forward))
        for unit in self._body:
            module = modules[unit.plan.module]
            self._handles.append(module.register_forward_pre_hook(self._unit_hook(self._pre_forward, unit)))
            self._handles.append(module.register_forward_hook(self._unit_hook(self._post_forward, unit)))
        for unit in self.units:
            for i, p in enumerate(unit.params):
                self._handles.append(p.register_post_accumulate_grad_hook(self._grad_hook(unit, i)))
        logger.info("%s: sharded %s", group.describe(), self.plan.describe())

    # -- public API ----------------------------------------------------------------------------------------
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.model(*args, **kwargs)

    def wire_plan(self) -> dict[int, UnitSpec]:
        """Unit id -> spec of every unit this engine gathers and reduces, in its codec (control values are off
        the plan: they travel on the exact exchange)."""
        return {u.index: UnitSpec(u.plan.shard_numel, self.codec) for u in self.units}

    def declare_plan(self) -> None:
        """Tell the backend this epoch's plan, so peers' messages are checked against it (called once the
        model is partitioned; call again after a re-partition)."""
        self.backend.set_plan(self.group, self.wire_plan())

    @property
    def shards(self) -> list[torch.Tensor]:
        return [u.shard for u in self.units]

    @property
    def grad_shards(self) -> list[torch.Tensor]:
        """The reduced gradient shards, from ``finish_backward`` until the next ``begin``."""
        return [u.grad_shard for u in self.units]

    def begin(self, step: int) -> None:
        """Start a pass whose collectives use step key ``step``; drops the leftovers of an aborted pass."""
        self._abandon()
        self._step = step
        self.stats = PassStats()
        for u in self.units:
            u.reset_pass()
            u.release_grad()

    def finish_backward(self) -> None:
        """Wait for every unit's gradient reduction; ``grad_shards`` then hold the rank-order sums."""
        if any(not u.reduced for u in self.units):
            missing = [u.index for u in self.units if not u.reduced]
            raise RuntimeError(f"{self._where()}: backward did not reduce units {missing}")
        self.stats.reductions += self.reductions.finish(self._wait)
        self._settle_on_device()

    def finite(self) -> bool | torch.Tensor:
        """Whether every gradient of this pass was finite (zeros were reduced instead of one that was not):
        on an accelerator a 0-d bool tensor on its device, not read here, so the step reads it with its
        loss and norm in one host synchronisation (``worker.commit.vote_values``)."""
        return self.reductions.finite()

    @property
    def staging_overflows(self) -> int:
        """Host staging buffers handed out beyond the pools (synchronous pageable copies), so far."""
        pools = [self.staging, self.reductions.staging.pool if self.reductions.staging else None]
        return sum(p.overflows for p in pools if p is not None)

    def close(self) -> None:
        self._abandon()
        if self.launcher is not None:
            self.launcher.close()
        for h in self._handles:
            h.remove()
        self._handles.clear()

    # -- gathering -----------------------------------------------------------------------------------------
    def _where(self) -> str:
        return f"{self.group.describe()} step={self._step}"

    def _issue(self, unit: FlatUnit) -> None:
        if self._step is None:
            raise RuntimeError("call begin(step) before running the sharded model")
        out = unit.gather_target()
        self._account(unit.full_bytes)
        group, step, shard, backend = self.group, self._step, unit.shard_for_wire(), self.backend

        def launch() -> Future[torch.Tensor]:
            return backend.all_gather(group, step, unit.index, shard, out, self.timeout, codec=self.codec)

        fut = launch() if self.launcher is None else self.launcher.call(launch)
        self._track(fut)
        unit.future = fut
        self.stats.gathers += 1

    def _ensure_ready(self, unit: FlatUnit, *, master: bool = False) -> None:
        """Wait until ``unit`` is gathered (issuing its gather if needed); with ``master`` its parameters
        are the fp32 master values whatever the compute dtype (for reading the model's state)."""
        if master and unit.state is UnitState.READY and unit.gathered_dtype != torch.float32:
            raise RuntimeError(f"{self._where()}: unit {unit.index} is gathered in {unit.gathered_dtype}")
        if unit.state is UnitState.FREE:
            self._issue(unit)
        if unit.state is UnitState.GATHERING:
            assert unit.future is not None
            if master:  # read on the host next: its outcome is needed now
                self._wait(unit.future)
            else:
                self._await_gather(unit.future)
            unit.mark_ready(master=master)
            if self._prefetching is unit:
                self._prefetching = None

    def _await_gather(self, fut: Future[torch.Tensor]) -> None:
        """Before the unit's parameters are used: the compute stream waits for its gather, on the device
        where the lane allows it (read on the host at the end of the pass), else the host waits."""
        if not isinstance(fut, DeviceOrdered):
            self._wait(fut)
            return
        stream = torch.cuda.current_stream(self.device) if self.device.type == "cuda" else None
        t0 = time.perf_counter()
        try:
            if fut.order_after(stream, self.timeout + _WAIT_GRACE_S):
                self._device_waits.watch(fut)
        finally:
            self.stats.wait_s += time.perf_counter() - t0

    def _settle_on_device(self) -> None:
        """Read the outcome of the pass's gathers that were awaited on the device (raises the first
        failure: the pass computed on what a failed gather left)."""
        t0 = time.perf_counter()
        try:
            self._device_waits.settle(self.timeout + _WAIT_GRACE_S)
        finally:
            self.stats.wait_s += time.perf_counter() - t0

    def _prefetch(self, unit: FlatUnit | None) -> None:
        """Issue `unit`'s gather unless another prefetch is still unconsumed. Decided by the units' states,
        never by whether a future is done: every rank must issue its collectives in the same order (the
        torch.distributed lane runs them in call order), whatever the timing."""
        if unit is None or unit.state is not UnitState.FREE:
            return
        if self._prefetching is not None and self._prefetching.state is UnitState.GATHERING:
            return
        self._issue(unit)
        self._prefetching = unit

    def _prefetch_ahead(self, unit: FlatUnit, order: list[int], delta: int) -> None:
        """Prefetch the next unit in ``order``; if it is still gathered (kept for backward), the one
        after it, so big units get a head start."""
        nxt = self._next_in_order(unit, order, delta)
        if nxt is not None and nxt.state is UnitState.READY:
            nxt = self._next_in_order(nxt, order, delta)
        self._prefetch(nxt)

    def _free(self, unit: FlatUnit) -> None:
        if unit.state is UnitState.GATHERING:
            assert unit.future is not None
            self._wait(unit.future)
            if self._prefetching is unit:
                self._prefetching = None
        if unit.state is not UnitState.FREE:
            unit.free()
            self._account(-unit.full_bytes)

    def _account(self, delta: int) -> None:
        self._full_bytes_now += delta
        self.peak_full_bytes = max(self.peak_full_bytes, self._full_bytes_now)

    def _wait(self, fut: Future[torch.Tensor]) -> None:
        t0 = time.perf_counter()
        try:
            fut.result(timeout=self.timeout + _WAIT_GRACE_S)
        except FutureTimeout as exc:
            raise CollectiveTimeout(f"{self._where()}: a collective outlived its timeout") from exc
        finally:
            self.stats.wait_s += time.perf_counter() - t0

    def _track(self, fut: Future[torch.Tensor]) -> None:
        t0, stats = time.perf_counter(), self.stats
        fut.add_done_callback(lambda _: setattr(stats, "comm_s", stats.comm_s + time.perf_counter() - t0))

    def _abandon(self) -> None:
        """Forget an unfinished pass: drop calls not started, wait what is in flight (bounded by the
        timeout), free everything."""
        if self.launcher is not None:
            self.launcher.drop_queued(self._where())
        for unit in self.units:
            if unit.state is UnitState.GATHERING and unit.future is not None:
                try:
                    unit.future.result(timeout=self.timeout + _WAIT_GRACE_S)
                except Exception:
                    logger.debug("%s: dropped gather of unit %d", self._where(), unit.index)
                unit.mark_ready()
            if unit.state is not UnitState.FREE:
                self._free(unit)
            for p in unit.params:
                p.grad = None
        self._prefetching = None
        try:
            self._device_waits.settle(self.timeout + _WAIT_GRACE_S)
        except Exception:
            logger.debug("%s: dropped the gathers awaited on the device", self._where())
        self._device_waits = DeviceWaits()
        self.reductions.reset()
        self._callback_queued = False

    # -- hooks ---------------------------------------------------------------------------------------------
    @staticmethod
    def _unit_hook(fn: Callable[..., Any], unit: FlatUnit) -> Callable[..., Any]:
        def hook(module: nn.Module, *args: Any) -> Any:
            return fn(unit, *args)

        return hook

    def _next_in_order(self, unit: FlatUnit, order: list[int], delta: int) -> FlatUnit | None:
        nxt = order.index(unit.index) + delta if unit.index in order else -1
        return self.units[order[nxt]] if 0 <= nxt < len(order) else None

    def _root_pre_forward(self, module: nn.Module, args: Any) -> None:
        self._seen = []
        self._callback_queued = False
        if self.root is not None:
            self._ensure_ready(self.root)
        if self._order:
            self._prefetch(self.units[self._order[0]])

    def _root_post_forward(self, module: nn.Module, args: Any, output: Any) -> None:
        if self._seen:
            self._order = list(self._seen)
        if not torch.is_grad_enabled():
            for unit in self.units:
                self._free(unit)
            self._settle_on_device()  # a forward-only pass's outputs are read next
        elif self.root is not None:
            self._register_pre_backward(self.root, output)

    def _pre_forward(self, unit: FlatUnit, args: Any) -> None:
        if unit.index in self._seen:
            raise RuntimeError(f"unit {unit.plan.module!r} ran twice in one forward pass; it must run once")
        self._seen.append(unit.index)
        self._ensure_ready(unit)
        self._prefetch_ahead(unit, self._order, +1)

    def _post_forward(self, unit: FlatUnit, args: Any, output: Any) -> None:
        if torch.is_grad_enabled() and self._register_pre_backward(unit, output):
            if unit.index in self._order[-self.keep_last :]:
                return  # backward starts with the last units: keep them gathered
        self._free(unit)

    def _register_pre_backward(self, unit: FlatUnit, output: Any) -> bool:
        tensors = [t for t in tree_flatten(output)[0] if isinstance(t, torch.Tensor) and t.requires_grad]
        for t in tensors:
            t.register_hook(self._pre_backward_hook(unit))
        return bool(tensors)

    def _pre_backward_hook(self, unit: FlatUnit) -> Callable[[torch.Tensor], None]:
        def hook(grad: torch.Tensor) -> None:
            if unit.backward_started:
                return
            unit.backward_started = True
            self.reductions.release_done()  # on the training thread (the memory bench tracks it)
            if not self._callback_queued:
                self._callback_queued = True
                torch.autograd.Variable._execution_engine.queue_callback(self._post_backward)
            self._ensure_ready(unit)
            unit.prepare_grad()
            if not unit.plan.is_root:
                self._prefetch_ahead(unit, self._seen, -1)

        return hook

    def _grad_hook(self, unit: FlatUnit, i: int) -> Callable[[torch.Tensor], None]:
        def hook(param: torch.Tensor) -> None:
            self.reductions.release_done()
            unit.take_param_grad(i)
            unit.grads_done += 1
            if unit.grads_done == len(unit.params):
                self._reduce(unit)

        return hook

    def _reduce(self, unit: FlatUnit) -> None:
        if unit.reduced:
            raise RuntimeError(f"{self._where()}: unit {unit.index} reduced twice in one pass")
        assert self._step is not None
        self.reductions.release_done()
        if self.launcher is not None:
            self.launcher.timeout = self.timeout
        self.reductions.start(self.group, self._step, unit, self.timeout, self._track)
        unit.reduced = True
        self._free(unit)

    def _post_backward(self) -> None:
        """End of backward: reduce units whose gradients never completed (unused parameters count as zero),
        settle any unused prefetch, free everything."""
        for unit in self.units:
            if not unit.reduced:
                self._reduce(unit)
        for unit in self.units:
            self._free(unit)
        self._prefetching = None
        self._callback_queued = False
