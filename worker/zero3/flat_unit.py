"""One ZeRO-3 unit's tensors on one rank: its fp32 shard, gradient shard, and the full flat buffer whose
views are the module's parameters while the unit is gathered.

The module keeps its own ``nn.Parameter`` objects (so hooks, autograd and the plain state-dict names keep
working). Gathering writes a fresh flat buffer and points each parameter's ``.data`` at its view of it;
freeing points them at an empty tensor and drops the buffer. Autograd saves the parameter objects
themselves, so a backward pass sees whatever buffer is gathered at that time (``.data`` assignment keeps a
tensor's version counter). A parameter read while its unit is free has no elements and fails loudly.
"""

from __future__ import annotations

import enum
from concurrent.futures import Future

import torch
from torch import nn

from worker.zero3.plan import UnitPlan


class UnitState(enum.Enum):
    FREE = "free"
    GATHERING = "gathering"
    READY = "ready"


class FlatUnit:
    """Shard + gradient shard of one unit on one rank, and its full parameters while gathered."""

    def __init__(self, plan: UnitPlan, params: list[nn.Parameter], rank: int, device: torch.device) -> None:
        if len(params) != len(plan.params):
            raise ValueError(f"unit {plan.index}: {len(params)} parameters, plan has {len(plan.params)}")
        self.plan = plan
        self.index = plan.index
        self.params = params
        self.device = device
        self.comm_device = torch.device("cpu")
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
        self.grad_shard = torch.zeros(plan.shard_numel, dtype=torch.float32, device=device)
        self.full: torch.Tensor | None = None
        self._empty = torch.empty(0, dtype=torch.float32, device=device)
        # CPU staging for the wire when the parameters live on an accelerator.
        self._staging: torch.Tensor | None = None
        if device.type != "cpu":
            self._staging = torch.empty(plan.padded_numel, dtype=torch.float32, pin_memory=True)
        self.state = UnitState.FREE
        self.future: Future[torch.Tensor] | None = None
        # Per-pass bookkeeping (reset by the engine).
        self.grads_done = 0
        self.backward_started = False
        self.reduced = False
        self._grad_flat: torch.Tensor | None = None  # set by prepare_grad() for one backward pass
        self._point_params(None)

    @property
    def full_bytes(self) -> int:
        return self.plan.padded_numel * 4

    # -- gather / free -------------------------------------------------------------------------------------
    def gather_target(self) -> torch.Tensor:
        """Allocate the full buffer and return where the wire should write it."""
        assert self.state is UnitState.FREE, f"unit {self.index} is {self.state.value}"
        self.full = torch.empty(self.plan.padded_numel, dtype=torch.float32, device=self.device)
        self.state = UnitState.GATHERING
        return self.full if self._staging is None else self._staging

    def shard_for_wire(self) -> torch.Tensor:
        return self.shard if self.shard.device.type == "cpu" else self.shard.detach().cpu()

    def mark_ready(self) -> None:
        assert self.state is UnitState.GATHERING and self.full is not None
        if self._staging is not None:
            self.full.copy_(self._staging)
        self.future = None
        self._point_params(self.full)
        self.state = UnitState.READY

    def free(self) -> None:
        """Release the full parameters (the caller has waited any gather in flight)."""
        self.future = None
        self._point_params(None)
        self.full = None
        self.state = UnitState.FREE

    def _point_params(self, full: torch.Tensor | None) -> None:
        for slot, p in zip(self.plan.params, self.params, strict=True):
            p.data = (
                self._empty if full is None else full[slot.offset : slot.offset + slot.numel].view(slot.shape)
            )

    # -- gradients -----------------------------------------------------------------------------------------
    def prepare_grad(self) -> None:
        """Before the unit's backward (parameters on the wire's device, no gradients yet): point every
        parameter's ``.grad`` at its view of a zeroed flat buffer, so autograd accumulates into the buffer
        the wire sends (0 + g == g exactly) and the unit's gradient is never held twice."""
        if self.device != self.comm_device or self._grad_flat is not None:
            return
        if any(p.grad is not None for p in self.params):
            return
        flat = torch.zeros(self.plan.padded_numel, dtype=torch.float32, device=self.comm_device)
        for slot, p in zip(self.plan.params, self.params, strict=True):
            p.grad = flat[slot.offset : slot.offset + slot.numel].view(slot.shape)
        self._grad_flat = flat

    def flat_grad(self) -> torch.Tensor:
        """This rank's gradient of the unit as a padded flat fp32 buffer on the wire's device (missing
        gradients count as zero); clears the parameters' ``.grad``."""
        flat, self._grad_flat = self._grad_flat, None
        if flat is None:
            flat = torch.empty(self.plan.padded_numel, dtype=torch.float32, device=self.comm_device)
            flat[self.plan.numel :].zero_()
        for slot, p in zip(self.plan.params, self.params, strict=True):
            part = flat[slot.offset : slot.offset + slot.numel]
            if p.grad is None:
                part.zero_()
            elif p.grad.data_ptr() != part.data_ptr():  # not accumulated into the buffer: copy it
                part.copy_(p.grad.reshape(-1))
            p.grad = None
        return flat

    def grad_target(self) -> torch.Tensor:
        return (
            self.grad_shard if self.device.type == "cpu" else torch.empty_like(self.grad_shard, device="cpu")
        )

    def reset_pass(self) -> None:
        self._grad_flat = None
        self.grads_done = 0
        self.backward_started = False
        self.reduced = False
