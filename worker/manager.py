"""The worker's training manager, between the daemon (process, coordinator, barrier) and the Trainer (the
step loop): it owns the training state across membership epochs.

For every epoch the daemon forms, on the compute thread: build a Trainer for the new group, agree with the
other members on the state to continue from (``worker.recovery``: apply a staged step that some rank
already committed, pick the newest confirmed layout), hand the shards over to the new partition with the
buddies' replicas standing in for dead ranks (``worker.handover``), or fall back to the newest complete
checkpoint only when a shard and its replica are both gone; mirror every shard to its buddy; then train
to the end, reporting every committed step and evaluation (telemetry for the heartbeat, JSON lines for
`zerowire run`), checking the fence between steps, and save the model at the end. No rank ever rolls back
when a worker dies, leaves or joins while a replica of each shard survives.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from communication.backend import CollectiveBackend
from communication.errors import EpochChanged
from communication.group import PeerGroup
from jobspec import JobSpec
from worker import handover, recovery
from worker.commit import settled
from worker.heartbeat import Telemetry
from worker.identity import WorkerConfig, describe_device
from worker.liveness import WatchedCalls
from worker.recovery import Holding, RecoveryError
from worker.zero3.channels import Channel

log = logging.getLogger(__name__)

# A formation's first collective runs under step key 0, the others under the step it resumes at (a push
# is accepted at most one step ahead of what the receiver published); their channels are their own.
REPORT_KEY = 0
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


TrainerFactory = Callable[..., Any]


def default_trainer_factory(*args: Any, **kwargs: Any) -> Any:
    from worker.trainer import Trainer

    return Trainer(*args, **kwargs)


class Manager:
    """Shared by the formations of one worker process: the training state and step count survive them."""

    def __init__(
        self,
        cfg: WorkerConfig,
        telemetry: Telemetry,
        backend: CollectiveBackend,
        trainer_factory: TrainerFactory,
    ) -> None:
        self.cfg = cfg
        self.t = telemetry
        self.backend = backend
        self.trainer_factory = trainer_factory
        self.progress_step = -1
        self.current: Holding | None = None  # the state being trained
        self.previous: Holding | None = None  # the last confirmed state, until `current` is confirmed
        self.data: Any = None  # the dataset, once prepared
        self._log_lock = threading.Lock()

    def prepare(self, job: JobSpec) -> None:
        """What a formation needs that does not depend on the epoch: the dataset, and a first model build
        (its initialisation kernels warm). Done before the worker registers, so that a worker joining a
        running job does not keep the others waiting while it loads."""
        if self.trainer_factory is not default_trainer_factory:
            return
        import torch

        from worker.data import load_dataset
        from worker.models import build_model
        from worker.zero3.materialize import materialize

        if self.cfg.threads:
            torch.set_num_threads(self.cfg.threads)
        data = load_dataset(job.dataset, self.cfg.data_dir, job.seed)
        materialize(lambda: build_model(job.model, data.num_classes, data.in_channels), WARM_WORLD, 0)
        self.data = data

    def run(self, job: JobSpec, group: PeerGroup, ids: tuple[str, ...], job_committed: int = -1) -> Any:
        """Form the epoch (``ids``: its members' worker ids by rank; ``job_committed``: the highest step the
        coordinator knows committed), train to the end, save the model (collective). None if a stop came
        first; raises CommError / LeaseLost on a break, RecoveryError when the job cannot continue."""
        import torch

        from worker.trainer import Trainer

        if self.cfg.threads:
            torch.set_num_threads(self.cfg.threads)
        device = torch.device(
            describe_device(self.cfg.device)[0] if self.cfg.device == "auto" else self.cfg.device
        )
        trainer = self.trainer_factory(
            job,
            group,
            WatchedCalls(self.backend, self.t.clock),  # time waiting on peers is no stall
            device=device,
            data_dir=self.cfg.data_dir,
            checkpoint_dir=self.cfg.checkpoint_dir,
            collective_timeout=self.cfg.collective_timeout_s,
            startup_timeout=self.cfg.startup_timeout_s,
            restore=False,
            **({} if self.data is None else {"data": self.data}),
        )
        if isinstance(trainer, Trainer):  # a scripted stand-in (tests) carries no state to hand over
            self.form(trainer, job, group, ids, job_committed)
            trainer.may_commit = lambda: self.check_fence(group)
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

    # -- formation -------------------------------------------------------------------------------------
    def form(
        self, trainer: Any, job: JobSpec, group: PeerGroup, ids: tuple[str, ...], job_committed: int = -1
    ) -> None:
        """Collective over the new epoch: agree on the state, hand it over (or restore), mirror it."""
        t0 = time.monotonic()
        engine = trainer.engine
        from worker.zero3 import state as zstate

        handover.declare(engine, job)
        mine = recovery.report(self.current, self.previous)
        parts = zstate.exchange_values(engine, REPORT_KEY, Channel.REPORT, mine.values())
        choice = recovery.choose([recovery.StateReport.parse(p) for p in parts])
        key = choice.step  # every later collective of the formation: under the step it resumes at
        which = choice.which[group.rank]
        held = self.current if which in ("cur", "catchup") else self.previous if which == "prev" else None
        if which == "catchup" and held is not None and choice.settle is not None:
            step, skip, total_sq = choice.settle
            held.trainer.apply(settled(step, skip, total_sq))
            log.info("%s: applied step %d, which another rank had committed", group.describe(), step)
        lost = recovery.lost_ranks(held, choice, ids) if held is not None else []
        flags = zstate.exchange_values(
            engine, key, Channel.SETTLE, recovery.settle_values(bool(lost), held is not None)
        )
        any_lost = any(int(f[1]) == 1 for f in flags)
        known = max(self.progress_step + 1, choice.step)
        if choice.layout >= 0 and not any_lost:
            assert held is not None or not choice.which[group.rank]
            sources = recovery.sources(held, choice, ids) if held is not None else {}
            old_world = len(held.ids) if held is not None else 1  # a joiner supplies nothing
            handover.repartition(engine, trainer.optimizer, job, sources, old_world, choice.opt_steps, key)
            trainer.steps_done = choice.step
            handover.adopt_buffers(engine, key, held is not None)
            mode, resumed = ("join" if held is None else "handover"), choice.step
        else:
            resumed_from = trainer.restore_checkpoint()
            if choice.layout >= 0 and resumed_from is None:
                raise RecoveryError(
                    f"{group.describe()}: the shards of old ranks {lost or '(of another member)'} are lost "
                    "with their replicas and there is no complete checkpoint; the job stops"
                )
            if choice.layout < 0 and job_committed >= 0 and resumed_from is None:
                raise RecoveryError(
                    f"{group.describe()}: the job committed step {job_committed}, no member holds its state "
                    "and there is no complete checkpoint; the job stops rather than start again from step 0"
                )
            known = max(known, job_committed + 1)
            mode = "fresh" if choice.layout < 0 else "checkpoint"
            resumed = resumed_from or 0
        if job.replicas:
            trainer.replica = handover.replicate(engine, trainer.optimizer, job, trainer.optimizer.steps_done)
        keep = held if mode == "handover" else None  # confirmed: kept until a step commits in the new layout
        for h in (self.current, self.previous):
            if h is not None and h is not keep:
                h.trainer.engine.close()
        self.previous = keep
        self.current = Holding(group.epoch, ids, tuple(group.host_ids), group.rank, trainer)
        lost_steps = max(0, known - resumed) if mode == "checkpoint" else 0
        report = {"epoch": group.epoch, "mode": mode, "resumed_at": resumed, "steps_lost": lost_steps}
        self.t.update(recovery=report)  # the heartbeat tells the coordinator (/events)
        self.record(
            {
                "kind": "recovery",
                "mode": mode,
                "epoch": group.epoch,
                "rank": group.rank,
                "world_size": group.world_size,
                "resumed_at": resumed,
                "steps_lost": lost_steps,
                "seconds": time.monotonic() - t0,
            }
        )
        log.info(
            "%s: formed (%s) at step %d, %d steps lost, in %.2fs",
            group.describe(),
            mode,
            resumed,
            lost_steps,
            time.monotonic() - t0,
        )

    def check_fence(self, group: PeerGroup) -> None:
        """Between steps: never start a step in a stale epoch or without a lease (self-fencing)."""
        self.t.wait_lease(self.cfg.coordinator_grace_s)  # blocks while fenced
        if self.t.known_epoch > group.epoch:
            raise EpochChanged(f"{group.describe()}: epoch {self.t.known_epoch} was announced")

    def confirm(self) -> None:
        """A step committed in the current layout: every member adopted it, the previous one can go."""
        current = self.current
        if current is not None and not current.confirmed:
            current.confirmed = True
            if self.previous is not None:
                self.previous.trainer.engine.close()
            self.previous = None

    def on_step(self, group: PeerGroup, report: Any) -> None:
        """Step ``report.step`` committed (applied or skipped on every rank)."""
        self.confirm()
        step_time = float(report.step_time_s) or 1e-9
        self.progress_step = max(self.progress_step, int(report.step))
        skipped = bool(getattr(report, "skipped", False))
        loss = None if skipped else float(report.loss)
        self.t.progress(int(report.step))  # a step committed
        self.t.update(
            **({} if loss is None else {"loss": loss}),
            samples_per_s=self._local_samples(job_batch=int(report.samples), group=group) / step_time,
            compute_s=float(report.compute_s),
            comm_s=float(report.comm_s),
            wait_s=float(report.wait_s),
        )
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
        self.t.update(test_loss=float(report.test_loss), test_accuracy=float(report.test_accuracy))
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


def outcome_dict(outcome: Any) -> dict[str, Any]:
    return {
        "steps_done": int(outcome.steps_done),
        "final_loss": None if outcome.final_loss is None else float(outcome.final_loss),
        "test_accuracy": None if outcome.test_accuracy is None else float(outcome.test_accuracy),
    }
