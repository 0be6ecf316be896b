"""The heartbeat loop, tied to the worker's main task.

`run_tied(main, heartbeat)` runs both as asyncio tasks and makes them live and die together:

- main task ends (done or raised): the heartbeat sends one last beat with the final state
  (`finished`, or `failed` when main raised) and stops. A dead trainer behind a live heartbeat cannot happen.
- heartbeat ends (wrong token, coordinator lost for longer than the barrier timeout): main is aborted
  (`abort()` callback, then cancelled) and the heartbeat's error is raised.

While running, each answer of the coordinator is acted on at once: `reform` with a newer epoch calls
`backend.set_epoch(epoch)` so in-flight collectives of the old epoch fail immediately; `stop` sets the
stop flag the trainer polls; 404/410 re-registers (a rejoin, which bumps the epoch), unless this worker's
training is stalled: it was evicted for that, so it only fences itself (a newer epoch) and registers again
once its training moves. A worker whose lease ran out (no successful beat for a heartbeat timeout) is
fenced: `Telemetry.wait_lease` blocks the step loop from the lease's deadline on (it checks the deadline
itself, so a beat still in flight does not extend it) until a beat gets through again. Meanwhile the
heartbeat keeps trying, with backoff (worker/outage.py), until the coordinator answers or the outage
outlasts `outage_limit_s` (the barrier timeout): only then does it end the worker (CoordinatorLost).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar

from worker.coordinator_client import CoordinatorClient, CoordinatorUnreachable, MustRegister, RetryPolicy
from worker.outage import CoordinatorLost, backoff_s
from worker.state import WorkerState
from worker.telemetry import LeaseLost, Telemetry

__all__ = ["CoordinatorLost", "HeartbeatLoop", "LeaseLost", "Telemetry", "run_tied"]

log = logging.getLogger(__name__)

T = TypeVar("T")


class HeartbeatLoop:
    def __init__(
        self,
        client: CoordinatorClient,
        telemetry: Telemetry,
        state: WorkerState,
        *,
        interval_s: float,
        timeout_s: float,
        grace_s: float,
        reregister: Callable[[], Awaitable[int]],
        stats: Callable[[], tuple[int, int]] | None = None,
        outage_limit_s: float = 600.0,
        diagnostics: Callable[[], dict[str, Any]] | None = None,
    ) -> None:
        """`grace_s`: how long the coordinator may stay away before the worker warns that it is still
        fenced; `outage_limit_s` (the barrier timeout): how long before the worker gives up
        (CoordinatorLost)."""
        if not 0 < interval_s < timeout_s:
            raise ValueError(f"heartbeat interval {interval_s}s must be below its timeout {timeout_s}s")
        self.client = client
        self.t = telemetry
        self.state = state
        self.interval_s = interval_s
        self.timeout_s = timeout_s
        self.grace_s = grace_s
        self.outage_limit_s = outage_limit_s
        self.reregister = reregister
        self.stats = stats
        self.diagnostics = diagnostics  # what the coordinator's diagnosis reads: the wait, or the stack
        self.beats = 0
        self.misses = 0  # failed beats in a row (unreachable coordinator): the backoff's exponent
        self._warned_grace = False
        self._kept_out = False  # evicted while stalled: not registering again until the training moves
        self._last_ok = time.monotonic()  # registration just succeeded: the lease starts now
        self._last_answer = self._last_ok  # any answer (a 410 too): the coordinator was reachable
        self.t.renew_lease(self._last_ok + timeout_s)
        self._closing = asyncio.Event()

    def _note_epoch(self, epoch: int) -> None:
        if self.state.announce(epoch):
            log.info("worker %s: epoch %d announced; cancelling older collectives", self.t.worker_id, epoch)

    async def beat_once(self) -> dict[str, Any] | None:
        """One heartbeat; acts on the answer. Returns it, or None if the coordinator was unreachable."""
        if self.stats is not None:
            sent, received = self.stats()
            self.t.update(bytes_sent=sent, bytes_received=received)
        try:
            body = self.t.body(self.state.view())
            if self.diagnostics is not None:
                body.update(self.diagnostics())
            answer = await self.client.heartbeat(
                self.t.worker_id,
                body,
                timeout_s=max(0.2, self.timeout_s / 2),
                retry=RetryPolicy(attempts=1),
            )
        except CoordinatorUnreachable as exc:
            self._unreachable(exc)
            return None
        except MustRegister as exc:
            self._last_answer = time.monotonic()
            # the coordinator answered (it no longer knows us): the deadline moves, nothing is unfenced
            self.t.lease_expires = self._last_answer + self.timeout_s
            await self._register_again(exc)
            return None
        self._last_ok = self._last_answer = time.monotonic()
        self.beats += 1
        self.misses = 0
        self._warned_grace = False
        if not self.t.lease_ok.is_set():
            log.info("worker %s: heartbeat got through again: lease restored", self.t.worker_id)
        self.t.renew_lease(self._last_ok + self.timeout_s)
        epoch = int(answer.get("epoch", 0))
        action = answer.get("action", "continue")
        if action == "reform" or epoch > self.state.announced_epoch:
            self._note_epoch(epoch)
        elif action == "stop" and not self.t.stop_requested.is_set():
            log.info("worker %s: coordinator says stop", self.t.worker_id)
            self.t.stop_requested.set()
        return answer

    def _unreachable(self, exc: Exception) -> None:
        """A beat that did not get through: fence after the heartbeat timeout, warn after the grace, give
        up (CoordinatorLost) after the outage limit."""
        self.misses += 1
        now = time.monotonic()
        if now - self._last_ok > self.timeout_s and self.t.lease_ok.is_set():
            log.warning(
                "worker %s: lease lost (%.1fs without heartbeat): fencing",
                self.t.worker_id,
                now - self._last_ok,
            )
            self.t.lease_ok.clear()
        age = now - self._last_answer
        if age > self.outage_limit_s:
            raise CoordinatorLost(
                f"worker {self.t.worker_id}: the coordinator stayed unreachable for {age:.0f} s, longer than "
                f"the barrier timeout ({self.outage_limit_s:g} s): {exc}"
            ) from exc
        if age > self.grace_s and not self._warned_grace:
            self._warned_grace = True
            log.warning(
                "worker %s: coordinator unreachable for %.0f s; staying fenced and retrying until the "
                "barrier timeout (%g s): %s",
                self.t.worker_id,
                age,
                self.outage_limit_s,
                exc,
            )

    async def _register_again(self, exc: Exception) -> None:
        """404/410: the coordinator no longer counts this worker. Register again, unless the training is
        stalled (it was evicted for that): then only fence (retire the epoch it trains in)."""
        if self.t.reported_state() == "stalled":
            if not self._kept_out:
                log.warning(
                    "worker %s: evicted while its training is stalled (%s); fenced, registering again "
                    "once the training moves",
                    self.t.worker_id,
                    exc,
                )
            self._kept_out = True
            self.state.retire()
            return
        self._kept_out = False
        log.warning("worker %s: %s; registering again", self.t.worker_id, exc)
        try:
            self._note_epoch(await self.reregister())
        except CoordinatorUnreachable as lost:
            self._unreachable(lost)

    async def run(self) -> None:
        """Beat every interval (backing off while the coordinator is unreachable) until `close()`; raises
        on a fatal error (wrong token, coordinator lost for longer than the outage limit)."""
        while not self._closing.is_set():
            started = time.monotonic()
            await self.beat_once()
            pause = (
                self.interval_s
                if not self.misses
                else backoff_s(self.misses, self.interval_s, self.timeout_s)
            )
            delay = max(0.0, pause - (time.monotonic() - started))
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
                    self.t.worker_id,
                    self.t.body(self.state.view()),
                    timeout_s=self.timeout_s,
                    retry=RetryPolicy(attempts=2),
                )
            except Exception as exc:  # the coordinator may be gone: the last beat is best effort
                log.warning(
                    "worker %s: final heartbeat (%s) not delivered: %s", self.t.worker_id, final_state, exc
                )


async def run_tied(
    main: Coroutine[Any, Any, T],
    heartbeat: HeartbeatLoop,
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
