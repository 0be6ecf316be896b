"""A small bounded pool of host staging buffers for parameter gathers of units that live on an accelerator.

The wire writes a unit's fp32 parameters into host memory; the unit copies them to its device once the
gather has landed and gives the buffer back. Only gathers in flight hold a buffer, and the engine keeps at
most two of them outstanding (one prefetch in flight, one landed but not yet used), so a few buffers of the
largest unit's size serve the whole model: host memory pinned for staging is bounded by
``count x largest unit`` instead of the whole model.

The pool never blocks: when every buffer is lent, ``acquire`` hands out a fresh pageable buffer (counted
in ``overflows``) that is simply dropped on release. A buffer whose gather may still be written by the wire
(an abandoned gather) is released with ``reusable=False`` and leaves the pool for good, so no later gather
can share it with a late write.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from worker.zero3.flat_unit import FlatUnit


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
        self._idle: list[torch.Tensor] = []
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
            if self._idle:
                buf = self._idle.pop()
            elif len(self._lent) < self.count:
                buf = torch.empty(self.numel, dtype=torch.float32, pin_memory=self.pin)
            else:
                self.overflows += 1
                return torch.empty(numel, dtype=torch.float32)
            self._lent[buf.data_ptr()] = buf
            return buf[:numel]

    def release(self, view: torch.Tensor, *, reusable: bool = True) -> None:
        """Give back what ``acquire`` returned; with ``reusable=False`` the buffer leaves the pool."""
        with self._lock:
            buf = self._lent.pop(view.data_ptr(), None)
            if buf is not None and reusable:
                self._idle.append(buf)
