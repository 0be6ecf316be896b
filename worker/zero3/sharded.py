"""The ZeRO-3 sharded module: hooks that gather a unit's parameters just in time and reduce-scatter its
gradient as soon as it is complete.

Per training pass (``begin(step)``, forward, ``loss.backward()``, ``finish_backward()``):

- forward: before unit k runs, its gather is waited (issued earlier as a prefetch, or now); then the gather
  of the next unit in forward order is issued, or of the one after it when the next one is still
  gathered (the prefetch, ``worker.zero3.gathers``). After unit k its full parameters are freed, except
  those of the last ``keep_last`` units (default 2), which backward needs first.
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

Issuing, waiting (on the host, or on the device where the lane allows it), prefetching, freeing and timing
the gathers is ``worker.zero3.gathers``'s (``Gathers``); the gathers awaited on the device are read at the
end of the pass (``finish_backward``, or the end of a forward-only pass).

Forward-only passes (``torch.no_grad()``) gather and free the same way and reduce nothing. The collective
step key of a pass is the training step it belongs to; evaluation and state gathering after step ``s`` use
key ``s + 1`` (the parameters are the ones step ``s + 1`` will gather), and a key is never all-gathered
with two different values.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_flatten

from communication.backend import Codec, CollectiveBackend, UnitSpec
from communication.group import PeerGroup
from worker.zero3 import precision
from worker.zero3.flat_unit import FlatUnit
from worker.zero3.gathers import Gathers, PassStats
from worker.zero3.launcher import OrderedLauncher
from worker.zero3.plan import PartitionPlan, plan_model
from worker.zero3.reductions import HostStaging, Reductions
from worker.zero3.staging import StagingPool

logger = logging.getLogger(__name__)

STAGING_BUFFERS = 3  # host staging of accelerator units: two gathers outstanding at most, and one spare


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
        self.gathers = Gathers(
            self.units,
            group,
            backend,
            device=self.device,
            timeout=timeout,
            codec=codec,
            launcher=self.launcher,
        )
        self.reductions = Reductions(backend, codec, self.launcher, staging)
        self.root: FlatUnit | None = next((u for u in self.units if u.plan.is_root), None)
        self._body = [u for u in self.units if not u.plan.is_root]
        self._order: list[int] = [u.index for u in self._body]  # predicted forward order
        self._seen: list[int] = []  # this pass's forward order
        self._callback_queued = False
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

    @property
    def timeout(self) -> float:
        """The collective timeout (the trainer lowers it from the start-up one after the first step)."""
        return self.gathers.timeout

    @timeout.setter
    def timeout(self, value: float) -> None:
        self.gathers.timeout = value

    @property
    def stats(self) -> PassStats:
        """This pass's timings and counts (reset by ``begin``)."""
        return self.gathers.stats

    @property
    def peak_full_bytes(self) -> int:
        """The most bytes of gathered parameters held at once, so far."""
        return self.gathers.peak_full_bytes

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
        self.gathers.begin(step)
        for u in self.units:
            u.reset_pass()
            u.release_grad()

    def finish_backward(self) -> None:
        """Wait for every unit's gradient reduction; ``grad_shards`` then hold the rank-order sums."""
        if any(not u.reduced for u in self.units):
            missing = [u.index for u in self.units if not u.reduced]
            raise RuntimeError(f"{self.gathers.where()}: backward did not reduce units {missing}")
        self.stats.reductions += self.reductions.finish(self.gathers.wait)
        self.gathers.settle_on_device()

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

    # -- gathers read by the engine's whole-model helpers (worker.zero3.state, worker.handover) -------------
    def _ensure_ready(self, unit: FlatUnit, *, master: bool = False) -> None:
        """Wait until ``unit`` is gathered (``Gathers.ensure_ready``)."""
        self.gathers.ensure_ready(unit, master=master)

    def _free(self, unit: FlatUnit) -> None:
        self.gathers.free(unit)

    def _wait(self, fut: Future[torch.Tensor]) -> None:
        self.gathers.wait(fut)

    def _abandon(self) -> None:
        """Forget an unfinished pass: drop calls not started, wait what is in flight (bounded by the
        timeout), free everything."""
        if self.launcher is not None:
            self.launcher.drop_queued(self.gathers.where())
        self.gathers.abandon()
        for unit in self.units:
            for p in unit.params:
                p.grad = None
        self.reductions.reset()
        self._callback_queued = False

    # -- hooks ---------------------------------------------------------------------------------------------
    @staticmethod
    def _unit_hook(fn: Callable[..., Any], unit: FlatUnit) -> Callable[..., Any]:
        def hook(module: nn.Module, *args: Any) -> Any:
            return fn(unit, *args)

        return hook

    def _root_pre_forward(self, module: nn.Module, args: Any) -> None:
        self._seen = []
        self._callback_queued = False
        if self.root is not None:
            self.gathers.ensure_ready(self.root)
        if self._order:
            self.gathers.prefetch(self.units[self._order[0]])

    def _root_post_forward(self, module: nn.Module, args: Any, output: Any) -> None:
        if self._seen:
            self._order = list(self._seen)
        if not torch.is_grad_enabled():
            for unit in self.units:
                self.gathers.free(unit)
            self.gathers.settle_on_device()  # a forward-only pass's outputs are read next
        elif self.root is not None:
            self._register_pre_backward(self.root, output)

    def _pre_forward(self, unit: FlatUnit, args: Any) -> None:
        if unit.index in self._seen:
            raise RuntimeError(f"unit {unit.plan.module!r} ran twice in one forward pass; it must run once")
        self._seen.append(unit.index)
        self.gathers.ensure_ready(unit)
        self.gathers.prefetch_ahead(unit, self._order, +1)

    def _post_forward(self, unit: FlatUnit, args: Any, output: Any) -> None:
        if torch.is_grad_enabled() and self._register_pre_backward(unit, output):
            if unit.index in self._order[-self.keep_last :]:
                return  # backward starts with the last units: keep them gathered
        self.gathers.free(unit)

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
            self.gathers.ensure_ready(unit)
            unit.prepare_grad()
            if not unit.plan.is_root:
                self.gathers.prefetch_ahead(unit, self._seen, -1)

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
            raise RuntimeError(f"{self.gathers.where()}: unit {unit.index} reduced twice in one pass")
        step = self.gathers.step
        assert step is not None
        self.reductions.release_done()
        if self.launcher is not None:
            self.launcher.timeout = self.timeout
        self.reductions.start(self.group, step, unit, self.timeout, self.gathers.track)
        unit.reduced = True
        self.gathers.free(unit)

    def _post_backward(self) -> None:
        """End of backward: reduce units whose gradients never completed (unused parameters count as zero),
        settle any unused prefetch, free everything."""
        for unit in self.units:
            if not unit.reduced:
                self._reduce(unit)
        for unit in self.units:
            self.gathers.free(unit)
        self.gathers.forget_prefetch()
        self._callback_queued = False
