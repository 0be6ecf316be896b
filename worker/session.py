"""One formation's training on the compute thread: build the Trainer, run it while reporting every step
and evaluation (telemetry for the heartbeat, JSON lines for `zerowire run`), check the fence between
steps, and save the model at the end."""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from communication.backend import lane_bytes
from communication.errors import EpochChanged
from communication.group import PeerGroup
from worker.heartbeat import Telemetry
from worker.identity import WorkerConfig, describe_device
from worker.job import JobSpec
from worker.liveness import WatchedCalls

log = logging.getLogger(__name__)


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


class TrainingSession:
    """Shared by the formations of one worker process (its step counter survives re-forms)."""

    def __init__(
        self, cfg: WorkerConfig, telemetry: Telemetry, backend: Any, trainer_factory: TrainerFactory
    ) -> None:
        self.cfg = cfg
        self.t = telemetry
        self.backend = backend
        self.trainer_factory = trainer_factory
        self.progress_step = -1
        self._log_lock = threading.Lock()

    def run(self, job: JobSpec, group: PeerGroup) -> Any:
        """Build a Trainer for this formation (it resumes from the newest checkpoint), train to the end,
        save the model (collective). None if a stop came first; raises CommError / LeaseLost on a break."""
        import torch

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
        )
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

    def check_fence(self, group: PeerGroup) -> None:
        """Between steps: never start a step in a stale epoch or without a lease (self-fencing)."""
        self.t.wait_lease(self.cfg.coordinator_grace_s)  # blocks while fenced
        if self.t.known_epoch > group.epoch:
            raise EpochChanged(f"{group.describe()}: epoch {self.t.known_epoch} was announced")

    def on_step(self, group: PeerGroup, report: Any) -> None:
        step_time = float(report.step_time_s) or 1e-9
        self.progress_step = max(self.progress_step, int(report.step))
        self.t.progress(int(report.step))  # a step committed
        self.t.update(
            loss=float(report.loss),
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
                "loss": float(report.loss),
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
                "bytes_by_lane": lane_bytes(self.backend),
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
