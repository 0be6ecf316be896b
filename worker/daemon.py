"""The worker daemon's lifecycle: job -> gRPC server -> register -> (barrier -> train)* -> save -> leave.

Training runs on its own thread; the asyncio loop runs the heartbeat (tied to the lifecycle, see
worker/heartbeat.py), the barrier long-poll and signal handling. On EpochChanged / PeerLost /
CollectiveTimeout (or a lost lease) the worker goes back to the barrier for a newer epoch, and its
Manager (worker/manager.py) forms it: the members continue from the state they hold, without a rollback.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from collections.abc import Callable, Coroutine
from functools import partial
from typing import Any, TypeVar

import httpx

from communication.backend import WorkerLane
from communication.errors import CommError, Unauthenticated
from communication.group import PeerGroup
from communication.tls import client_ssl_context, describe_tls
from jobspec import JobSpec
from worker.coordinator_client import CoordinatorClient, CoordinatorError, MustRegister
from worker.formation import (
    EXIT_CONFIG,
    EXIT_JOB_MISMATCH,
    EXIT_OK,
    EXIT_TRAINING_FAILED,
    BarrierTimeout,
    ConfigError,
    JobMismatch,
    Stopped,
    TooManyReforms,
    checked_job,
    group_from_ready,
    suspect_of,
)
from worker.heartbeat import HeartbeatLoop, LeaseLost, Telemetry, run_tied
from worker.identity import (
    WorkerConfig,
    adopt_timeouts,
    advertised_address,
    check_worker_timeouts,
    describe_device,
)
from worker.lanes import default_backend_factory
from worker.manager import (
    Manager,
    TrainerFactory,
    default_trainer_factory,
    in_thread,
    outcome_dict,
)
from worker.outage import CoordinatorLost, through_outage

log = logging.getLogger(__name__)
T = TypeVar("T")


class WorkerDaemon:
    def __init__(
        self,
        cfg: WorkerConfig,
        *,
        trainer_factory: TrainerFactory = default_trainer_factory,
        backend_factory: Callable[[JobSpec, str], WorkerLane] | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.cfg = cfg
        self.trainer_factory = trainer_factory
        self.backend_factory = backend_factory or (  # built with the coordinator's timeouts
            lambda job, token: default_backend_factory(job, token, cfg=self.cfg)
        )
        self.client = CoordinatorClient(
            cfg.coordinator, cfg.token, transport=transport, verify=client_ssl_context(cfg.tls)
        )
        self.worker_id = cfg.worker_id or ""
        self.t = Telemetry(worker_id=self.worker_id)
        self.backend: WorkerLane | None = None
        self.group: PeerGroup | None = None
        self.heartbeat: HeartbeatLoop | None = None
        self.register_body: dict[str, Any] = {}
        self.interval_s = 0.5
        self.timeout_s = 2.0
        self.session: Manager | None = None
        self.formations = 0
        self.members: tuple[str, ...] = ()

    # ---- lifecycle -------------------------------------------------------------------------------------
    async def run(self) -> int:
        """The whole life of one worker process; returns its exit code (errors are logged clearly)."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                loop.add_signal_handler(sig, self.request_stop, sig.name)
            except (NotImplementedError, RuntimeError):  # not the main thread (tests)
                pass
        try:
            return await self._run()
        finally:
            if self.backend is not None:
                await asyncio.to_thread(self.backend.close)
            await self.client.close()

    async def _run(self) -> int:
        answer = await self.client.job()
        job = checked_job(answer, self.cfg.expect_job_hash)
        try:
            self.cfg = adopt_timeouts(self.cfg, answer)  # the coordinator's timeouts win
        except ValueError as exc:
            raise JobMismatch(f"cannot read the coordinator's timeouts (another version?): {exc}") from exc
        self.backend = self.backend_factory(job, self.cfg.token or "")
        port = await asyncio.to_thread(self.backend.start, self.cfg.bind)
        host, adv_port = advertised_address(self.cfg, port)
        try:
            device_kind, device_name, memory = describe_device(self.cfg.device)
        except ValueError as exc:
            raise ConfigError(str(exc)) from exc
        self.register_body = {
            "host": host,
            "port": adv_port,
            "host_id": self.cfg.host_id,
            "device": device_kind,
            "device_name": device_name,
            "memory_bytes": memory,
        }
        if self.backend.store_port is not None:  # it hosts a rendezvous store for its host's lane
            self.register_body["store_port"] = self.backend.store_port
        if self.worker_id:
            self.register_body["worker_id"] = self.worker_id
        self.session = Manager(self.cfg, self.t, self.backend, self.trainer_factory)
        try:  # before registering: a join stalls nobody, and a worker that cannot train never joins
            await asyncio.to_thread(self.session.prepare, job)
        except (OSError, ValueError) as exc:
            raise ConfigError(f"cannot load the job's data or build its model: {exc}") from exc
        answer = await self.client.register(self.register_body)
        self.worker_id = str(answer["worker_id"])
        self.register_body["worker_id"] = self.worker_id
        self.t.update(worker_id=self.worker_id, known_epoch=int(answer.get("epoch", 0)))
        self.interval_s = float(answer.get("heartbeat_interval_s", self.interval_s))
        self.timeout_s = float(answer.get("heartbeat_timeout_s", self.timeout_s))
        self.t.liveness_from(answer, self.cfg.startup_timeout_s)
        tls = describe_tls(self.cfg.tls)
        log.info("worker %s: registered as %s:%d (gRPC on %s, %s)", self.worker_id, host, adv_port, port, tls)
        try:
            check_worker_timeouts(self.cfg, self.interval_s, self.timeout_s)
        except ValueError as exc:
            await self.client.leave(self.worker_id)
            raise ConfigError(str(exc)) from None
        self.heartbeat = HeartbeatLoop(
            self.client,
            self.t,
            self.backend,
            interval_s=self.interval_s,
            timeout_s=self.timeout_s,
            grace_s=self.cfg.coordinator_grace_s,
            outage_limit_s=self.cfg.barrier_timeout_s,
            reregister=self._reregister,
            stats=self._wire_stats,
        )
        try:
            rc = await run_tied(
                self._lifecycle(job), self.heartbeat, abort=self._abort, final_state=self._final
            )
        finally:
            try:
                await self.client.leave(self.worker_id)
                log.info("worker %s: left the cluster", self.worker_id)
            except CoordinatorError as exc:  # never mask the error that ended the worker
                log.warning("worker %s: could not leave the cluster: %s", self.worker_id, exc)
        return int(rc)

    def _final(self, exc: BaseException | None) -> str | None:
        return self.t.state if exc is None else "failed"  # finished, or waiting after a stop: at once

    async def _reregister(self) -> int:
        return int((await self.client.register(self.register_body)).get("epoch", 0))

    def _wire_stats(self) -> tuple[int, int]:
        if self.backend is None:  # before the job is known
            return 0, 0
        self.t.update(bytes_by_lane=self.backend.bytes_by_lane())
        stats = self.backend.stats()
        return stats.bytes_sent, stats.bytes_received

    def request_stop(self, why: str = "stop") -> None:
        """SIGTERM / Ctrl-C: stop at the next step boundary; drop the step in flight after a short grace."""
        if self.t.stop_requested.is_set():
            return
        log.info("worker %s: %s received; stopping", self.worker_id, why)
        self.t.stop_requested.set()
        loop = asyncio.get_running_loop()
        loop.call_later(self.cfg.stop_grace_s, self._abort)

    def _abort(self) -> None:
        """Fail every in-flight collective at once (the step is dropped, never half applied)."""
        self.t.stop_requested.set()
        if self.backend is not None:
            with self.t.lock:
                epoch = max(self.t.known_epoch, self.group.epoch if self.group else 0) + 1
            self.backend.set_epoch(epoch)

    async def _lifecycle(self, job: JobSpec) -> int:
        failed_epoch: int | None = None
        reforms_without_progress = 0
        while True:
            self.t.update(state="waiting")
            try:
                ready = await self._barrier(job, failed_epoch)
            except Stopped:
                return EXIT_OK
            group, self.members = group_from_ready(ready, job, self.worker_id)
            self.group = group
            assert self.session is not None and self.backend is not None
            session = self.session
            step_before = session.progress_step
            try:
                # Fails with EpochChanged if a newer epoch was announced meanwhile: re-form again.
                self.backend.set_group(group)
                with self.t.lock:
                    self.t.known_epoch = max(self.t.known_epoch, group.epoch)
                self.t.update(state="training", epoch=group.epoch)
                self.formations += 1
                log.info("worker %s: training in %s", self.worker_id, group.describe())
                committed = int(ready.get("committed_step", -1))  # the job's progress, as known
                train = partial(session.run, job, group, self.members, committed)
                outcome = await in_thread(train, f"train-{self.worker_id}")
            except (CommError, LeaseLost) as exc:
                if isinstance(exc, Unauthenticated):
                    raise
                if self.t.stop_requested.is_set():
                    return EXIT_OK
                reforms_without_progress = (
                    0 if session.progress_step > step_before else reforms_without_progress + 1
                )
                if reforms_without_progress > self.cfg.max_reforms:
                    raise TooManyReforms(
                        f"{reforms_without_progress} re-forms without progress; last: {exc}"
                    ) from exc
                log.warning(
                    "worker %s: %s broke (%s: %s); re-forming",
                    self.worker_id,
                    group.describe(),
                    type(exc).__name__,
                    exc,
                )
                failed_epoch = group.epoch
                await self._report_suspect(exc, group)
                continue
            if outcome is None:
                return EXIT_OK  # stopped before the end
            self.t.update(state="finished", test_accuracy=outcome.test_accuracy)
            session.record(
                {
                    "kind": "result",
                    **outcome_dict(outcome),
                    "epoch": group.epoch,
                    "rank": group.rank,
                    "world_size": group.world_size,
                    "formations": self.formations,
                }
            )
            log.info(
                "worker %s: finished %d steps, test accuracy %s",
                self.worker_id,
                outcome.steps_done,
                outcome.test_accuracy,
            )
            await self._linger(group)
            return EXIT_OK

    async def _barrier(self, job: JobSpec, failed_epoch: int | None) -> dict[str, Any]:
        """Wait until an epoch newer than `failed_epoch` is ready with this worker in it."""
        first = self.formations == 0
        min_workers = (self.cfg.min_workers or job.min_workers) if first else 1
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
            ready = await self._unless_stopped(through_outage(poll, deadline=deadline, what="barrier"))
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
                joined = await through_outage(self._reregister, deadline=deadline, what="registration")
                self.t.update(known_epoch=max(self.t.known_epoch, joined))
                stale_since = time.monotonic()
            await asyncio.sleep(self.interval_s)

    async def _report_suspect(self, exc: BaseException, group: PeerGroup) -> None:
        """A peer this worker could not reach: tell the coordinator (evidence; it decides whom to evict)."""
        if (suspect := suspect_of(exc, group, self.members)) is not None:
            try:
                await self.client.suspect(self.worker_id, group.epoch, suspect, f"unreachable: {exc}"[:500])
            except CoordinatorError as err:  # a stale epoch, or the coordinator is away: nothing to add
                log.debug("worker %s: suspect report on %s not taken: %s", self.worker_id, suspect, err)

    async def _unless_stopped(self, call: Coroutine[Any, Any, T]) -> T:
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

    async def _linger(self, group: PeerGroup) -> None:
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
                if w["worker_id"] in self.members
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


