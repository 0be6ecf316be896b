"""The worker's training manager, between the daemon (process, coordinator, barrier) and the Trainer (the
step loop). It owns the worker's state (``worker.state.WorkerState``: the announced and installed epochs,
the group, the layout, the committed and staged steps) across membership epochs.

For every epoch the daemon forms, on the compute thread: install the epoch, build a trainer for the new
group, let it form the epoch (``worker.forming``: the members agree on the state to continue from, hand it
over, mirror it), adopt what it holds, then train to the end, reporting every committed step and evaluation
(telemetry for the heartbeat, JSON lines for `zerowire run`), checking the fence at every step (the trainer
asks through a ``StepGate``), and save the model at the end. No rank ever rolls back when a worker dies,
leaves or joins while a replica of each shard survives.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from communication.backend import CollectiveBackend
from communication.group import PeerGroup
from communication.recorder import FlightRecorder, RecordedLane, bus_bandwidth
from jobspec import JobSpec
from worker.heartbeat import Telemetry
from worker.identity import WorkerConfig, describe_device
from worker.liveness import WatchedCalls
from worker.state import WorkerState

if TYPE_CHECKING:
    from worker.data import TrainData
    from worker.forming import Formed
    from worker.recovery import Holding
    from worker.trainer_api import StepGate

log = logging.getLogger(__name__)

WAIT_MIN_S = 0.5  # a wait (or no progress) shorter than this is not worth the coordinator's diagnosis
TRAIN_THREAD = "train-"  # the training thread's name: this prefix and the worker id
WARM_WORLD = 64  # the warm-up build materializes one 64th of the model


async def in_thread(fn: Callable[[], Any], name: str) -> Any:
    """Run `fn` on a daemon thread (the process may exit even if it is stuck) and await its result."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[Any] = loop.create_future()

    def settle(result: Any, exc: BaseException | None) -> None:
        if future.done():
            return
        if exc is not None:
            future.set_exception(exc)
        else:
            future.set_result(result)

    def target() -> None:
        try:
            outcome: tuple[Any, BaseException | None] = (fn(), None)
        except BaseException as exc:
            outcome = (None, exc)
        try:
            loop.call_soon_threadsafe(settle, *outcome)
        except RuntimeError:  # the loop is closed: nobody waits for this result any more
            log.debug("thread %s ended after its event loop: %s", name, outcome[1])

    threading.Thread(target=target, name=name, daemon=True).start()
    return await future


class EpochTrainer(Protocol):
    """What the manager drives for one epoch: ``worker.trainer.Trainer``, or a stand-in with its methods."""

    def form(self, state: WorkerState, ids: tuple[str, ...], job_committed: int) -> Formed: ...

    def run(
        self,
        *,
        on_step: Callable[[Any], None] | None = None,
        on_eval: Callable[[Any], None] | None = None,
        should_stop: Callable[[], bool] | None = None,
    ) -> Any: ...

    def save_model(self, path: Path) -> None: ...


class TrainerFactory(Protocol):
    """Builds each epoch's trainer; ``prepare`` loads what no epoch changes (the dataset) first."""

    def prepare(self, job: JobSpec, cfg: WorkerConfig) -> TrainData | None: ...

    def __call__(
        self, job: JobSpec, group: PeerGroup, backend: CollectiveBackend, **kwargs: Any
    ) -> EpochTrainer: ...


class Trainers:
    """The factory of ``worker.trainer.Trainer``."""

    def prepare(self, job: JobSpec, cfg: WorkerConfig) -> TrainData:
        """The dataset, and a first model build (its initialisation kernels warm): done before the worker
        registers, so that a worker joining a running job does not keep the others waiting while it loads."""
        import torch

        from worker.data import job_dataset
        from worker.identity import default_data_workers
        from worker.models import build_model, units
        from worker.zero3.materialize import materialize

        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        loaders = default_data_workers() if cfg.data_workers is None else cfg.data_workers
        data = job_dataset(job, cfg.data_dir, loaders)
        materialize(
            lambda: build_model(job.model, data.num_classes, data.in_channels), WARM_WORLD, 0, units=units
        )
        return data

    def __call__(
        self, job: JobSpec, group: PeerGroup, backend: CollectiveBackend, **kwargs: Any
    ) -> EpochTrainer:
        from worker.trainer import Trainer

        return Trainer(job, group, backend, **kwargs)


class _Gate:
    """The manager's answer to the trainer at every step of ``group``: the state records what is staged;
    the fence decides whether the rank may commit."""

    def __init__(self, manager: Manager, group: PeerGroup) -> None:
        self.manager, self.group = manager, group

    def staged(self, step: int) -> None:
        self.manager.state.stage(step)

    def may_commit(self) -> None:
        self.manager.check_fence(self.group)


