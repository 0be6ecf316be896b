"""What a worker reports in its heartbeats besides its state (``worker.state``: epoch and steps), and its
fence: written by the training thread, read by the heartbeat (under a lock).

The training side calls `progress()` for every committed step and `update(state=...)` as its
lifecycle moves; the heartbeat reports worker_state "stalled" in place of "training" when the training
makes no progress in time (worker/liveness.py). `wait_lease` is the fence between steps: it blocks the
step loop while the lease is not held. The lease is a deadline, one heartbeat timeout after the last beat
that got through (`lease_expires`, set by the heartbeat), so the fence holds from the moment it passes,
not from whenever the heartbeat loop next notices a failed beat.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from worker.liveness import ProgressClock
from worker.state import StateView

log = logging.getLogger(__name__)

OPTIONAL_FIELDS = (
    "loss",
    "samples_per_s",
    "compute_s",
    "comm_s",
    "wait_s",
    "data_wait_s",
    "test_loss",
    "test_accuracy",
    "loss_step",
    "test_step",
)


class LeaseLost(Exception):
    """No successful heartbeat for too long: this worker must stop stepping."""


@dataclass
class Telemetry:
    """What the worker reports; written by the training thread, read by the heartbeat (under a lock)."""

    worker_id: str
    state: str = "starting"
    recovery: dict[str, Any] | None = None  # how the current epoch was formed (worker.manager)
    last_progress: float | None = None  # monotonic time of the last committed step
    loss: float | None = None
    samples_per_s: float | None = None
    compute_s: float | None = None
    comm_s: float | None = None
    wait_s: float | None = None
    data_wait_s: float | None = None
    test_loss: float | None = None
    test_accuracy: float | None = None
    loss_step: int | None = None  # the step whose loss `loss` is
    test_step: int | None = None  # the committed step after which the latest evaluation ran
    bytes_sent: int = 0
    bytes_received: int = 0
    bytes_by_lane: dict[str, int] | None = None  # bytes sent, by data-plane lane ("grpc", "local")
    bus_bandwidth: dict[str, float] | None = None  # last step's collectives: bytes/s by "lane/op"
    staging_overflows: int = 0  # host staging buffers handed out beyond the engine's pools, all epochs
    # Liveness: None (a coordinator that sets no progress timeout) never reports "stalled". The start-up
    # timeout applies before the epoch's first committed step.
    progress_timeout_s: float | None = None
    startup_timeout_s: float = 120.0
    clock: ProgressClock = field(default_factory=ProgressClock)
    stop_requested: threading.Event = field(default_factory=threading.Event)
    lease_ok: threading.Event = field(default_factory=threading.Event)
    lease_expires: float = math.inf  # time.monotonic() deadline of the lease (the heartbeat renews it)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def update(self, **values: Any) -> None:
        """Set fields. A change of state restarts the progress clock: every epoch's training starts (from
        "waiting") under the start-up timeout."""
        with self.lock:
            before = self.state
            for key, value in values.items():
                if not hasattr(self, key):
                    raise AttributeError(f"unknown telemetry field {key}")
                setattr(self, key, value)
            if self.state != before:
                self.clock.restart()

    def count_staging_overflows(self, n: int) -> None:
        """A step handed out ``n`` host staging buffers beyond the engine's pools (synchronous copies)."""
        with self.lock:
            self.staging_overflows += max(0, int(n))

    def progress(self) -> None:
        """A step was committed (the worker's state has its number): the progress clock moves."""
        with self.lock:
            self.last_progress = self.clock.committed()

    def liveness_from(self, answer: Mapping[str, Any], startup_default_s: float) -> None:
        """Take the timeouts of a registration answer (`startup_default_s` when it names no start-up
        timeout; no progress timeout: this worker never reports itself stalled)."""
        progress = answer.get("progress_timeout_s")
        startup = answer.get("startup_timeout_s", startup_default_s)
        with self.lock:
            self.progress_timeout_s = None if progress is None else float(progress)
            self.startup_timeout_s = float(startup)

    def reported_state(self) -> str:
        """The worker_state to report: "stalled" in place of "training" once the training has made no
        progress in time (while the lease holds: a fenced worker waits, it is not stalled)."""
        with self.lock:
            state, timeout, startup = self.state, self.progress_timeout_s, self.startup_timeout_s
        if state != "training" or timeout is None or not self.lease_held():
            return state
        return "stalled" if self.clock.overdue(timeout, startup) is not None else state

    def body(self, view: StateView) -> dict[str, Any]:
        """The heartbeat request body: the worker's state as ``view`` reads it, and what this object holds
        (fields left out while unknown)."""
        state = self.reported_state()
        with self.lock:
            body: dict[str, Any] = {
                "epoch": view.epoch,
                "step": max(view.committed_step, 0),
                "committed_step": view.committed_step,
                "state": state,
                "bytes_sent": self.bytes_sent,
                "bytes_received": self.bytes_received,
                "staging_overflows": self.staging_overflows,
            }
            if self.bytes_by_lane is not None:
                body["bytes_by_lane"] = dict(self.bytes_by_lane)
            if self.bus_bandwidth:
                body["bus_bandwidth"] = dict(self.bus_bandwidth)
            if self.recovery is not None:
                body["recovery"] = dict(self.recovery)
            for key in OPTIONAL_FIELDS:
                value = getattr(self, key)
                if value is not None and math.isfinite(value):  # a diverged loss is not a bad request
                    body[key] = value
            return body

    def lease_held(self) -> bool:
        """Whether the lease holds now: not lost, and not past its deadline."""
        return self.lease_ok.is_set() and time.monotonic() <= self.lease_expires

    def renew_lease(self, expires: float) -> None:
        """A heartbeat got through: the lease holds until ``expires`` (time.monotonic()); if it was not
        held, unfence, and the time spent fenced was no stall."""
        held = self.lease_held()
        self.lease_expires = expires
        if not held:
            self.clock.touch()
            self.lease_ok.set()

    def wait_lease(self, warn_after_s: float) -> None:
        """The fence between steps: block the step loop while the lease is not held, as long as it takes
        (the heartbeat gives up after the barrier timeout and stops the worker). Warns once after
        `warn_after_s`; raises LeaseLost when a stop is requested while fenced."""
        started = time.monotonic()
        warned = False
        while not self.lease_held():
            if self.stop_requested.wait(0.05):
                raise LeaseLost(f"worker {self.worker_id}: stopping while fenced")
            if not warned and time.monotonic() - started > warn_after_s:
                warned = True
                log.warning(
                    "worker %s: fenced for %.1f s (no heartbeat gets through); waiting for the coordinator",
                    self.worker_id,
                    time.monotonic() - started,
                )
