"""Reused fp32 staging buffers of the torch.distributed lane and of the hierarchical backend."""

from __future__ import annotations

import threading

import torch


class StagingBuffers:
    """Reused fp32 buffers keyed by (numel, device): fresh large allocations cost page faults on every
    call. A buffer is taken by a call and given back once the call completed (kept while the pool
    holds at most `limit` bytes); one left with an abandoned group is simply never given back."""

    def __init__(self, limit: int) -> None:
        self._lock = threading.Lock()
        self._free: dict[tuple[int, torch.device], list[torch.Tensor]] = {}
        self._limit = limit
        self._held = 0

    def take(self, numel: int, device: torch.device) -> torch.Tensor:
        with self._lock:
            free = self._free.get((numel, device))
            if free:
                self._held -= 4 * numel
                return free.pop()
        return torch.empty(numel, dtype=torch.float32, device=device)

    def give(self, *tensors: torch.Tensor) -> None:
        with self._lock:
            for t in tensors:
                if self._held + 4 * t.numel() <= self._limit:
                    self._free.setdefault((t.numel(), t.device), []).append(t)
                    self._held += 4 * t.numel()

    def clear(self) -> None:
        with self._lock:
            self._free.clear()
            self._held = 0
