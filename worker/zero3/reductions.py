"""The gradient reductions of one training pass: from a unit's complete gradient to its reduced shard.

For each unit, once autograd has produced every gradient of it (``start``):

1. The unit's gradient becomes one padded flat fp32 buffer on the unit's device (``FlatUnit.flat_grad``).
2. It is checked for NaN and infinities and, if any, zeroed: a non-finite gradient is never sent, and the
   step's vote skips the step on every rank (``worker.commit``). On the host the check answers at once. On
   an accelerator it stays on the device (a flag tensor, and a masked fill that the stream orders before
   the send), so backward never waits for the device; ``finite`` hands the pass's flag over as a device
   tensor, which the step reads with its loss and norm in its one host synchronisation.
3. Where the lane takes the device's tensors (CPU, NCCL) the buffer goes to ``reduce_scatter`` as it is.
   Otherwise (an accelerator unit on the gRPC lane) it is copied into a host buffer from a bounded pool
   (``HostStaging``; pinned on CUDA, so the copy is asynchronous and leaves a fence), and the reduction is
   started by the engine's ``OrderedLauncher`` once that fence has passed. The pool is sized to the plan
   (``grad_staging_count``): a buffer for every unit whose reduction can be in flight at once (all of them,
   on a slow wire), as far as ``GRAD_STAGING_BYTES`` allows. When every pooled buffer is busy the copy goes
   to a fresh pageable buffer, synchronously (counted in the pool's ``overflows``, reported in the
   worker's telemetry).

A unit's full gradient (and its host copy) is let go as soon as its reduction has completed
(``release_done``, called from the backward hooks on the training thread); ``finish`` waits for the rest and
hands every unit its reduced shard.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

import torch

from communication.backend import Codec, CollectiveBackend
from communication.group import PeerGroup
from worker.zero3.flat_unit import FlatUnit
from worker.zero3.launcher import OrderedLauncher
from worker.zero3.staging import Fence, StagingPool, cuda_fence

GRAD_STAGING_BYTES = (
    256 << 20
)  # pinned host memory for gradients on their way from an accelerator to the wire
MIN_GRAD_STAGING_BUFFERS = 2  # one being filled while the previous one is sent, whatever the bytes


def grad_staging_count(units: int, largest_bytes: int, budget: int = GRAD_STAGING_BYTES) -> int:
    """Pooled gradient buffers (each of the largest unit's size) for a plan of ``units`` staged units:
    one per unit, since every unit's reduction can be in flight at once, as far as ``budget`` bytes allow,
    and never fewer than ``MIN_GRAD_STAGING_BUFFERS`` (nor more than the units)."""
    if units < 1 or largest_bytes < 1:
        raise ValueError(f"need units >= 1 and largest_bytes >= 1, got {units} and {largest_bytes}")
    return min(units, max(MIN_GRAD_STAGING_BUFFERS, budget // largest_bytes))


@dataclass
class HostStaging:
    """How gradients of accelerator units reach a lane that takes host memory: a pool of host buffers,
    and the fence left behind by an asynchronous copy into one of them (None: the copy was synchronous)."""

    pool: StagingPool
    fence: Callable[[torch.device], Fence | None]  # of a copy from a tensor on that device

    @classmethod
    def for_units(cls, units: list[FlatUnit], device: torch.device) -> HostStaging | None:
        """Pinned buffers and CUDA events for CUDA units whose lane takes host memory; None elsewhere."""
        staged = [u for u in units if u.comm_device.type != device.type]
        if device.type != "cuda" or not staged:
            return None
        largest = max(u.plan.padded_numel for u in staged)
        pool = StagingPool(largest, grad_staging_count(len(staged), 4 * largest), pin=True)
        return cls(pool, cuda_fence)


def finite_flag(flat: torch.Tensor) -> torch.Tensor:
    """A 0-d bool tensor on ``flat``'s device: every value finite (min and max propagate NaN)."""
    lo, hi = torch.aminmax(flat)
    return torch.isfinite(lo) & torch.isfinite(hi)


@dataclass
class _Reduction:
    future: Future[torch.Tensor]
    wire: torch.Tensor | None  # the gradient the lane reads, held until the reduction has completed
    target: torch.Tensor
    unit: FlatUnit
    staged: bool = False  # ``wire`` is a host buffer lent by the staging pool
    fence: Fence | None = None  # of the copy into it


@dataclass
class Reductions:
    backend: CollectiveBackend
    codec: Codec
    launcher: OrderedLauncher | None = None
    staging: HostStaging | None = None
    _pending: list[_Reduction] = field(default_factory=list)
    _nonfinite: bool = False  # a host gradient of this pass was not finite
    _finite_flags: torch.Tensor | None = None  # on the device: AND of the pass's flags

    def finite(self) -> bool | torch.Tensor:
        """Every gradient of this pass was finite (zeros were reduced instead of one that was not): on an
        accelerator a 0-d bool tensor on its device, not read here (no host synchronisation); on the host
        a bool."""
        if self._nonfinite or self._finite_flags is None:
            return not self._nonfinite
        return self._finite_flags

    def reset(self) -> None:
        """Forget the pass (an abandoned one's reductions included; their host buffers leave the pool)."""
        for r in self._pending:
            self._release(r, reusable=False)
        self._pending = []
        self._nonfinite = False
        self._finite_flags = None

    def start(
        self,
        group: PeerGroup,
        step: int,
        unit: FlatUnit,
        timeout: float,
        track: Callable[[Future[torch.Tensor]], None],
    ) -> None:
        """Reduce-scatter ``unit``'s gradient (all of it is accumulated) into a fresh gradient shard."""
        flat = unit.flat_grad()
        self._guard(flat)
        target = unit.grad_target()
        staged, fence = False, None
        if self.staging is not None or unit.comm_device.type != flat.device.type:
            flat, fence = self._to_host(flat)
            staged = self.staging is not None
        backend, codec, key = self.backend, self.codec, unit.index

        def launch(wire: torch.Tensor = flat) -> Future[torch.Tensor]:
            return backend.reduce_scatter(group, step, key, wire, target, timeout, codec=codec)

        fut = launch() if self.launcher is None else self.launcher.call(launch, fence)
        track(fut)
        self._pending.append(_Reduction(fut, flat, target, unit, staged, fence))

    def release_done(self) -> None:
        """Let go of the gradient of every reduction that has completed."""
        for r in self._pending:
            if r.wire is not None and r.future.done():
                self._release(r, reusable=not r.future.cancelled() and r.future.exception() is None)

    def finish(self, wait: Callable[[Future[torch.Tensor]], None]) -> int:
        """Wait for every reduction of the pass and hand each unit its shard; how many there were."""
        pending, self._pending = self._pending, []
        for i, r in enumerate(pending):
            try:
                wait(r.future)
            except BaseException:
                for left in pending[i:]:
                    self._release(left, reusable=False)
                raise
            self._release(r, reusable=True)
            r.unit.take_grad(r.target)
        return len(pending)

    def _guard(self, flat: torch.Tensor) -> None:
        ok = finite_flag(flat)
        if flat.device.type == "cpu":  # reading the flag synchronises nothing here
            if not bool(ok):
                self._nonfinite = True
                flat.zero_()
            return
        flat.masked_fill_(~ok, 0.0)
        self._finite_flags = ok if self._finite_flags is None else self._finite_flags & ok

    def _to_host(self, flat: torch.Tensor) -> tuple[torch.Tensor, Fence | None]:
        """``flat`` copied into a host buffer (pooled where one is free), and the fence of the copy."""
        if self.staging is None:  # no pool: a synchronous copy
            return flat.to("cpu"), None
        buf = self.staging.pool.acquire(flat.numel())
        buf.copy_(flat, non_blocking=buf.is_pinned() and flat.device.type == "cuda")
        return buf, self.staging.fence(flat.device)  # a synchronous copy's fence has passed already

    def _release(self, r: _Reduction, *, reusable: bool) -> None:
        """Drop the reduction's gradient; a pooled buffer goes back (once, with its copy's fence)."""
        wire, r.wire = r.wire, None
        if wire is not None and r.staged and self.staging is not None:
            self.staging.pool.release(wire, reusable=reusable, fence=r.fence)