class Manager:
    """Shared by the formations of one worker process: it owns the worker's state across them."""

    def __init__(
        self,
        cfg: WorkerConfig,
        telemetry: Telemetry,
        backend: CollectiveBackend,
        trainers: TrainerFactory | None = None,
    ) -> None:
        self.cfg = cfg
        self.t = telemetry
        self.backend = backend
        self.trainers: TrainerFactory = trainers if trainers is not None else Trainers()
        self.state = WorkerState(backend)
        self.recorder = FlightRecorder(name=telemetry.worker_id or "worker")
        self.recorder.dump_dir = cfg.telemetry_dir or Path(tempfile.gettempdir())
        self._bus_seen = self.recorder.bus_totals()  # at the last committed step
        self.data: TrainData | None = None  # the dataset, once prepared
        self._log_lock = threading.Lock()

    def prepare(self, job: JobSpec) -> None:
        """What a formation needs that does not depend on the epoch (see ``TrainerFactory.prepare``)."""
        self.data = self.trainers.prepare(job, self.cfg)

    def run(self, job: JobSpec, group: PeerGroup, ids: tuple[str, ...], job_committed: int = -1) -> Any:
        """Form the epoch (``ids``: its members' worker ids by rank; ``job_committed``: the highest step the
        coordinator knows committed), train to the end, save the model (collective). None if a stop came
        first; raises CommError / LeaseLost on a break, RecoveryError when the job cannot continue."""
        import torch

        self.state.install(group, ids)  # EpochChanged if a newer epoch was announced meanwhile
        if self.cfg.threads:
            torch.set_num_threads(self.cfg.threads)
        device = torch.device(
            describe_device(self.cfg.device)[0] if self.cfg.device == "auto" else self.cfg.device
        )
        if device.type == "cuda":  # the current device is per thread: this formation's training thread
            torch.cuda.set_device(device)
        gate: StepGate = _Gate(self, group)
        trainer = self.trainers(
            job,
            group,
            # every call recorded (the flight recorder), and time waiting on peers is no stall
            WatchedCalls(RecordedLane(self.backend, self.recorder), self.t.clock),
            device=device,
            data_dir=self.cfg.data_dir,
            checkpoint_dir=self.cfg.checkpoint_dir,
            collective_timeout=self.cfg.collective_timeout_s,
            startup_timeout=self.cfg.startup_timeout_s,
            restore=False,
            gate=gate,
            **({} if self.data is None else {"data": self.data}),
        )
        self.adopt(group, trainer.form(self.state, ids, job_committed))
        outcome = trainer.run(
            on_step=lambda report: self.on_step(group, report),
            on_eval=lambda report: self.on_eval(group, report),
            should_stop=self.t.stop_requested.is_set,
        )
        if self.t.stop_requested.is_set() and outcome.steps_done < job.steps:
            return None
        self.check_fence(group)
        trainer.save_model(self.cfg.save_model)
        if group.rank == 0:
            log.info("worker %s: model saved to %s", self.t.worker_id, self.cfg.save_model)
        return outcome

    def adopt(self, group: PeerGroup, formed: Formed) -> None:
        """Take the formation's holding into the state (closing the engines let go) and report it."""
        if formed.holding is not None:
            _close(self.state.adopt(formed.holding, formed.keep))
        report = {
            "epoch": group.epoch,
            "mode": formed.mode,
            "resumed_at": formed.resumed_at,
            "steps_lost": formed.steps_lost,
            "seconds": round(formed.seconds, 3),
        }
        self.t.update(recovery=report)  # the heartbeat tells the coordinator (/events)
        self.record(
            {
                "kind": "recovery",
                **report,
                "rank": group.rank,
                "world_size": group.world_size,
                "seconds": formed.seconds,  # unrounded in the telemetry file
            }
        )
        log.info(
            "%s: formed (%s) at step %d, %d steps lost, in %.2fs",
            group.describe(),
            formed.mode,
            formed.resumed_at,
            formed.steps_lost,
            formed.seconds,
        )

    def diagnostics(self) -> dict[str, Any]:
        """What the heartbeat tells the coordinator's diagnosis: the collective this worker has waited in for
        ``WAIT_MIN_S`` or more (its flight recorder's head) or, when its training has made no progress for
        as long while in no collective, where its training thread is."""
        head = self.recorder.head()
        if head is not None and head["since_s"] >= WAIT_MIN_S:
            keys = ("op", "lane", "epoch", "step", "unit", "key", "since_s")
            return {"waiting": {**{k: head[k] for k in keys}, "peers": list(head["peers"])}}
        if self.t.state == "training" and self.t.clock.idle_s() >= WAIT_MIN_S:
            stack = training_stack()
            if stack:
                return {"stack": stack}
        return {}

    def check_fence(self, group: PeerGroup) -> None:
        """Never vote, commit or start a step in a stale epoch or without a lease (self-fencing)."""
        self.t.wait_lease(self.cfg.coordinator_grace_s)  # blocks while fenced
        self.state.check_current(group)

    def committed(self, step: int) -> None:
        """Step ``step`` committed in the current layout: every member adopted the layout, so the previous
        one goes."""
        self.state.commit(step)
        dropped = self.state.confirm()
        _close([] if dropped is None else [dropped])

    def on_step(self, group: PeerGroup, report: Any) -> None:
        """Step ``report.step`` committed (applied or skipped on every rank)."""
        self.committed(int(report.step))
        step_time = float(report.step_time_s) or 1e-9
        skipped = bool(getattr(report, "skipped", False))
        loss = None if skipped else float(report.loss)
        self.t.progress()  # a step committed
        bus, self._bus_seen = self._bus_seen, self.recorder.bus_totals()
        self.t.update(
            bus_bandwidth=bus_bandwidth(bus, self._bus_seen),
            **({} if loss is None else {"loss": loss, "loss_step": int(report.step)}),
            samples_per_s=self._local_samples(job_batch=int(report.samples), group=group) / step_time,
            compute_s=float(report.compute_s),
            comm_s=float(report.comm_s),
            wait_s=float(report.wait_s),
            data_wait_s=float(getattr(report, "data_wait_s", 0.0)),
        )
        self.t.count_staging_overflows(int(getattr(report, "staging_overflows", 0)))
        stats = self.backend.stats()
        self.record(
            {
                "kind": "step",
                "step": int(report.step),
                "loss": loss,
                "skipped": skipped,
                "epoch": group.epoch,
                "rank": group.rank,
                "world_size": group.world_size,
                "samples": int(report.samples),
                "step_time_s": step_time,
                "compute_s": float(report.compute_s),
                "comm_s": float(report.comm_s),
                "wait_s": float(report.wait_s),
                "data_wait_s": float(getattr(report, "data_wait_s", 0.0)),
                "bytes_sent": int(stats.bytes_sent),
                "bytes_received": int(stats.bytes_received),
                "bytes_by_lane": self.backend.bytes_by_lane(),
            }
        )
        self.check_fence(group)

    @staticmethod
    def _local_samples(job_batch: int, group: PeerGroup) -> int:
        """This rank's share of the global batch."""
        from worker.data.sampler import rank_slice

        start, stop = rank_slice(job_batch, group.world_size, group.rank)
        return stop - start

    def on_eval(self, group: PeerGroup, report: Any) -> None:
        self.t.update(
            test_loss=float(report.test_loss),
            test_accuracy=float(report.test_accuracy),
            test_step=int(report.step) - 1,  # the report counts the steps done
        )
        self.record(
            {
                "kind": "eval",
                "step": int(report.step),
                "test_loss": float(report.test_loss),
                "test_accuracy": float(report.test_accuracy),
                "epoch": group.epoch,
                "rank": group.rank,
            }
        )

    def record(self, entry: dict[str, Any]) -> None:
        """Append one JSON line to this worker's telemetry file (when a telemetry folder is set)."""
        if self.cfg.telemetry_dir is None:
            return
        entry = {"time": time.time(), "worker_id": self.t.worker_id, **entry}
        path = Path(self.cfg.telemetry_dir) / f"{self.t.worker_id}.jsonl"
        with self._log_lock, open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps(entry) + "\n")


def training_stack(limit: int = 7900) -> str | None:
    """The stack of the training thread (``TRAIN_THREAD`` + worker id), innermost frame last, at most
    ``limit`` characters (the innermost kept)."""
    thread = next((t for t in threading.enumerate() if t.name.startswith(TRAIN_THREAD)), None)
    frame = None if thread is None or thread.ident is None else sys._current_frames().get(thread.ident)
    if frame is None:
        return None
    return "".join(traceback.format_stack(frame))[-limit:]


def _close(holdings: list[Holding]) -> None:
    for h in holdings:
        h.trainer.engine.close()


def outcome_dict(outcome: Any) -> dict[str, Any]:
    return {
        "steps_done": int(outcome.steps_done),
        "final_loss": None if outcome.final_loss is None else float(outcome.final_loss),
        "test_accuracy": None if outcome.test_accuracy is None else float(outcome.test_accuracy),
    }
