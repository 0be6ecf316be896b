"""One ZeRO-3 unit's tensors on one rank: its fp32 shard, gradient shard (from the unit's reduction until
the next pass), and the full flat buffer whose views are the module's parameters while the unit is gathered.

The module keeps its own ``nn.Parameter`` objects (so hooks, autograd and the plain state-dict names keep
working). Gathering writes a fresh flat buffer and points each parameter's ``.data`` at its view of it;
freeing points them at an empty tensor and drops the buffer. Autograd saves the parameter objects
themselves, so a backward pass sees whatever buffer is gathered at that time (``.data`` assignment keeps a
tensor's version counter). A parameter read while its unit is free has no elements and fails loudly.

Mixed precision (``set_param_dtype``, policy in ``worker.zero3.precision``): the wire still fills an fp32
buffer; ``mark_ready`` casts it to the compute dtype (parameters of normalization layers get fp32 copies of
their slices) and drops the fp32 one. Gradients are then moved into one flat buffer of the compute dtype,
which ``flat_grad`` converts to fp32 for the reduction.
"""

from __future__ import annotations

import enum
from concurrent.futures import Future

import torch
from torch import nn

from worker.zero3.plan import UnitPlan
from worker.zero3.staging import Fence, StagingPool, cuda_fence


class UnitState(enum.Enum):
    FREE = "free"
    GATHERING = "gathering"
    READY = "ready"


