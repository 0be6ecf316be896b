"""A small bounded pool of host staging buffers for parameter gathers of units that live on an accelerator.

The wire writes a unit's fp32 parameters into host memory; the unit copies them to its device once the
gather has landed and gives the buffer back. Only gathers in flight hold a buffer, and the engine keeps at
most two of them outstanding (one prefetch in flight, one landed but not yet used), so a few buffers of the
largest unit's size serve the whole model: host memory pinned for staging is bounded by
``count x largest unit`` instead of the whole model.

The copy to the device is asynchronous where the buffer is pinned (CUDA): the unit enqueues it on the
compute stream, whose kernels that use the parameters are ordered after it, and gives the buffer back with
a fence (a CUDA event recorded after the copy). A buffer is lent again only once its fence has passed, so
the wire never overwrites what a copy still reads; ``acquire`` prefers a buffer whose fence has passed,
then a new buffer while the pool may grow, and only then waits for the oldest fence.

The pool never blocks on the wire: when every buffer is lent, ``acquire`` hands out a fresh pageable
buffer (counted in ``overflows``) that is simply dropped on release. A buffer whose gather may still be
written by the wire (an abandoned gather) is released with ``reusable=False`` and leaves the pool for
good, so no later gather can share it with a late write.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol

import torch

if TYPE_CHECKING:
    from worker.zero3.flat_unit import FlatUnit


class Fence(Protocol):
    """What a device copy out of a buffer leaves behind (``torch.cuda.Event``): passed once it completed."""

    def query(self) -> bool: ...

    def synchronize(self) -> None: ...


def cuda_fence(device: torch.device) -> Fence:
    """An event recorded on ``device``'s current stream, where a copy to or from a tensor on ``device`` was
    enqueued (not the current device's: a unit on cuda:1 fenced on cuda:0 would pass at once): passed once
    the work enqueued before it is done."""
    event = torch.cuda.Event()
    event.record(torch.cuda.current_stream(device))
    return event


class StagingPool:
    """At most ``count`` host fp32 buffers of ``numel`` elements each (pinned when ``pin``), lent out one
    per gather in flight; allocated on first use."""

    def __init__(self, numel: int, count: int = 3, *, pin: bool) -> None:
        if numel < 1 or count < 1:
            raise ValueError(f"a staging pool needs numel >= 1 and count >= 1, got {numel} and {count}")
        self.numel = numel
        self.count = count
        self.pin = pin
        self.overflows = 0
        self._lock = threading.Lock()
        self._idle: list[tuple[torch.Tensor, Fence | None]] = []  # oldest first
        self._lent: dict[int, torch.Tensor] = {}  # data_ptr -> pooled buffer

    @classmethod
    def share(cls, units: Sequence[FlatUnit], device: torch.device, count: int) -> StagingPool | None:
        """One pool of ``count`` buffers of the largest unit's size, shared by ``units`` when they live on
        an accelerator (pinned on CUDA); None on the CPU, where the wire writes the parameters in place."""
        if device.type == "cpu" or not units:
            return None
        pool = cls(max(u.plan.padded_numel for u in units), count, pin=device.type == "cuda")
        for unit in units:
            unit.staging_pool = pool
        return pool

    @property
    def allocated(self) -> int:
        """Pooled buffers in existence (idle or lent)."""
        with self._lock:
            return len(self._idle) + len(self._lent)

    @property
    def lent(self) -> int:
        with self._lock:
            return len(self._lent)

    def acquire(self, numel: int) -> torch.Tensor:
        """A host fp32 buffer of ``numel`` elements for one gather (a view of a pooled buffer when one is
        free or may still be allocated, else a fresh pageable one)."""
        if not 1 <= numel <= self.numel:
            raise ValueError(f"staging of {numel} elements requested from a pool of {self.numel}")
        with self._lock:
            passed = next((i for i, (_, f) in enumerate(self._idle) if f is None or f.query()), None)
            fence: Fence | None = None
            if passed is not None:
                buf, _ = self._idle.pop(passed)
            elif len(self._idle) + len(self._lent) < self.count:
                buf = torch.empty(self.numel, dtype=torch.float32, pin_memory=self.pin)
            elif self._idle:
                buf, fence = self._idle.pop(0)  # every idle buffer is still read by a copy: the oldest
            else:
                self.overflows += 1
                return torch.empty(numel, dtype=torch.float32)
            self._lent[buf.data_ptr()] = buf
        if fence is not None:
            fence.synchronize()  # its copy to the device is done: the wire may write the buffer
        return buf[:numel]

    def release(self, view: torch.Tensor, *, reusable: bool = True, fence: Fence | None = None) -> None:
        """Give back what ``acquire`` returned, with the ``fence`` of a device copy still reading it;
        with ``reusable=False`` the buffer leaves the pool."""
        with self._lock:
            buf = self._lent.pop(view.data_ptr(), None)
            if buf is not None and reusable:
                self._idle.append((buf, fence))
