"""The heartbeat loop, tied to the worker's main task.

`run_tied(main, heartbeat)` runs both as asyncio tasks and makes them live and die together:

- main task ends (done or raised): the heartbeat sends one last beat with the final state
  (`finished`, or `failed` when main raised) and stops. A dead trainer behind a live heartbeat cannot happen.
- heartbeat ends (wrong token, coordinator lost for longer than the grace period): main is aborted
  (`abort()` callback, then cancelled) and the heartbeat's error is raised.

While running, each answer of the coordinator is acted on at once: `reform` with a newer epoch calls
`backend.set_epoch(epoch)` so in-flight collectives of the old epoch fail immediately; `stop` sets the
stop flag the trainer polls; 404/410 re-registers (a rejoin, which bumps the epoch). A worker whose
lease ran out (no successful beat for a heartbeat timeout) is fenced: `Telemetry.wait_lease` blocks
the step loop until a beat gets through again.
"""

from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

from worker.coordinator_client import CoordinatorClient, CoordinatorUnreachable, MustRegister, RetryPolicy

log = logging.getLogger(__name__)

T = TypeVar("T")

STATES = ("starting", "waiting", "training", "finished", "failed")


class EpochSink(Protocol):
    def set_epoch(self, epoch: int) -> None: ...


class LeaseLost(Exception):
    """No successful heartbeat for too long: this worker must stop stepping."""


@dataclass
class Telemetry:
    """What the worker reports; written by the training thread, read by the heartbeat (under a lock)."""

    worker_id: str
    state: str = "starting"
    epoch: int = 0
    step: int = 0
    loss: float | None = None
    samples_per_s: float | None = None
    compute_s: float | None = None
    comm_s: float | None = None
    wait_s: float | None = None
    test_loss: float | None = None
    test_accuracy: float | None = None
    bytes_sent: int = 0
    bytes_received: int = 0
    bytes_by_lane: dict[str, int] | None = None  # bytes sent, by data-plane lane ("grpc", "local")
    known_epoch: int = 0  # newest epoch the coordinator told us about
    stop_requested: threading.Event = field(default_factory=threading.Event)
    lease_ok: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def update(self, **values: Any) -> None:
        with self.lock:
            for key, value in values.items():
                if not hasattr(self, key):
                    raise AttributeError(f"unknown telemetry field {key}")
                setattr(self, key, value)

    def body(self) -> dict[str, Any]:
        """The heartbeat request body (fields left out while unknown)."""
        with self.lock:
            body: dict[str, Any] = {
                "epoch": self.epoch,
                "step": self.step,
                "state": self.state,
                "bytes_sent": self.bytes_sent,
                "bytes_received": self.bytes_received,
            }
            if self.bytes_by_lane is not None:
                body["bytes_by_lane"] = dict(self.bytes_by_lane)
            for key in (
                "loss",
                "samples_per_s",
                "compute_s",
                "comm_s",
                "wait_s",
                "test_loss",
                "test_accuracy",
            ):
                value = getattr(self, key)
                if value is not None and math.isfinite(value):  # a diverged loss is not a bad request
                    body[key] = value
            return body

    def wait_lease(self, timeout: float) -> None:
        """Block the step loop while the lease is lost; raise LeaseLost if it does not come back in time."""
        deadline = time.monotonic() + timeout
        while not self.lease_ok.wait(0.1):
            if self.stop_requested.is_set():
                raise LeaseLost(f"worker {self.worker_id}: stopping while fenced")
            if time.monotonic() > deadline:
                raise LeaseLost(f"worker {self.worker_id}: no heartbeat got through for {timeout:.1f}s")


