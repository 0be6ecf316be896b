"""Whether this worker's training makes progress: the evidence behind its self-report "stalled".

A worker speaks only for itself. While it trains, its heartbeat says worker_state "stalled" once its
training thread has shown no progress for the progress timeout (the coordinator's, from the registration
answer), or for the start-up timeout before its first committed step of the epoch (building the model,
loading data and checkpoints). The coordinator evicts a worker that says so (coordinator/liveness.py).

Progress is a committed step, or a data-plane call of the step loop issued or completed: a long
evaluation or a slow step is no stall as long as its collectives move. The clock does not run while a
call is in flight (the thread waits on its peers: the collective timeout and peer reports judge those) nor
while the worker is fenced for want of the coordinator (the heartbeat restarts it with the lease).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import torch

from communication.backend import Codec, CollectiveBackend
from communication.group import PeerGroup
from communication.handle import Handle
from communication.lane_wrapper import LaneWrapper


class ProgressClock:
    """When the training thread last showed progress. Thread-safe: the step loop, the data plane's
    callbacks and the heartbeat all touch it."""

    def __init__(self, now: Callable[[], float] = time.monotonic) -> None:
        self._now = now
        self._lock = threading.Lock()
        self._mark = now()  # last sign of progress (monotonic)
        self._committed = False  # a step was committed since the epoch's training began
        self._in_flight = 0  # data-plane calls of the step loop not yet done

    def restart(self) -> None:
        """Training of a new epoch begins (or begins again): the start-up timeout applies until its first
        committed step."""
        with self._lock:
            self._mark = self._now()
            self._committed = False

    def committed(self) -> float:
        """A step was committed; returns the time (monotonic)."""
        with self._lock:
            self._mark = self._now()
            self._committed = True
            return self._mark

    def touch(self) -> None:
        """Restart the clock without a step (the lease came back: the fenced time was no stall)."""
        with self._lock:
            self._mark = self._now()

    def call_started(self) -> None:
        with self._lock:
            self._in_flight += 1
            self._mark = self._now()

    def call_done(self) -> None:
        with self._lock:
            self._in_flight = max(0, self._in_flight - 1)
            self._mark = self._now()

    @property
    def in_flight(self) -> int:
        return self._in_flight

    def idle_s(self) -> float:
        """Seconds since the last progress, 0 while a data-plane call is in flight."""
        with self._lock:
            return 0.0 if self._in_flight else self._now() - self._mark

    def overdue(self, progress_timeout_s: float, startup_timeout_s: float) -> float | None:
        """Seconds without progress, once past the timeout that applies (progress after the epoch's first
        committed step, start-up before); None while within it or while a call is in flight."""
        with self._lock:
            if self._in_flight:
                return None
            idle = self._now() - self._mark
            limit = progress_timeout_s if self._committed else startup_timeout_s
        return idle if idle > limit else None


class WatchedCalls(LaneWrapper):
    """The collective backend as the step loop sees it: every data-plane call (all_gather, reduce_scatter,
    send, recv) is counted on `clock` from its issue until its handle is done. Everything else is the
    backend's own."""

    def __init__(self, backend: CollectiveBackend, clock: ProgressClock) -> None:
        super().__init__(backend)
        self._clock = clock

    def _watch(self, call: Callable[..., Handle], *args: Any, **kwargs: Any) -> Handle:
        self._clock.call_started()
        try:
            handle = call(*args, **kwargs)
        except BaseException:
            self._clock.call_done()
            raise
        handle.add_done_callback(lambda _: self._clock.call_done())
        return handle

    def all_gather(
        self,
        group: PeerGroup,
        step: int,
        unit: int,
        shard: torch.Tensor,
        out: torch.Tensor,
        timeout: float,
        *,
        codec: Codec = "none",
    ) -> Handle:
        return self._watch(self._lane.all_gather, group, step, unit, shard, out, timeout, codec=codec)

    def reduce_scatter(
        self,
        group: PeerGroup,
        step: int,
        unit: int,
        full: torch.Tensor,
        out: torch.Tensor,
        timeout: float,
        *,
        codec: Codec = "none",
    ) -> Handle:
        return self._watch(self._lane.reduce_scatter, group, step, unit, full, out, timeout, codec=codec)

    def send(self, tensor: torch.Tensor, *, group: PeerGroup, dest: int, key: int, timeout: float) -> Handle:
        return self._watch(self._lane.send, tensor, group=group, dest=dest, key=key, timeout=timeout)

    def recv(self, out: torch.Tensor, *, group: PeerGroup, src: int, key: int, timeout: float) -> Handle:
        return self._watch(self._lane.recv, out, group=group, src=src, key=key, timeout=timeout)

    def exchange(self, values: torch.Tensor, *, group: PeerGroup, key: int, timeout: float) -> Handle:
        return self._watch(self._lane.exchange, values, group=group, key=key, timeout=timeout)


# mypy checks the wrapper against the contract it stands in for.
_CONTRACT: type[CollectiveBackend] = WatchedCalls
