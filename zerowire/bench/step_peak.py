"""Peak tensor memory of a window of training steps on one rank (`zerowire bench step --memory`).

On CUDA the figure is ``torch.cuda.max_memory_allocated`` over the window. On CPU it comes from the
allocator events of torch's profiler (``profile_memory=True``): the profiler runs from before the model is
built, every allocation and free of the rank's training thread is an event with its byte count, so the
running sum of the events is the bytes held by live tensors at each moment, and the peak is the largest
running sum at any event inside the window (or at its start). Persistent state (parameters, shards,
optimizer state) is counted because it was allocated after the profiler started. The profiler records
what the thread that enabled it allocates and frees (autograd runs backward on that thread on CPU);
tensors that communication threads allocate themselves are not seen, the same for every contender.
Process RSS is not used: it counts the allocator's cached pages and the interpreter, not tensors.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch._C._autograd import DeviceType

WINDOW = "zerowire_bench_measured"  # the profiler range that marks the measured steps


def peak_in_window(events: Iterable[tuple[int, int]], start_ns: int, end_ns: int) -> int:
    """Largest running sum of ``(time_ns, bytes)`` allocation (+) / free (-) events, taken at the window's
    start and at every event inside ``[start_ns, end_ns]``."""
    live = 0
    peak: int | None = None
    for t, nbytes in sorted(events):
        if t > end_ns:
            break
        if t >= start_ns and peak is None:
            peak = live  # live bytes when the window opened
        live += nbytes
        if t >= start_ns:
            peak = max(peak if peak is not None else live, live)
    return live if peak is None else peak


class PeakMeter:
    """``start()`` before the model is built, ``open_window()`` / ``close_window()`` around the measured
    steps (on the training thread), then ``stop()`` returns the peak bytes of the window."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._prof: Any = None
        self._range: Any = None

    def start(self) -> None:
        if self.device.type == "cuda":
            return
        from torch.profiler import ProfilerActivity, profile

        self._prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
        self._prof.__enter__()

    def open_window(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            return
        self._range = torch.profiler.record_function(WINDOW)
        self._range.__enter__()

    def close_window(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return
        assert self._range is not None, "close_window() without open_window()"
        self._range.__exit__(None, None, None)

    def stop(self) -> int:
        if self.device.type == "cuda":
            return int(torch.cuda.max_memory_allocated(self.device))
        assert self._prof is not None, "stop() without start()"
        self._prof.__exit__(None, None, None)
        memory: list[tuple[int, int]] = []
        window: tuple[int, int] | None = None
        for ev in self._prof.profiler.kineto_results.events():
            if ev.name() == "[memory]":
                if ev.device_type() == DeviceType.CPU:
                    memory.append((ev.start_ns(), ev.nbytes()))
            elif ev.name() == WINDOW:
                window = (ev.start_ns(), ev.start_ns() + ev.duration_ns())
        if window is None:
            raise RuntimeError("the profiler recorded no measured window")
        return peak_in_window(memory, *window)