class Heartbeat:
    def __init__(
        self,
        client: CoordinatorClient,
        telemetry: Telemetry,
        backend: EpochSink,
        *,
        interval_s: float,
        timeout_s: float,
        grace_s: float,
        reregister: Callable[[], Awaitable[int]],
        stats: Callable[[], tuple[int, int]] | None = None,
    ) -> None:
        if not 0 < interval_s < timeout_s:
            raise ValueError(f"heartbeat interval {interval_s}s must be below its timeout {timeout_s}s")
        self.client = client
        self.t = telemetry
        self.backend = backend
        self.interval_s = interval_s
        self.timeout_s = timeout_s
        self.grace_s = grace_s
        self.reregister = reregister
        self.stats = stats
        self.beats = 0
        self._last_ok = time.monotonic()  # registration just succeeded: the lease starts now
        self.t.lease_ok.set()
        self._closing = asyncio.Event()

    def _note_epoch(self, epoch: int) -> None:
        with self.t.lock:
            newer = epoch > self.t.known_epoch
            if newer:
                self.t.known_epoch = epoch
        if newer:
            log.info("worker %s: epoch %d announced; cancelling older collectives", self.t.worker_id, epoch)
            self.backend.set_epoch(epoch)

    async def beat_once(self) -> dict[str, Any] | None:
        """One heartbeat; acts on the answer. Returns it, or None if the coordinator was unreachable."""
        if self.stats is not None:
            sent, received = self.stats()
            self.t.update(bytes_sent=sent, bytes_received=received)
        try:
            answer = await self.client.heartbeat(
                self.t.worker_id,
                self.t.body(),
                timeout_s=max(0.2, self.timeout_s / 2),
                retry=RetryPolicy(attempts=1),
            )
        except CoordinatorUnreachable as exc:
            age = time.monotonic() - self._last_ok
            if age > self.timeout_s and self.t.lease_ok.is_set():
                log.warning("worker %s: lease lost (%.1fs without heartbeat): fencing", self.t.worker_id, age)
                self.t.lease_ok.clear()
            if age > self.grace_s:
                raise CoordinatorUnreachable(
                    f"worker {self.t.worker_id}: coordinator unreachable for {age:.0f}s: {exc}"
                ) from exc
            return None
        except MustRegister as exc:
            log.warning("worker %s: %s; registering again", self.t.worker_id, exc)
            self._note_epoch(await self.reregister())
            return None
        self._last_ok = time.monotonic()
        self.beats += 1
        if not self.t.lease_ok.is_set():
            log.info("worker %s: heartbeat got through again: lease restored", self.t.worker_id)
            self.t.lease_ok.set()
        epoch = int(answer.get("epoch", 0))
        action = answer.get("action", "continue")
        if action == "reform" or epoch > self.t.known_epoch:
            self._note_epoch(epoch)
        elif action == "stop" and not self.t.stop_requested.is_set():
            log.info("worker %s: coordinator says stop", self.t.worker_id)
            self.t.stop_requested.set()
        return answer

    async def run(self) -> None:
        """Beat every interval until `close()`; raises on a fatal error (wrong token, coordinator lost)."""
        while not self._closing.is_set():
            started = time.monotonic()
            await self.beat_once()
            delay = max(0.0, self.interval_s - (time.monotonic() - started))
            try:
                await asyncio.wait_for(self._closing.wait(), timeout=delay)
            except TimeoutError:
                pass

    async def close(self, final_state: str | None) -> None:
        """Stop beating; send one last beat carrying `final_state` (best effort)."""
        self._closing.set()
        if final_state is not None:
            self.t.update(state=final_state)
            try:
                await self.client.heartbeat(
                    self.t.worker_id, self.t.body(), timeout_s=self.timeout_s, retry=RetryPolicy(attempts=2)
                )
            except Exception as exc:  # the coordinator may be gone: the last beat is best effort
                log.warning(
                    "worker %s: final heartbeat (%s) not delivered: %s", self.t.worker_id, final_state, exc
                )


async def run_tied(
    main: Coroutine[Any, Any, T],
    heartbeat: Heartbeat,
    *,
    abort: Callable[[], None],
    final_state: Callable[[BaseException | None], str | None],
) -> T:
    """Run `main` with `heartbeat`; whichever ends first ends the other (see the module docstring)."""
    main_task: asyncio.Task[T] = asyncio.create_task(main, name="worker-main")
    beat_task = asyncio.create_task(heartbeat.run(), name="worker-heartbeat")
    try:
        await asyncio.wait({main_task, beat_task}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        abort()
        main_task.cancel()
        beat_task.cancel()
        raise
    if main_task.done():
        exc = main_task.exception() if not main_task.cancelled() else asyncio.CancelledError()
        beat_task.cancel()  # no beat in flight may overtake the final one
        await asyncio.gather(beat_task, return_exceptions=True)
        await heartbeat.close(final_state(exc))
        return main_task.result()
    # The heartbeat ended first: that is always fatal for the main task.
    beat_exc = beat_task.exception() if not beat_task.cancelled() else None
    log.error("worker %s: heartbeat stopped (%s); aborting training", heartbeat.t.worker_id, beat_exc)
    abort()
    main_task.cancel()
    await asyncio.gather(main_task, return_exceptions=True)
    heartbeat.t.update(state="failed")
    if beat_exc is not None:
        raise beat_exc
    raise RuntimeError("heartbeat stopped without an error")
