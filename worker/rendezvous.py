"""The worker's side of the coordinator's membership, once it is registered: waiting at the barrier for an
epoch that includes it, registering again when an epoch leaves it out, reporting peers it could not reach,
and lingering until the other members have finished with its shards. The daemon (worker/daemon.py) drives
it; every wait here is bounded by the barrier or the collective timeout and ends at a stop request."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Coroutine
from dataclasses import dataclass
from functools import partial
from typing import Any, TypeVar

from communication.group import PeerGroup
from jobspec import JobSpec
from worker.coordinator_client import CoordinatorClient, CoordinatorError
from worker.formation import BarrierTimeout, JobMismatch, Stopped, suspect_of
from worker.identity import WorkerConfig
from worker.outage import through_outage
from worker.state import WorkerState
from worker.telemetry import Telemetry

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass
class Rendezvous:
    client: CoordinatorClient
    t: Telemetry
    cfg: WorkerConfig
    worker_id: str
    register_body: dict[str, Any]  # what registering again sends
    interval_s: float  # the coordinator's heartbeat interval and timeout, from the registration answer
    timeout_s: float
    state: WorkerState  # told of the epochs that registering again announces

    async def reregister(self) -> int:
        """Register again (same id and secret); the coordinator's epoch."""
        return int((await self.client.register(self.register_body)).get("epoch", 0))

    async def ready(self, job: JobSpec, failed_epoch: int | None, min_workers: int) -> dict[str, Any]:
        """Wait until an epoch newer than `failed_epoch` is ready with this worker in it; its answer."""
        deadline = time.monotonic() + self.cfg.barrier_timeout_s
        stale_since = time.monotonic()
        while True:
            if self.t.stop_requested.is_set():
                raise Stopped()
            left = deadline - time.monotonic()
            if left <= 0:
                raise BarrierTimeout(
                    f"worker {self.worker_id}: no epoch with {min_workers} workers ready within "
                    f"{self.cfg.barrier_timeout_s:.0f}s"
                )
            asked = time.monotonic()
            poll = partial(self.client.ready, min_workers, wait_s=min(left, self.cfg.barrier_poll_s))
            ready = await self.unless_stopped(through_outage(poll, deadline=deadline, what="barrier"))
            epoch = int(ready["epoch"])
            if ready.get("job_hash") and ready["job_hash"] != job.hash:
                raise JobMismatch(
                    f"the barrier announces job hash {str(ready['job_hash'])[:12]}, not {job.hash[:12]}"
                )
            if not ready.get("ready"):
                if time.monotonic() - asked < 0.1:  # an answer without a wait: never spin
                    await asyncio.sleep(self.interval_s)
                continue
            mine = any(w["worker_id"] == self.worker_id for w in ready["workers"])
            stale = failed_epoch is not None and epoch <= failed_epoch
            if mine and not stale:
                return ready
            # Not a member, or the epoch did not move after our failure: after a short wait, register
            # again (a rejoin bumps the epoch, so everybody re-forms together).
            if not mine or time.monotonic() - stale_since > 2 * self.timeout_s + self.interval_s:
                log.info(
                    "worker %s: epoch %d %s; registering again",
                    self.worker_id,
                    epoch,
                    "does not include me" if not mine else "did not move",
                )
                joined = await through_outage(self.reregister, deadline=deadline, what="registration")
                self.state.announce(joined)
                stale_since = time.monotonic()
            await asyncio.sleep(self.interval_s)

    async def report_suspect(self, exc: BaseException, group: PeerGroup, members: tuple[str, ...]) -> None:
        """A peer this worker could not reach: tell the coordinator (evidence; it decides whom to evict)."""
        if (suspect := suspect_of(exc, group, members)) is not None:
            try:
                await self.client.suspect(self.worker_id, group.epoch, suspect, f"unreachable: {exc}"[:500])
            except CoordinatorError as err:  # a stale epoch, or the coordinator is away: nothing to add
                log.debug("worker %s: suspect report on %s not taken: %s", self.worker_id, suspect, err)

    async def unless_stopped(self, call: Coroutine[Any, Any, T]) -> T:
        """Await `call`, but give up (Stopped) as soon as a stop is requested."""
        task = asyncio.ensure_future(call)
        try:
            while not task.done():
                await asyncio.wait({task}, timeout=0.2)
                if self.t.stop_requested.is_set():
                    raise Stopped()
            return task.result()
        finally:
            task.cancel()

    async def linger(self, group: PeerGroup, members: tuple[str, ...]) -> None:
        """Keep serving shards until no other member of the epoch is still training (its last collective
        may still need ours), bounded by the collective timeout."""
        deadline = time.monotonic() + self.cfg.collective_timeout_s
        while time.monotonic() < deadline and not self.t.stop_requested.is_set():
            try:
                answer = (await self.client.request("GET", "/workers")).json()
            except CoordinatorError:  # the coordinator is away for now: our shards may still be needed
                await asyncio.sleep(self.interval_s)
                continue
            busy = [
                w["worker_id"]
                for w in answer.get("workers", [])
                if w["worker_id"] in members
                and w["worker_id"] != self.worker_id
                and w.get("state") == "alive"
                and w.get("worker_state") == "training"
            ]
            if not busy:
                return
            log.debug("worker %s: waiting for %s to finish", self.worker_id, busy)
            await asyncio.sleep(self.interval_s / 2)
        if not self.t.stop_requested.is_set():  # a stop (the job is over) ends the wait without a word
            log.warning(
                "worker %s: %s still training after the collective timeout", self.worker_id, group.describe()
            )