class FlatUnit:
    """Shard + gradient shard of one unit on one rank, and its full parameters while gathered."""

    # Compute precision of the gathered parameters (see set_param_dtype); fp32 unless the engine says.
    param_dtype: torch.dtype = torch.float32
    _keep_fp32: frozenset[int] = frozenset()  # slots whose parameters stay fp32 under a reduced dtype
    _kept: dict[int, torch.Tensor] = {}  # their fp32 copies while gathered (never mutated in place)
    # Host staging of gathers for units on an accelerator, shared by the engine's units (set by the engine;
    # without one, a gather stages through a fresh pageable buffer).
    staging_pool: StagingPool | None = None

    def __init__(
        self,
        plan: UnitPlan,
        params: list[nn.Parameter],
        rank: int,
        device: torch.device,
        shard: torch.Tensor | None = None,
    ) -> None:
        """``shard``: this rank's fp32 shard, already materialized (``worker.zero3.materialize``); the
        parameters' own values are then not read. Without it, the shard is cut from the parameters."""
        if len(params) != len(plan.params):
            raise ValueError(f"unit {plan.index}: {len(params)} parameters, plan has {len(plan.params)}")
        self.plan = plan
        self.index = plan.index
        self.params = params
        self.device = device
        self.comm_device = torch.device("cpu")
        self._wire_copy: tuple[tuple[int, int], torch.Tensor] | None = (
            None  # ((shard id, version), host copy)
        )
        if shard is not None:
            if shard.dtype != torch.float32 or tuple(shard.shape) != (plan.shard_numel,):
                raise ValueError(
                    f"unit {plan.index}: shard is {shard.dtype} {tuple(shard.shape)}, "
                    f"expected torch.float32 ({plan.shard_numel},)"
                )
            self.shard = shard.to(device)
        else:
            full = torch.zeros(plan.padded_numel, dtype=torch.float32, device=device)
            with torch.no_grad():
                for slot, p in zip(plan.params, params, strict=True):
                    if tuple(p.shape) != slot.shape:
                        raise ValueError(
                            f"parameter {slot.name} has shape {tuple(p.shape)}, plan says {slot.shape}"
                        )
                    full[slot.offset : slot.offset + slot.numel].copy_(p.detach().reshape(-1))
            start, stop = plan.shard_range(rank)
            self.shard = full[start:stop].clone()
        self.full: torch.Tensor | None = None
        self._empty = torch.empty(0, dtype=torch.float32, device=device)
        # The reduced gradient shard: allocated when the unit's reduction is issued, dropped by
        # ``release_grad`` (the next pass), so a pass holds only the shards reduced so far.
        self.grad_shard = self._empty
        self._staging: torch.Tensor | None = None  # host buffer of a gather in flight (accelerator units)
        self.state = UnitState.FREE
        self.future: Future[torch.Tensor] | None = None
        # Per-pass bookkeeping (reset by the engine).
        self.grads_done = 0
        self.backward_started = False
        self.reduced = False
        self._grad_flat: torch.Tensor | None = None  # set by prepare_grad() for one backward pass
        self._grad_in_flat: list[bool] = []  # which parameters' gradients take_param_grad moved into it
        self._point_params(None)

    @property
    def full_bytes(self) -> int:
        return self.plan.padded_numel * 4

    # -- precision -----------------------------------------------------------------------------------------
    def set_param_dtype(self, dtype: torch.dtype, keep_fp32: frozenset[int] = frozenset()) -> None:
        """Compute in ``dtype`` while gathered, except the parameters of slots ``keep_fp32`` (unit free)."""
        if self.state is not UnitState.FREE:
            raise RuntimeError(f"unit {self.index}: change param_dtype only while the unit is free")
        if not dtype.is_floating_point:
            raise ValueError(f"param_dtype must be a floating dtype, got {dtype}")
        bad = sorted(i for i in keep_fp32 if not 0 <= i < len(self.params))
        if bad:
            raise ValueError(f"unit {self.index}: no parameter slots {bad}")
        self.param_dtype = dtype
        self._keep_fp32 = frozenset(keep_fp32) if dtype != torch.float32 else frozenset()

    # -- gather / free -------------------------------------------------------------------------------------
    def gather_target(self) -> torch.Tensor:
        """Claim the buffer the wire should write the unit's fp32 parameters into."""
        assert self.state is UnitState.FREE, f"unit {self.index} is {self.state.value}"
        self.state = UnitState.GATHERING
        if self.device.type != self.comm_device.type:
            n = self.plan.padded_numel
            pool = self.staging_pool
            self._staging = torch.empty(n, dtype=torch.float32) if pool is None else pool.acquire(n)
            return self._staging
        self.full = torch.empty(self.plan.padded_numel, dtype=torch.float32, device=self.device)
        return self.full

    def shard_for_wire(self) -> torch.Tensor:
        """The shard as the wire sends it: itself where the lane takes its device, else a host copy made once
        per change of the shard (the optimizer's step, a restore), not once per gather: a unit is gathered
        in forward and again in backward, and every host copy of a device tensor waits for the device."""
        if self.shard.device.type == self.comm_device.type:
            return self.shard
        key = (id(self.shard), self.shard._version)
        if self._wire_copy is None or self._wire_copy[0] != key:
            self._wire_copy = (key, self.shard.detach().to("cpu", copy=True))
        return self._wire_copy[1]

    def mark_ready(self, *, master: bool = False) -> None:
        """The gather has landed: point the parameters at it, in ``param_dtype`` (fp32 if ``master``)."""
        assert self.state is UnitState.GATHERING
        src = self._staging if self._staging is not None else self.full
        assert src is not None
        dtype = torch.float32 if master else self.param_dtype
        # from pinned host memory the copies are asynchronous, ordered before the kernels that use them
        nonblocking = self.device.type == "cuda" and src.device.type == "cpu" and src.is_pinned()
        if src.device == self.device and src.dtype == dtype:
            full = src  # fp32 compute on the wire's device: the wire wrote the parameters in place
        else:
            full = torch.empty(self.plan.padded_numel, dtype=dtype, device=self.device)
            full.copy_(src, non_blocking=nonblocking)
        kept: dict[int, torch.Tensor] = {}
        if dtype != torch.float32:
            for i in self._keep_fp32:
                slot = self.plan.params[i]
                part = src[slot.offset : slot.offset + slot.numel].view(slot.shape)
                kept[i] = part.to(self.device, copy=True, non_blocking=nonblocking)
        fence = None
        if nonblocking:  # the staging buffer is lent again only once the copies out of it are done
            fence = cuda_fence(self.device)
        self._release_staging(fence)
        self.full = full
        self._kept = kept
        self.future = None
        self._point_params(self.full)
        self.state = UnitState.READY

    @property
    def gathered_dtype(self) -> torch.dtype | None:
        """The dtype of the gathered full buffer (None unless ready)."""
        return self.full.dtype if self.state is UnitState.READY and self.full is not None else None

    def free(self) -> None:
        """Release the full parameters (the caller has waited any gather in flight)."""
        self._release_staging()
        self.future = None
        self._point_params(None)
        self.full = None
        self._kept = {}
        self.state = UnitState.FREE

    def _release_staging(self, fence: Fence | None = None) -> None:
        """Give the gather's host buffer back (with the ``fence`` of a device copy still reading it); one
        the wire may still write (a gather abandoned in flight) never returns to the pool."""
        staging, self._staging = self._staging, None
        if staging is not None and self.staging_pool is not None:
            done = self.future is None or self.future.done()
            self.staging_pool.release(staging, reusable=done, fence=fence)

    def _point_params(self, full: torch.Tensor | None) -> None:
        for i, (slot, p) in enumerate(zip(self.plan.params, self.params, strict=True)):
            if full is None:
                p.data = self._empty
            elif i in self._kept:
                p.data = self._kept[i]
            else:
                p.data = full[slot.offset : slot.offset + slot.numel].view(slot.shape)

    # -- gradients -----------------------------------------------------------------------------------------
    def prepare_grad(self) -> None:
        """Before the unit's backward: one flat buffer in the compute dtype on the compute device that
        ``take_param_grad`` copies each parameter's gradient into as soon as autograd accumulated it (so a
        parameter's own gradient lives only until then, and the unit's gradient is never held twice).
        Parameters kept fp32 under a reduced dtype keep their own gradients, copied in by ``flat_grad``."""
        if self._grad_flat is not None:
            return
        dtype = self.gathered_dtype or self.param_dtype
        flat = torch.empty(self.plan.padded_numel, dtype=dtype, device=self.device)
        flat[self.plan.numel :].zero_()
        self._grad_flat = flat
        self._grad_in_flat = [False] * len(self.params)

    def take_param_grad(self, i: int) -> None:
        """Parameter ``i``'s gradient is accumulated: move it into the flat buffer (if prepared and of its
        dtype) and drop the parameter's own."""
        flat, p = self._grad_flat, self.params[i]
        if flat is None or p.grad is None or p.grad.dtype != flat.dtype or i in self._kept:
            return
        slot = self.plan.params[i]
        flat[slot.offset : slot.offset + slot.numel].copy_(p.grad.reshape(-1))
        p.grad = None
        self._grad_in_flat[i] = True

    def flat_grad(self) -> torch.Tensor:
        """This rank's gradient of the unit as a padded flat fp32 buffer on the unit's device (missing
        gradients count as zero); clears the parameters' ``.grad``. A buffer of another dtype is converted
        as a whole and dropped."""
        flat, self._grad_flat = self._grad_flat, None
        in_flat = self._grad_in_flat if flat is not None else [False] * len(self.params)
        if flat is None:
            full = torch.empty(self.plan.padded_numel, dtype=torch.float32, device=self.device)
            full[self.plan.numel :].zero_()
        else:
            full = flat.float()  # the buffer itself when it is fp32 already
        del flat
        for i, (slot, p) in enumerate(zip(self.plan.params, self.params, strict=True)):
            if not in_flat[i]:
                part = full[slot.offset : slot.offset + slot.numel]
                if p.grad is None:
                    part.zero_()
                else:  # not moved into the buffer: copy it
                    part.copy_(p.grad.reshape(-1))
            p.grad = None
        return full

    def grad_target(self) -> torch.Tensor:
        """A fresh fp32 buffer the wire writes this rank's reduced shard into: the gradient shard itself
        when the wire works on the unit's device, else a host buffer (pinned for CUDA) that ``take_grad``
        moves there."""
        staged = self.comm_device.type != self.device.type
        pin = staged and self.device.type == "cuda"
        n = self.plan.shard_numel
        target = torch.empty(n, dtype=torch.float32, device=self.comm_device, pin_memory=pin)
        if not staged:
            self.grad_shard = target
        return target

    def take_grad(self, target: torch.Tensor) -> None:
        """The reduction into ``target`` (from ``grad_target``) is complete: it is the gradient shard (from
        pinned memory the copy is asynchronous, ordered before the optimizer's kernels)."""
        if target is not self.grad_shard:
            self.grad_shard = target.to(self.device, non_blocking=target.is_pinned())

    def release_grad(self) -> None:
        """Drop the gradient shard (consumed by the optimizer step of the pass that reduced it)."""
        self.grad_shard = self._empty

    def reset_pass(self) -> None:
        self._grad_flat = None
        self.grads_done = 0
        self.backward_started = False
        self.reduced = False