def run_worker(cfg: WorkerConfig) -> int:
    """Entry point of `zerowire worker`: run the daemon, map errors to a clear message and exit code."""
    import worker.coordinator_client as cc

    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per heartbeat is noise
    daemon = WorkerDaemon(cfg)
    try:
        return asyncio.run(daemon.run())
    except (cc.Unauthorized, cc.CoordinatorUnreachable, cc.RateLimited, ConfigError) as exc:
        log.error("worker: %s", exc)
        return EXIT_CONFIG
    except (cc.RequestRejected, cc.Forbidden, MustRegister) as exc:
        log.error("worker: the coordinator refused this worker: %s", exc)
        return EXIT_CONFIG
    except JobMismatch as exc:
        log.error("worker: job hash mismatch: %s", exc)
        return EXIT_JOB_MISMATCH
    except (BarrierTimeout, TooManyReforms, CoordinatorLost) as exc:
        log.error("worker: %s", exc)
        return EXIT_TRAINING_FAILED
    except Exception:
        log.exception("worker %s: training failed", daemon.worker_id)
        return EXIT_TRAINING_FAILED


__all__ = [
    "EXIT_CONFIG",
    "EXIT_JOB_MISMATCH",
    "EXIT_OK",
    "EXIT_TRAINING_FAILED",
    "ConfigError",
    "JobMismatch",
    "WorkerDaemon",
    "in_thread",
    "run_worker",
]
