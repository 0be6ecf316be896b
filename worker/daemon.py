"""The worker daemon's lifecycle: job -> gRPC server -> register -> (barrier -> train)* -> save -> leave.

Training runs on its own thread; the asyncio loop runs the heartbeat (tied to the lifecycle, see
worker/heartbeat.py), the barrier long-poll (worker/rendezvous.py: the barrier, registering again, peer
reports, lingering at the end) and signal handling. On EpochChanged / PeerLost /
CollectiveTimeout (or a lost lease) the worker goes back to the barrier for a newer epoch, and its
Manager (worker/manager.py) forms it: the members continue from the state they hold, without a rollback.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import signal
from collections.abc import Callable
from functools import partial
from typing import Any

import httpx

from communication.backend import WorkerLane
from communication.errors import CommError, Unauthenticated
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
)
from worker.heartbeat import HeartbeatLoop, LeaseLost, Telemetry, run_tied
from worker.identity import (
    WorkerConfig,
    adopt_timeouts,
    advertised_address,
    check_worker_timeouts,
    describe_device,
    place_device,
)
from worker.lanes import default_backend_factory
from worker.manager import TRAIN_THREAD, Manager, TrainerFactory, in_thread, outcome_dict
from worker.outage import CoordinatorLost
from worker.rendezvous import Rendezvous

log = logging.getLogger(__name__)


class WorkerDaemon:
    def __init__(
        self,
        cfg: WorkerConfig,
        *,
        trainers: TrainerFactory | None = None,
        backend_factory: Callable[[JobSpec, str], WorkerLane] | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.cfg = cfg
        self.trainers = trainers
        self.backend_factory = backend_factory or (  # built with the coordinator's timeouts
            lambda job, token: default_backend_factory(job, token, cfg=self.cfg)
        )
        self.client = CoordinatorClient(
            cfg.coordinator, cfg.token, transport=transport, verify=client_ssl_context(cfg.tls)
        )
        self.worker_id = cfg.worker_id or ""
        self.t = Telemetry(worker_id=self.worker_id)
        self.backend: WorkerLane | None = None
        self.heartbeat: HeartbeatLoop | None = None
        self.rendezvous: Rendezvous | None = None  # once registered
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
        try:  # kill -USR1 <worker>: what it is waiting on, and every thread's stack
            loop.add_signal_handler(signal.SIGUSR1, self.dump_flight, "SIGUSR1")
        except (NotImplementedError, RuntimeError, AttributeError):
            pass
        try:
            return await self._run()
        finally:
            if self.session is not None and self.session.data is not None:
                self.session.data.close()  # a streamed dataset's loader processes
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
        try:  # cuda: this worker's own GPU (its index among the workers of its host)
            self.cfg = dataclasses.replace(self.cfg, device=place_device(self.cfg.device))
        except ValueError as exc:
            raise ConfigError(str(exc)) from exc
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
        self.session = Manager(self.cfg, self.t, self.backend, self.trainers)
        try:  # before registering: a join stalls nobody, and a worker that cannot train never joins
            await asyncio.to_thread(self.session.prepare, job)
        except (OSError, ValueError) as exc:
            raise ConfigError(f"cannot load the job's data or build its model: {exc}") from exc
        answer = await self.client.register(self.register_body)
        self.worker_id = str(answer["worker_id"])
        self.register_body["worker_id"] = self.worker_id
        self.t.update(worker_id=self.worker_id)
        self.session.recorder.name = self.worker_id
        self.session.state.announce(int(answer.get("epoch", 0)))
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
        state = self.session.state
        self.rendezvous = Rendezvous(
            self.client,
            self.t,
            self.cfg,
            self.worker_id,
            self.register_body,
            self.interval_s,
            self.timeout_s,
            state,
        )
        self.heartbeat = HeartbeatLoop(
            self.client,
            self.t,
            state,
            interval_s=self.interval_s,
            timeout_s=self.timeout_s,
            grace_s=self.cfg.coordinator_grace_s,
            outage_limit_s=self.cfg.barrier_timeout_s,
            reregister=self.rendezvous.reregister,
            stats=self._wire_stats,
            diagnostics=self.session.diagnostics,
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

    def dump_flight(self, why: str) -> None:
        """Write the flight recorder's calls and every thread's stack next to the telemetry."""
        if self.session is None:
            return
        path = self.session.recorder.dump_to_dir(why)
        head = self.session.recorder.head()
        log.warning(
            "worker %s: flight recorder dumped to %s (%s); waiting on: %s", self.worker_id, path, why, head
        )

    def _final(self, exc: BaseException | None) -> str | None:
        return self.t.state if exc is None else "failed"  # finished, or waiting after a stop: at once

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
        if self.session is not None:
            self.session.state.retire()

    async def _lifecycle(self, job: JobSpec) -> int:
        assert self.rendezvous is not None
        rendezvous = self.rendezvous
        failed_epoch: int | None = None
        reforms_without_progress = 0
        while True:
            self.t.update(state="waiting")
            try:
                first = self.formations == 0
                min_workers = (self.cfg.min_workers or job.min_workers) if first else 1
                ready = await rendezvous.ready(job, failed_epoch, min_workers)
            except Stopped:
                return EXIT_OK
            group, self.members = group_from_ready(ready, job, self.worker_id)
            assert self.session is not None and self.backend is not None
            session = self.session
            step_before = session.state.committed_step
            try:
                self.t.update(state="training")
                self.formations += 1
                log.info("worker %s: training in %s", self.worker_id, group.describe())
                committed = int(ready.get("committed_step", -1))  # the job's progress, as known
                train = partial(session.run, job, group, self.members, committed)
                outcome = await in_thread(train, f"{TRAIN_THREAD}{self.worker_id}")
            except (CommError, LeaseLost) as exc:
                if isinstance(exc, Unauthenticated):
                    raise
                if self.t.stop_requested.is_set():
                    return EXIT_OK
                reforms_without_progress = (
                    0 if session.state.committed_step > step_before else reforms_without_progress + 1
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
                await rendezvous.report_suspect(exc, group, self.members)
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
                    "data": None if session.data is None else session.data.describe(),
                }
            )
            log.info(
                "worker %s: finished %d steps, test accuracy %s",
                self.worker_id,
                outcome.steps_done,
                outcome.test_accuracy,
            )
            await rendezvous.linger(group, self.members)
            return EXIT_OK


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
